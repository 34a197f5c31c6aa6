"""adrec.config: authors' defaults, serialisation round trips, validation messages, --set parsing."""
from __future__ import annotations

import json

import pytest

from adrec.config import TrialConfig, allowed_values, field_names, parse_assignment

# DESIGN.md, "Authors' defaults (official code)".
AUTHORS_DEFAULTS = {
    "model": "adrec",
    "hidden_size": 128,
    "cam_blocks": 2,
    "adm_blocks": 2,
    "heads": 4,
    "max_len": 50,
    "dropout": 0.1,
    "emb_dropout": 0.3,
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "cosine_t_max": 500,
    "batch_size": 512,
    "diffusion_steps": 32,
    "noise_schedule": "trunc_lin",
    "lambda_uncertainty": 1e-3,
    "noise_level": "token",
    "eval_every": 5,
    "patience": 4,
    "stage2_epochs": 5,
    "positional_encoding": "none",
    "aggregation": "linear",
    "denoiser": "transformer",
    "mse_weight": 1.0,
    "pcgrad": False,
}


@pytest.mark.parametrize("name", sorted(AUTHORS_DEFAULTS), ids=str)
def test_default_is_the_authors_value(name: str) -> None:
    value = getattr(TrialConfig(), name)
    assert value == AUTHORS_DEFAULTS[name]
    assert type(value) is type(AUTHORS_DEFAULTS[name])


def test_default_warmup_plus_joint_epochs_is_the_authors_500() -> None:
    cfg = TrialConfig()
    assert cfg.stage2_epochs + cfg.stage3_epochs == 500
    assert cfg.stage1_epochs > 0  # stage 1 runs (to early stopping) by default


# --- serialisation ------------------------------------------------------------------------------
ROUND_TRIP_CASES = {
    "defaults": {},
    "knobs": {"noise_schedule": "beta", "beta_a": 1.5, "beta_b": 2.0, "diffusion_steps": 120,
              "aggregation": "adaln", "positional_encoding": "rotary", "lambda_uncertainty": 0.25,
              "stage_plan": "no_warmup", "pcgrad": True, "data_dir": "/tmp/x", "selection": "any_metric"},
    "baseline": {"model": "sasrec", "hidden_size": 64, "heads": 2, "select_metric": "HR@10"},
}


@pytest.mark.parametrize("changes", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_round_trip_dict_and_json(changes: dict) -> None:
    cfg = TrialConfig(**changes)
    as_dict = cfg.to_dict()
    assert list(as_dict) == field_names()
    assert TrialConfig.from_dict(as_dict) == cfg
    assert TrialConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert json.loads(cfg.to_json()) == as_dict


def test_int_given_for_a_float_field_is_stored_as_float() -> None:
    cfg = TrialConfig(lr=1, mse_weight=0)
    assert (cfg.lr, type(cfg.lr)) == (1.0, float)
    assert TrialConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_replace_revalidates() -> None:
    cfg = TrialConfig().replace(hidden_size=64)
    assert cfg.hidden_size == 64
    with pytest.raises(ValueError, match=r"hidden_size=63 must be divisible by heads=4"):
        cfg.replace(hidden_size=63)


def test_unknown_key_is_rejected_with_the_known_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown TrialConfig field\(s\) 'bogus'") as info:
        TrialConfig.from_dict({"bogus": 1, "hidden_size": 64})
    message = str(info.value)
    assert all(name in message for name in field_names())


# --- validation messages ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("aggregation", "xattn"), ("noise_schedule", "quadratic"), ("positional_encoding", "alibi"),
     ("stage_plan", "two_stage"), ("denoiser", "unet"), ("noise_level", "item"), ("model", "gru4rec"),
     ("select_metric", "MRR"), ("device", "tpu")],
    ids=lambda v: str(v),
)
def test_bad_choice_names_the_field_and_the_allowed_values(field: str, value: str) -> None:
    allowed = allowed_values(field)
    assert allowed is not None and len(allowed) >= 2
    pattern = rf"{field}='{value}' is not one of " + ", ".join(map(str, allowed))
    with pytest.raises(ValueError, match=pattern):
        TrialConfig(**{field: value})


