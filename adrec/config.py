"""Every design choice of an ADRec trial as one frozen, validated dataclass.

`TrialConfig` is the single source of truth for the knobs: the trainer reads it, the sweep spaces
suggest values for its fields, the trial table has one column per field with the same name and the
report prints the same names. Defaults are the authors' values (official code, `src/config.yaml`
and `src/trainer.py` of Nemo-1024/ADRec); the reason for each is beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, get_args, get_origin

Model = Literal["adrec", "sasrec", "most_popular"]
NoiseScheduleName = Literal["linear", "cosine", "sqrt", "trunc_lin", "trunc_cos", "pw_lin", "beta"]
Aggregation = Literal["linear", "cross_attention", "adaln", "concat"]
PositionalEncoding = Literal["none", "learned", "sinusoidal", "rotary"]
StagePlan = Literal["three_stage", "no_warmup", "no_pretrain"]
NoiseLevel = Literal["token", "sequence"]
Denoiser = Literal["transformer", "mlp"]
Selection = Literal["metric", "any_metric"]
Metric = Literal["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
Device = Literal["auto", "cpu", "cuda"]

METRICS: tuple[str, ...] = get_args(Metric)


@dataclass(frozen=True)
class TrialConfig:
    # --- what to train on
    dataset: str = "ml-100k"  # a registry name, or a path to a file in one of the two formats
    data_dir: str | None = None  # resolved by adrec.data when None (see README, "Where data is found")
    max_users: int = 0  # keep only the first N users (0 = all); tests and smoke sweeps use slices
    model: Model = "adrec"  # adrec, or a baseline in the same harness
    seed: int = 2025  # the authors' random_seed
    device: Device = "auto"

    # --- encoder sizes (authors: hidden 128, 2 CAM + 2 ADM blocks, 4 heads, max length 50)
    hidden_size: int = 128
    cam_blocks: int = 2
    adm_blocks: int = 2
    heads: int = 4
    max_len: int = 50
    dropout: float = 0.1
    emb_dropout: float = 0.3

    # --- optimisation (authors: Adam 1e-3, weight decay 1e-5, cosine over 500 epochs, batch 512)
    lr: float = 1e-3
    weight_decay: float = 1e-5
    cosine_t_max: int = 500
    batch_size: int = 512
    eval_batch_size: int = 1024  # evaluation only; does not change results
    max_tokens_per_step: int = 8192  # micro-batch size in positions; gradients accumulate, results equal the full batch
    bucketed_batches: bool = False  # True: batches of similar lengths (fixed batch mates on small data; batches.py)

    # --- diffusion (authors: T=32, trunc_lin, lambda 1e-3, predict x0, token-level noise)
    diffusion_steps: int = 32
    noise_schedule: NoiseScheduleName = "trunc_lin"
    beta_a: float = 0.3  # only for noise_schedule='beta' (authors' beta_a)
    beta_b: float = 10.0  # only for noise_schedule='beta' (authors' beta_b)
    lambda_uncertainty: float = 1e-3  # weight of (x_t + t_emb) in the linear aggregation
    noise_level: NoiseLevel = "token"  # independent t per token (ADRec) or one t per sequence
    denoiser: Denoiser = "transformer"
    aggregation: Aggregation = "linear"
    positional_encoding: PositionalEncoding = "none"
    mse_weight: float = 1.0  # authors' loss_scale
    pcgrad: bool = False

    # --- stages (authors: pre-train to early stop, 5 warm-up epochs frozen, 500 epochs in all)
    stage_plan: StagePlan = "three_stage"
    stage1_epochs: int = 200  # maximum; stage 1 stops early by its own patience
    stage2_epochs: int = 5  # warm-up with the item embeddings frozen
    stage3_epochs: int = 495  # maximum joint epochs; with stage 2 the authors' 500
    eval_every: int = 5
    patience: int = 4  # evaluations without improvement before stopping
    selection: Selection = "metric"  # best model by select_metric, or the authors' "any metric improved"
    select_metric: Metric = "NDCG@20"

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrialConfig":
        """Build from a plain mapping (Ray's config, a JSON record); unknown keys are an error."""
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ValueError(
                f"unknown TrialConfig field(s) {', '.join(map(repr, unknown))}; "
                f"known fields: {', '.join(field_names())}"
            )
        return cls(**dict(values))

    def replace(self, **changes: Any) -> "TrialConfig":
        return self.from_dict({**self.to_dict(), **changes})

    # --- derived -------------------------------------------------------------------------------
    def stage_epochs(self) -> tuple[int, int, int]:
        """(stage1, stage2, stage3) maximum epochs after applying `stage_plan` at a fixed budget.

        no_warmup gives the warm-up epochs to stage 3; no_pretrain skips stage 1 and the warm-up
        (there is nothing to keep frozen) and gives both to stage 3, so every plan has the same
        total epoch budget.
        """
        s1, s2, s3 = self.stage1_epochs, self.stage2_epochs, self.stage3_epochs
        if self.model != "adrec":
            return (0, 0, 0)
        if self.stage_plan == "no_warmup":
            return (s1, 0, s2 + s3)
        if self.stage_plan == "no_pretrain":
            return (0, 0, s1 + s2 + s3)
        return (s1, s2, s3)


@functools.lru_cache(maxsize=None)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrialConfig)


