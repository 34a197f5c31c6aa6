"""The knob vocabulary (adrec.config.KNOBS) and what derives from it: spaces, rows, the model's branches."""
from __future__ import annotations

import itertools
import typing

import pytest
import torch

from adrec.config import KNOBS, TrialConfig, active_values, allowed_values, field_names
from adrec.model import ADRec
from sweeps.spaces import SpaceError, load_space, parse_space

torch.set_num_threads(1)

NOT_KNOBS = {"dataset", "data_dir", "max_users", "model", "seed", "device", "eval_batch_size",
             "max_tokens_per_step", "select_metric"}


def test_every_design_field_is_a_knob_and_only_those() -> None:
    assert set(KNOBS) == set(field_names()) - NOT_KNOBS
    assert list(KNOBS) == [f for f in field_names() if f in KNOBS]  # field order


@pytest.mark.parametrize("name", list(KNOBS), ids=str)
def test_knob_metadata_is_complete_and_consistent(name: str) -> None:
    knob = KNOBS[name]
    assert knob.paper and knob.help
    assert knob.default == getattr(TrialConfig(), name)
    if knob.kind == "categorical":
        assert knob.choices == allowed_values(name) and knob.scale == "categorical"
    elif knob.kind == "bool":
        assert knob.choices == (False, True) and knob.scale == "categorical"
    else:
        assert knob.kind == ("int" if typing.get_type_hints(TrialConfig)[name] is int else "float")
        assert knob.low < knob.high and knob.scale in ("linear", "log")
        assert knob.scale == "linear" or knob.low > 0
    for field_name, allowed in knob.when:
        assert field_name in KNOBS and set(allowed) <= set(KNOBS[field_name].choices)


@pytest.mark.parametrize("name, inactive, active", [
    ("lambda_uncertainty", {"aggregation": "concat"}, {"aggregation": "linear"}),
    ("beta_a", {"noise_schedule": "cosine"}, {"noise_schedule": "beta"}),
    ("stage1_epochs", {"stage_plan": "no_pretrain"}, {"stage_plan": "no_warmup"}),
    ("stage2_epochs", {"stage_plan": "no_warmup"}, {"stage_plan": "three_stage"}),
    ("adm_blocks", {"denoiser": "mlp"}, {"denoiser": "transformer"}),
])
def test_conditional_knobs_are_active_only_where_they_act(name: str, inactive: dict, active: dict) -> None:
    assert not KNOBS[name].is_active(inactive)
    assert KNOBS[name].is_active(active)
    assert KNOBS[name].is_active({}) == KNOBS[name].is_active(TrialConfig().to_dict())  # missing = default
    row = active_values({**TrialConfig().to_dict(), **inactive})
    assert row[name] is None and row["lr"] == 1e-3 and row["dataset"] == "ml-100k"


def test_every_knob_range_is_a_valid_space_of_its_own() -> None:
    """`{knob: {}}` searches the knob's own range; its ends build valid configs (validate_space)."""
    for name, knob in KNOBS.items():
        params = {f: {} for f, _ in knob.when}
        params[name] = {}
        fixed = {"diffusion_steps": 64} if name in ("noise_schedule", "beta_a", "beta_b") else {}
        if name == "hidden_size":
            fixed = {"heads": 1}
        if name == "heads":
            fixed = {"hidden_size": 840}  # divisible by 1..8
        if name == "adm_blocks":
            params = {name: {}}  # active at the default denoiser
        space = parse_space(f"only-{name}", {"params": params, "fixed": fixed})
        assert space.params[-1].field == name
        assert space.params[-1].log == (knob.scale == "log")


def test_inactive_knobs_are_not_sampled_and_null_in_rows() -> None:
    full = load_space("full")
    configs = full.space_filling(64, seed=1)
    for values in configs:
        cfg = {**TrialConfig().to_dict(), **full.fixed, **values}
        assert ("lambda_uncertainty" in values) == (cfg["aggregation"] == "linear")
        assert ("stage2_epochs" in values) == (cfg["stage_plan"] == "three_stage")
        assert ("stage1_epochs" in values) == (cfg["stage_plan"] != "no_pretrain")
        row = active_values(cfg)
        assert all((row[k] is None) == (not KNOBS[k].is_active(cfg)) for k in KNOBS)
    assert {v["aggregation"] for v in configs} >= {"linear", "concat"}


def test_a_space_orders_params_after_the_knobs_they_depend_on() -> None:
    space = parse_space("order", {"params": {"lambda_uncertainty": {}, "aggregation": {}}})
    assert [p.name for p in space.params] == ["aggregation", "lambda_uncertainty"]
    assert dict(space.params[1].when) == {"aggregation": ("linear",)}


def test_a_knob_that_the_space_makes_inactive_is_an_error() -> None:
    with pytest.raises(SpaceError, match=r"'lambda_uncertainty' is never active: .*aggregation=linear.*"
                                         r"fixes aggregation='concat'"):
        parse_space("dead", {"params": {"lambda_uncertainty": {}}, "fixed": {"aggregation": "concat"}})
    with pytest.raises(SpaceError, match="never active"):
        parse_space("dead", {"params": {"aggregation": {"choices": ["concat", "adaln"]},
                                        "lambda_uncertainty": {}}})


# --- every categorical choice that reaches the model has a branch of its own ------------------------
TINY = dict(hidden_size=16, heads=2, cam_blocks=1, adm_blocks=1, max_len=12, diffusion_steps=24, device="cpu",
            dropout=0.0, emb_dropout=0.0, lambda_uncertainty=0.5)
MODEL_KNOBS = ("aggregation", "positional_encoding", "denoiser", "noise_level", "noise_schedule")


def _loss(**changes) -> float:
    cfg = TrialConfig(**{**TINY, **changes})
    torch.manual_seed(0)
    model = ADRec(cfg, 30).train()
    g = torch.Generator().manual_seed(1)
    full = torch.randint(1, 31, (4, 9), generator=g)
    full[2:, :3] = 0
    seq, tgt = full[:, :-1], full[:, 1:]
    tgt = torch.where(seq > 0, tgt, torch.zeros_like(tgt))
    torch.manual_seed(2)
    loss, _ = model.loss(seq, tgt)
    return float(loss.detach())


@pytest.mark.parametrize("name", MODEL_KNOBS, ids=str)
def test_each_choice_of_a_model_knob_changes_the_model(name: str) -> None:
    """A choice the model has no branch for either raises or silently equals another choice: both fail."""
    losses = {choice: _loss(**{name: choice}) for choice in KNOBS[name].choices}
    for (a, la), (b, lb) in itertools.combinations(losses.items(), 2):
        assert la != lb, f"{name}={a!r} and {name}={b!r} give the same loss {la}"