def test_allowed_values_of_a_free_field_is_none() -> None:
    assert allowed_values("hidden_size") is None
    assert allowed_values("aggregation") == ("linear", "cross_attention", "adaln", "concat")


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"hidden_size": "64"}, r"hidden_size='64' has type str; expected int"),
        ({"hidden_size": True}, r"hidden_size=True has type bool; expected int"),
        ({"pcgrad": 1}, r"pcgrad=1 has type int; expected bool"),
        ({"lr": "0.1"}, r"lr='0.1' has type str; expected float"),
        ({"data_dir": 3}, r"data_dir=3 has type int"),
        ({"hidden_size": 0}, r"hidden_size=0 must be > 0"),
        ({"lr": -1e-3}, r"lr=-0.001 must be > 0"),
        ({"weight_decay": -1.0}, r"weight_decay=-1.0 must be >= 0"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"mse_weight": float("inf")}, r"mse_weight=inf must be finite"),
        ({"lr": float("nan")}, r"lr=nan must be > 0"),
    ],
    ids=["str-for-int", "bool-for-int", "int-for-bool", "str-for-float", "int-for-optional-str",
         "zero-hidden", "negative-lr", "negative-decay", "dropout-1", "inf-mse", "nan-lr"],
)
def test_bad_value_names_the_field_and_the_value(changes: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrialConfig(**changes)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"denoiser": "mlp", "aggregation": "cross_attention"},
         r"denoiser='mlp' cannot use aggregation='cross_attention'.*use linear or concat"),
        ({"denoiser": "mlp", "aggregation": "adaln"}, r"denoiser='mlp' cannot use aggregation='adaln'"),
        ({"hidden_size": 130, "heads": 4}, r"hidden_size=130 must be divisible by heads=4"),
        ({"hidden_size": 12, "heads": 4, "positional_encoding": "rotary"},
         r"positional_encoding='rotary' needs an even head size; hidden_size/heads=3"),
        ({"diffusion_steps": 20}, r"noise_schedule='trunc_lin' with diffusion_steps=20 gives beta\[19\]=1\.01 "
                                  r"outside \(0, 1\]"),
        ({"stage_plan": "three_stage", "stage1_epochs": 0, "stage2_epochs": 3},
         r"stage_plan='three_stage' with stage1_epochs=0 would freeze random item embeddings"),
        ({"stage2_epochs": 0, "stage3_epochs": 0}, r"stage2_epochs \+ stage3_epochs = 0 trains no ADRec epochs"),
        ({"denoiser": "transformer", "adm_blocks": 0}, r"adm_blocks=0 leaves the Transformer denoiser empty"),
    ],
    ids=["mlp+cross_attention", "mlp+adaln", "hidden%heads", "rotary-odd-head", "trunc_lin-T20",
         "three_stage-no-pretrain", "no-adrec-epochs", "empty-transformer"],
)
def test_impossible_combination_is_rejected(changes: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrialConfig(**changes)


@pytest.mark.parametrize(
    "changes",
    [{"denoiser": "mlp", "aggregation": "concat", "adm_blocks": 0},
     {"stage_plan": "no_pretrain", "stage1_epochs": 0, "stage2_epochs": 3},
     {"model": "most_popular", "diffusion_steps": 1},
     {"model": "sasrec", "noise_schedule": "linear", "diffusion_steps": 10}],
    ids=["mlp-needs-no-adm-blocks", "no_pretrain-without-stage1", "baseline-ignores-T", "sasrec-ignores-schedule"],
)
def test_sensible_neighbours_of_the_impossible_combinations_validate(changes: dict) -> None:
    TrialConfig(**changes)


# --- --set parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("hidden_size=64", ("hidden_size", 64)),
        ("lr = 3e-4", ("lr", 3e-4)),
        ("mse_weight=2", ("mse_weight", 2.0)),
        ("pcgrad=true", ("pcgrad", True)),
        ("pcgrad=Off", ("pcgrad", False)),
        ("aggregation=adaln", ("aggregation", "adaln")),
        ("data_dir=none", ("data_dir", None)),
        ("data_dir=/data/a=b", ("data_dir", "/data/a=b")),
        ("dataset=none", ("dataset", "none")),
    ],
    ids=["int", "float-spaces", "int-text-for-float", "bool-true", "bool-off", "literal", "optional-none",
         "value-with-equals", "str-none-stays-str"],
)
def test_parse_assignment_types_the_value(text: str, expected: tuple) -> None:
    name, value = parse_assignment(text)
    assert (name, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("hidden_size=abc", r"hidden_size='abc' is not a valid int"),
        ("hidden_size=1.5", r"hidden_size='1.5' is not a valid int"),
        ("lr=fast", r"lr='fast' is not a valid float"),
        ("pcgrad=maybe", r"pcgrad='maybe' is not a valid bool"),
        ("bogus=1", r"unknown TrialConfig field 'bogus'; known fields: dataset, data_dir, .*pcgrad"),
        ("hidden_size", r"--set 'hidden_size' must look like field=value"),
    ],
    ids=["int-abc", "int-float", "float-word", "bool-word", "unknown", "no-equals"],
)
def test_parse_assignment_errors_name_the_field(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_assignment(text)


# --- stage plans --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "plan, expected",
    [("three_stage", (20, 3, 17)), ("no_warmup", (20, 0, 20)), ("no_pretrain", (0, 0, 40))],
    ids=str,
)
def test_stage_epochs_keep_the_total_budget(plan: str, expected: tuple) -> None:
    cfg = TrialConfig(stage_plan=plan, stage1_epochs=20, stage2_epochs=3, stage3_epochs=17)
    assert cfg.stage_epochs() == expected
    assert sum(cfg.stage_epochs()) == 40


def test_stage_epochs_of_the_authors_defaults() -> None:
    assert TrialConfig().stage_epochs() == (500, 5, 495)
    assert sum(TrialConfig(stage_plan="no_pretrain").stage_epochs()) == 1000


@pytest.mark.parametrize("model", ["sasrec", "most_popular"], ids=str)
def test_baselines_have_no_adrec_stages(model: str) -> None:
    assert TrialConfig(model=model).stage_epochs() == (0, 0, 0)