def field_names() -> list[str]:
    return [f.name for f in fields(TrialConfig)]


def allowed_values(name: str) -> tuple[Any, ...] | None:
    """The fixed choices of a Literal field, or None for a free field."""
    hint = _hints()[name]
    return get_args(hint) if get_origin(hint) is Literal else None


def _check_types(cfg: TrialConfig) -> None:
    hints = _hints()
    for f in fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            if value not in choices:
                raise ValueError(
                    f"{f.name}={value!r} is not one of {', '.join(map(str, choices))}"
                )
            continue
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        elif hint is str:
            ok = isinstance(value, str)
        else:  # str | None
            ok = value is None or isinstance(value, str)
        if not ok:
            raise ValueError(
                f"{f.name}={value!r} has type {type(value).__name__}; expected {_type_name(hint)}"
            )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _positive(cfg: TrialConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be > 0")


def _non_negative(cfg: TrialConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be >= 0")


def _check_values(cfg: TrialConfig) -> None:
    _positive(cfg, "hidden_size", "cam_blocks", "heads", "max_len", "batch_size", "eval_batch_size",
              "max_tokens_per_step", "lr", "diffusion_steps", "cosine_t_max", "eval_every", "patience",
              "beta_a", "beta_b")
    _non_negative(cfg, "adm_blocks", "weight_decay", "mse_weight", "lambda_uncertainty",
                  "stage1_epochs", "stage2_epochs", "stage3_epochs", "max_users")
    for name in ("dropout", "emb_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be in [0, 1)")
    for name in ("lr", "weight_decay", "lambda_uncertainty", "mse_weight", "beta_a", "beta_b"):
        if not math.isfinite(getattr(cfg, name)):
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be finite")
    if cfg.hidden_size % cfg.heads:
        raise ValueError(
            f"hidden_size={cfg.hidden_size} must be divisible by heads={cfg.heads}"
        )
    if cfg.positional_encoding in ("rotary", "sinusoidal") and (cfg.hidden_size // cfg.heads) % 2:
        raise ValueError(
            f"positional_encoding={cfg.positional_encoding!r} needs an even head size; "
            f"hidden_size/heads={cfg.hidden_size // cfg.heads}"
        )
    if cfg.denoiser == "mlp" and cfg.aggregation in ("cross_attention", "adaln"):
        raise ValueError(
            f"denoiser='mlp' cannot use aggregation={cfg.aggregation!r}: an MLP denoiser has no "
            "attention to cross-attend with and no norms to modulate; use linear or concat"
        )
    if cfg.denoiser == "transformer" and cfg.adm_blocks == 0:
        raise ValueError("adm_blocks=0 leaves the Transformer denoiser empty; use >= 1")
    if cfg.model == "adrec" and sum(cfg.stage_epochs()[1:]) == 0:
        raise ValueError(
            "stage2_epochs + stage3_epochs = 0 trains no ADRec epochs; give stage 3 at least one epoch"
        )
    if cfg.model == "adrec" and cfg.stage_plan == "three_stage" and cfg.stage2_epochs > 0 \
            and cfg.stage1_epochs == 0:
        raise ValueError(
            "stage_plan='three_stage' with stage1_epochs=0 would freeze random item embeddings in the "
            "warm-up; set stage1_epochs > 0 or use stage_plan='no_pretrain'"
        )
    # The noise schedule validates its own betas for (name, T, a, b): imported late, no cycle.
    if cfg.model == "adrec":
        from adrec.schedule import NoiseSchedule

        NoiseSchedule.from_config(cfg)


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse one `--set field=value` into (field, typed value) using the field's type."""
    if "=" not in text:
        raise ValueError(f"--set {text!r} must look like field=value")
    name, raw = text.split("=", 1)
    name = name.strip()
    if name not in field_names():
        raise ValueError(f"unknown TrialConfig field {name!r}; known fields: {', '.join(field_names())}")
    hint = _hints()[name]
    return name, _coerce(name, raw.strip(), hint)


def _coerce(name: str, raw: str, hint: Any) -> Any:
    if get_origin(hint) is Literal:
        return raw
    try:
        if hint is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {_type_name(hint)}") from None
    if raw.lower() in ("none", "null") and hint is not str:
        return None
    return raw
