"""Every design choice of an ADRec trial as one frozen, validated dataclass, and the knob vocabulary.

`TrialConfig` is the single source of truth for the knobs: the trainer reads it, the sweep spaces
suggest values for its fields, the trial table has one column per field with the same name and the
report prints the same names. Defaults are the authors' values (official code, `src/config.yaml`
and `src/trainer.py` of Nemo-1024/ADRec); the reason for each is beside it.

A field declared with `knob(...)` is a design knob and carries its metadata next to it: the paper's
name, a one-line meaning, the range a sweep may search (with its scale) and when the knob is active
(`lambda_uncertainty` only matters with `aggregation='linear'`). `KNOBS` collects them; spaces,
validation, the trial table, the analysis, TensorBoard HParams, HiPlot and `python -m adrec knobs`
all read it. Fields without `knob(...)` say where or how a trial runs, not what it is.
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
NoiseScheduleName = Literal["linear", "cosine", "sqrt", "trunc_lin", "trunc_cos", "pw_lin", "beta", "beta_cdf"]
Aggregation = Literal["linear", "cross_attention", "adaln", "concat"]
PositionalEncoding = Literal["none", "learned", "sinusoidal", "rotary"]
StagePlan = Literal["three_stage", "no_warmup", "no_pretrain"]
NoiseLevel = Literal["token", "sequence"]
Denoiser = Literal["transformer", "mlp"]
Selection = Literal["metric", "any_metric"]
WarmupEmbedding = Literal["decayed", "frozen"]
LossCombination = Literal["mean", "sum"]
PaddingMask = Literal["key", "query"]
Metric = Literal["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
Device = Literal["auto", "cpu", "cuda"]

METRICS: tuple[str, ...] = get_args(Metric)
KnobKind = Literal["categorical", "bool", "int", "float"]
Scale = Literal["categorical", "linear", "log"]


@dataclass(frozen=True)
class Knob:
    """One design knob: what the paper calls it, its values, and when it does anything."""

    name: str  # the TrialConfig field (and trial-table column)
    paper: str  # the name or symbol the paper and the authors' code use
    help: str
    kind: KnobKind
    scale: Scale  # how a sweep samples it and the analysis bins and plots it
    default: Any  # the authors' value
    low: float | None = None  # the range a sweep may search (numbers only)
    high: float | None = None
    choices: tuple[Any, ...] = ()  # categorical and bool knobs
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # active only where every field has one of its values

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """Does this knob change anything in a trial with these field values (defaults where missing)?"""
        return all(values.get(f, getattr(_DEFAULTS, f)) in allowed for f, allowed in self.when)

    def describe_when(self) -> str:
        """'aggregation=linear', or 'always'."""
        parts = [f"{f}={'|'.join(map(str, allowed))}" for f, allowed in self.when]
        return " and ".join(parts) or "always"


def knob(default: Any, paper: str, help: str, *, low: float | None = None, high: float | None = None,
         scale: Literal["linear", "log"] = "linear",
         when: Mapping[str, tuple[Any, ...]] | None = None) -> Any:
    """A TrialConfig field that is a design knob (its metadata rides on the dataclass field)."""
    spec = {"paper": paper, "help": help, "low": low, "high": high, "scale": scale,
            "when": tuple((f, tuple(v)) for f, v in (when or {}).items())}
    return dataclasses.field(default=default, metadata={"knob": spec})



@dataclass(frozen=True)
class TrialConfig:
    # --- what to train on (setup, not knobs: the sweep sets these per trial)
    dataset: str = "ml-100k"  # a registry name, or a path to a file in one of the two formats
    data_dir: str | None = None  # resolved by adrec.data when None (see README, "Where data is found")
    max_users: int = 0  # keep only the first N users (0 = all); tests and smoke sweeps use slices
    model: Model = "adrec"  # adrec, or a baseline in the same harness
    seed: int = 2025  # the authors' random_seed
    device: Device = "auto"

    # --- encoder sizes (authors: hidden 128, 2 CAM + 2 ADM blocks, 4 heads, max length 50)
    hidden_size: int = knob(128, "d (hidden size)", "embedding and model width", low=32, high=256, scale="log")
    cam_blocks: int = knob(2, "CAM blocks", "Transformer blocks of the causal attention module", low=1, high=4)
    adm_blocks: int = knob(2, "ADM blocks", "Transformer blocks of the diffusion denoiser", low=1, high=4,
                           when={"denoiser": ("transformer",)})
    heads: int = knob(4, "attention heads", "heads per attention layer (must divide d)", low=1, high=8)
    max_len: int = knob(50, "L (max sequence length)", "history length kept per user", low=10, high=200,
                        scale="log")
    dropout: float = knob(0.1, "dropout", "dropout in attention, FFN and residual branches", low=0.0, high=0.5)
    emb_dropout: float = knob(0.3, "embedding dropout", "dropout on the item embeddings", low=0.0, high=0.5)

    # --- optimisation (authors: Adam 1e-3, weight decay 1e-5, cosine over 500 epochs, batch 512)
    lr: float = knob(1e-3, "learning rate", "Adam learning rate", low=1e-4, high=1e-2, scale="log")
    weight_decay: float = knob(1e-5, "weight decay", "Adam's L2 weight decay", low=1e-6, high=1e-3, scale="log")
    cosine_t_max: int = knob(500, "cosine T_max", "epochs of the cosine learning-rate schedule", low=100,
                             high=1000)
    batch_size: int = knob(512, "batch size", "users per training batch", low=64, high=2048, scale="log")
    eval_batch_size: int = 1024  # evaluation only; does not change results
    max_tokens_per_step: int = 8192  # micro-batch size in positions; gradients accumulate, results equal the full batch
    bucketed_batches: bool = knob(False, "bucketed batches",
                                  "batches of similar lengths instead of plain shuffles (batches.py)")

    # --- diffusion (authors: T=32, trunc_lin, lambda 1e-3, predict x0, token-level noise)
    diffusion_steps: int = knob(32, "T (diffusion steps)", "steps of the noise schedule", low=24, high=200,
                                scale="log")  # below ~20 the 1000/T-scaled linear schedules leave (0, 1]
    noise_schedule: NoiseScheduleName = knob("trunc_lin", "noise schedule", "how beta_t grows with t")
    beta_a: float = knob(0.3, "a of Beta(a, b)", "shape a of the beta schedule", low=0.2, high=5.0, scale="log",
                         when={"noise_schedule": ("beta", "beta_cdf")})
    beta_b: float = knob(10.0, "b of Beta(a, b)", "shape b of the beta schedule", low=0.5, high=20.0, scale="log",
                         when={"noise_schedule": ("beta", "beta_cdf")})
    lambda_uncertainty: float = knob(1e-3, "λ (uncertainty weight)", "weight of (x_t + t_emb) in the linear "
                                     "aggregation c + λ(x_t + t_emb)", low=1e-4, high=1.0, scale="log",
                                     when={"aggregation": ("linear",)})
    noise_level: NoiseLevel = knob("token", "noise level", "independent t per token (ADRec) or one t per "
                                   "sequence")
    denoiser: Denoiser = knob("transformer", "ADM denoiser", "Transformer blocks or an MLP")
    aggregation: Aggregation = knob("linear", "aggregation", "how the history c meets the noisy target x_t")
    positional_encoding: PositionalEncoding = knob("none", "positional encoding", "positions counted back from "
                                                   "the newest item, in CAM and ADM (never stage 1)")
    mse_weight: float = knob(1.0, "loss_scale (MSE weight)", "weight of the diffusion MSE against the CE",
                             low=0.1, high=10.0, scale="log")
    pcgrad: bool = knob(False, "PCGrad", "project conflicting CE/MSE gradients (Yu et al. 2020)")

    # --- stages (authors: pre-train to early stop, 5 warm-up epochs frozen, 500 epochs in all)
    stage_plan: StagePlan = knob("three_stage", "stage plan", "which of the three training stages run, at a "
                                 "fixed total epoch budget")
    stage1_epochs: int = knob(500, "stage-1 epochs", "maximum epochs of CE pre-training (stops early by "
                              "patience)", low=20, high=500, scale="log",
                              when={"stage_plan": ("three_stage", "no_warmup")})
    stage2_epochs: int = knob(5, "stage-2 epochs", "warm-up epochs with the item embeddings frozen", low=1,
                              high=20, when={"stage_plan": ("three_stage",)})
    stage3_epochs: int = knob(495, "stage-3 epochs", "maximum joint CE + MSE epochs; with stage 2 the "
                              "authors' 500", low=10, high=495, scale="log")
    eval_every: int = knob(5, "evaluation interval", "trained epochs between validation passes", low=1, high=10)
    patience: int = knob(4, "patience", "evaluations without improvement before stopping", low=1, high=10)
    selection: Selection = knob("any_metric", "model selection", "best model by select_metric, or the authors' "
                                "'any of the six metrics improved'")
    select_metric: Metric = "NDCG@20"  # set by the sweep's --metric

    # --- fidelity to the authors' code: their behaviour by default, each correction a knob
    warmup_embedding: WarmupEmbedding = knob("decayed", "frozen embedding (freeze_emb)", "warm-up embedding: "
                                             "moved by Adam's weight decay as the authors' PCGrad leaves it, "
                                             "or bitwise frozen", when={"stage_plan": ("three_stage",)})
    loss_combination: LossCombination = knob("mean", "PCGrad reduction", "CE and MSE gradients averaged "
                                             "((g_CE + w g_MSE) / 2, authors) or summed")
    padding_mask: PaddingMask = knob("key", "padding mask", "padded positions masked as attention keys "
                                     "(packed rows) or as query rows in rows left-padded to L (authors)")
    score_padding_item: bool = knob(True, "score of item 0", "rank the padding item 0 with the real items "
                                    "(authors) or never recommend it")

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


_DEFAULTS = TrialConfig.__new__(TrialConfig)  # defaults without validation (is_active reads them)
for _f in fields(TrialConfig):
    object.__setattr__(_DEFAULTS, _f.name, _f.default)


def _collect_knobs() -> dict[str, Knob]:
    hints = typing.get_type_hints(TrialConfig)
    knobs = {}
    for f in fields(TrialConfig):
        if "knob" not in f.metadata:
            continue
        spec, hint = dict(f.metadata["knob"]), hints[f.name]
        if get_origin(hint) is Literal:
            kind, choices, spec["scale"] = "categorical", get_args(hint), "categorical"
        elif hint is bool:
            kind, choices, spec["scale"] = "bool", (False, True), "categorical"
        else:
            kind, choices = ("int" if hint is int else "float"), ()
        knobs[f.name] = Knob(name=f.name, kind=kind, default=f.default, choices=choices, **spec)
    return knobs


KNOBS: dict[str, Knob] = _collect_knobs()


def active_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config's values with every knob that is inactive in it set to None (a trial-table row)."""
    return {k: (None if k in KNOBS and not KNOBS[k].is_active(values) else v) for k, v in values.items()}


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

        NoiseSchedule.build(cfg.noise_schedule, cfg.diffusion_steps, cfg.beta_a, cfg.beta_b)


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
