"""Named search spaces over `TrialConfig` fields: parsing, validation, TPE suggestions, paired designs.

A space is a readable mapping (the built-ins below, or a YAML file with the same keys):

    description: what the space is for
    datasets: [ml-100k, baby]            # default --datasets
    counts: {paired_samples: 8, repeats: 2, num_samples: 16, confirm_top: 2}
    baselines: [most_popular, sasrec]    # one row each per dataset
    fixed: {stage3_epochs: 100}          # TrialConfig values every trial of the space uses
    params:                              # searched knobs, sampled in this order
      noise_schedule: {choices: [linear, cosine, beta]}
      beta_a: {low: 0.1, high: 5.0, log: true, when: {noise_schedule: [beta]}}
      aggregation_mlp: {field: aggregation, choices: [linear, concat], when: {denoiser: [mlp]}}

A param's key is its Optuna name; `field` (default: the key) is the knob it sets. Everything a param
leaves out comes from the knob vocabulary (`adrec.config.KNOBS`): `lambda_uncertainty: {}` searches
the knob's own range on its own scale, and a knob's activity condition (λ only with
aggregation=linear) is added to its `when`, so an inactive knob is never sampled. A conditional
knob whose choices differ by branch gets one param per branch with distinct names, because Optuna
keys its model by name and one name must keep one distribution. Params are sampled after the
params their `when` looks at (reordered if needed).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from adrec.cli import QUICK
from adrec.config import KNOBS, TrialConfig, field_names
from adrec.data import REGISTRY

Kind = Literal["float", "int", "categorical"]

# Fields the sweep itself sets per trial; a space may not search or fix them.
SWEEP_FIELDS = ("dataset", "data_dir", "seed", "model", "select_metric")
BASELINES = ("most_popular", "sasrec")
COUNT_KEYS = ("paired_samples", "repeats", "num_samples", "confirm_top")
_SPACE_KEYS = ("description", "datasets", "counts", "baselines", "fixed", "params")
_PARAM_KEYS = ("field", "type", "low", "high", "log", "step", "choices", "when")
# Validation builds configs with the numeric knobs at their ends: all of them up to this many, else this
# many seeded random ones (each TrialConfig costs ~1 ms).
_MAX_VALIDATION_CONFIGS = 1000
LHS_CANDIDATES = 64  # Latin hypercubes drawn per paired design; the least correlated one is used


class SpaceError(ValueError):
    """A space that cannot run: unknown knob, impossible range or an invalid combination."""


@dataclass(frozen=True)
class Param:
    name: str  # Optuna parameter name (distinct per branch)
    field: str  # TrialConfig field it sets
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None  # ints only
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(f) in allowed for f, allowed in self.when)

    def from_unit(self, u: float) -> Any:
        """Map u in [0, 1) onto the knob's range (used by the space-filling paired design)."""
        if self.kind == "categorical":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        lo, hi = float(self.low), float(self.high)
        x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if self.log else lo + u * (hi - lo)
        if self.kind == "float":
            return x
        step = self.step or 1
        return int(min(max(lo + round((x - lo) / step) * step, lo), hi))

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def ends(self) -> tuple[Any, Any]:
        if self.kind == "categorical":
            return self.choices[0], self.choices[-1]
        cast = int if self.kind == "int" else float
        return cast(self.low), cast(self.high)


@dataclass(frozen=True)
class Space:
    name: str
    description: str = ""
    datasets: tuple[str, ...] = ()
    paired_samples: int = 0
    repeats: int = 1
    num_samples: int = 0
    confirm_top: int = 0
    baselines: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in COUNT_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form (round-trips through `parse_space`)."""
        params = {}
        for p in self.params:
            spec: dict[str, Any] = {} if p.field == p.name else {"field": p.field}
            if p.kind == "categorical":
                spec["choices"] = list(p.choices)
            else:
                spec.update(type=p.kind, low=p.low, high=p.high)
                if p.log:
                    spec["log"] = True
                if p.step:
                    spec["step"] = p.step
            if p.when:
                spec["when"] = {f: list(v) for f, v in p.when}
            params[p.name] = spec
        return {"description": self.description, "datasets": list(self.datasets), "counts": self.counts(),
                "baselines": list(self.baselines), "fixed": dict(self.fixed), "params": params}

    # --- sampling -----------------------------------------------------------------------------
    def base_values(self) -> dict[str, Any]:
        return {**TrialConfig().to_dict(), **self.fixed}

    def assign(self, pick: Callable[[int, Param], Any]) -> dict[str, Any]:
        """{field: value} of the params active under the values picked so far, in order;
        `pick(i, param)` gives the value of the i-th param."""
        values, chosen = self.base_values(), {}
        for i, p in enumerate(self.params):
            if p.active(values):
                values[p.field] = chosen[p.field] = pick(i, p)
        return chosen

    def sample(self, trial: Any) -> dict[str, Any]:
        """Define-by-run suggestion on an Optuna trial: {field: value} of the active params."""
        return self.assign(lambda _, p: p.suggest(trial))

    def space_filling(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` configs from a seeded, correlation-reduced Latin hypercube over the params ({field: value} each).

        Every param gets its own column, so an inactive conditional knob leaves the others'
        strata untouched; a space without params gives `n` copies of its fixed config. Of
        `LHS_CANDIDATES` seeded hypercubes the one whose columns (categorical ones as the index of
        their level) are least correlated is kept: a plain hypercube balances each knob alone but can
        pair levels of two knobs (8 configs: adaln with learned positions 3 times, with none once),
        which confounds their marginal effects.
        """
        if not self.params:
            return [{} for _ in range(n)]
        from scipy.stats import qmc

        rng = np.random.default_rng(seed)
        try:
            sampler = qmc.LatinHypercube(d=len(self.params), rng=rng)
        except TypeError:  # scipy < 1.15 names it `seed`
            sampler = qmc.LatinHypercube(d=len(self.params), seed=rng)
        if not n:
            return []
        candidates = [sampler.random(n) for _ in range(LHS_CANDIDATES)]
        units = min(candidates, key=self._max_correlation)
        return [self.assign(lambda i, p: p.from_unit(float(row[i]))) for row in units]

    def _max_correlation(self, units: np.ndarray) -> float:
        """Largest |Pearson correlation| between two columns, categorical columns as level indices."""
        columns = []
        for i, p in enumerate(self.params):
            u = units[:, i]
            columns.append(np.minimum((u * len(p.choices)).astype(int), len(p.choices) - 1)
                           if p.kind == "categorical" else u)
        x = np.array([c for c in columns if np.ptp(c) > 0], dtype=float)
        if len(x) < 2:
            return 0.0
        corr = np.corrcoef(x)
        return float(np.abs(corr[~np.eye(len(x), dtype=bool)]).max())

    def max_value(self, name: str) -> Any:
        """Largest value a field takes in this space (fixed value or default when not searched)."""
        vals = [p.ends()[1] for p in self.params if p.field == name and p.kind != "categorical"]
        vals += [max(p.choices) for p in self.params if p.field == name and p.kind == "categorical"]
        return max(vals) if vals else self.base_values()[name]


# --------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------
def parse_space(name: str, raw: Mapping[str, Any]) -> Space:
    """Build and validate a space from its mapping form (YAML or a built-in)."""
    if not isinstance(raw, Mapping):
        raise SpaceError(f"space {name!r} must be a mapping with keys {', '.join(_SPACE_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SPACE_KEYS))
    if unknown:
        raise SpaceError(f"space {name!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(_SPACE_KEYS)}")
    counts = dict(raw.get("counts") or {})
    bad = sorted(set(counts) - set(COUNT_KEYS))
    if bad:
        raise SpaceError(f"space {name!r}: unknown count(s) {', '.join(map(repr, bad))}; allowed: {', '.join(COUNT_KEYS)}")
    for key, value in counts.items():
        if type(value) is not int or value < (1 if key == "repeats" else 0):
            raise SpaceError(f"space {name!r}: counts.{key}={value!r} must be an int >= {1 if key == 'repeats' else 0}")
    baselines = tuple(raw.get("baselines") or ())
    for b in baselines:
        if b not in BASELINES:
            raise SpaceError(f"space {name!r}: baseline {b!r} is not one of {', '.join(BASELINES)}")
    fixed = dict(raw.get("fixed") or {})
    _check_fields(name, "fixed", fixed)
    try:
        TrialConfig.from_dict(fixed)
    except ValueError as exc:
        raise SpaceError(f"space {name!r}: fixed values are not a valid TrialConfig: {exc}") from None
    parsed = [_parse_param(name, key, spec) for key, spec in (raw.get("params") or {}).items()]
    params = _in_dependency_order(name, [_with_knob_conditions(name, p, parsed, fixed) for p in parsed])
    space = Space(name=name, description=str(raw.get("description") or ""),
                  datasets=tuple(str(d) for d in raw.get("datasets") or ()), baselines=baselines,
                  fixed=fixed, params=params, **counts)
    validate_space(space)
    return space


def _check_fields(space: str, where: str, names: Sequence[str], knobs_only: bool = False) -> None:
    known = list(KNOBS) if knobs_only else field_names()
    for n in names:
        if n in SWEEP_FIELDS:
            raise SpaceError(f"space {space!r}: {where} sets {n!r}, which the sweep sets per trial "
                             "(--datasets, --data-dir, --seed, --metric, baselines); remove it from the space")
        if n not in known:
            what = "knobs (`python -m adrec knobs`)" if knobs_only else "TrialConfig fields"
            raise SpaceError(f"space {space!r}: {where} names unknown {'knob' if knobs_only else 'field'} {n!r}; "
                             f"{what}: {', '.join(known)}")


def _parse_param(space: str, key: str, spec: Any) -> Param:
    spec = {} if spec is None else spec
    if not isinstance(spec, Mapping):
        raise SpaceError(f"space {space!r}: param {key!r} must be a mapping like {{low: 1, high: 10}}, "
                         f"{{choices: [a, b]}} or {{}} (the knob's own range); got {spec!r}")
    unknown = sorted(set(spec) - set(_PARAM_KEYS))
    if unknown:
        raise SpaceError(f"space {space!r}: param {key!r} has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(_PARAM_KEYS)}")
    fname = spec.get("field", key)
    _check_fields(space, f"param {key!r}", [fname], knobs_only=True)
    knob = KNOBS[fname]
    when = tuple((str(f), tuple(v if isinstance(v, (list, tuple)) else [v]))
                 for f, v in (spec.get("when") or {}).items())
    _check_fields(space, f"param {key!r} when", [f for f, _ in when])
    if knob.kind in ("categorical", "bool"):
        if any(k in spec for k in ("low", "high", "log", "step", "type")):
            raise SpaceError(f"space {space!r}: param {key!r} sets the categorical knob {fname!r}; give "
                             f"choices: [...] (or nothing: all of {', '.join(map(str, knob.choices))}) instead of a range")
        choices = tuple(spec["choices"] if "choices" in spec else knob.choices)
        if not choices:
            raise SpaceError(f"space {space!r}: param {key!r} has no choices")
        for c in choices:
            if c not in knob.choices:
                raise SpaceError(f"space {space!r}: param {key!r} choice {c!r} is not one of "
                                 f"{', '.join(map(str, knob.choices))}")
        return Param(key, fname, "categorical", choices=choices, when=when)
    if "choices" in spec:
        raise SpaceError(f"space {space!r}: param {key!r} gives choices for the numeric knob {fname!r}; give "
                         f"low/high (or nothing: {knob.low}..{knob.high}, {knob.scale})")
    kind = spec.get("type", knob.kind)
    if kind not in ("int", "float") or (knob.kind == "int" and kind != "int"):
        raise SpaceError(f"space {space!r}: param {key!r} type={kind!r} does not fit knob {fname!r} "
                         f"({knob.kind}); use type: {knob.kind}")
    low, high = spec.get("low", knob.low), spec.get("high", knob.high)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise SpaceError(f"space {space!r}: param {key!r} needs finite numbers low and high; got low={low!r}, high={high!r}")
    if not low < high:
        raise SpaceError(f"space {space!r}: param {key!r} range low={low} .. high={high} is empty; "
                         "make low < high (or fix the value under `fixed`)")
    step = spec.get("step")
    log = bool(spec.get("log", knob.scale == "log" and step is None))
    if log and low <= 0:
        raise SpaceError(f"space {space!r}: param {key!r} has log: true with low={low}; a log range needs low > 0")
    if step is not None and (kind != "int" or type(step) is not int or step < 1 or log):
        raise SpaceError(f"space {space!r}: param {key!r} step={step!r} needs an int range without log")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise SpaceError(f"space {space!r}: param {key!r} is an int range; low={low} and high={high} must be whole")
    return Param(key, fname, kind, low=low, high=high, log=log, step=step, when=when)


def _with_knob_conditions(space: str, p: Param, params: Sequence[Param], fixed: Mapping[str, Any]) -> Param:
    """Add the knob's own activity condition to the param's `when`, so it is sampled only where active.

    A condition on a field the space sets (a param or `fixed`) joins `when` (intersected with a
    `when` the space gave); one on a field left at its default is checked now: a knob that is inactive
    at that default is never active, which is an error rather than a silently wasted dimension.
    """
    when = dict(p.when)
    searched: dict[str, set[Any]] = {}
    for q in params:
        searched.setdefault(q.field, set()).update(q.choices)
    for field_name, allowed in KNOBS[p.field].when:
        if field_name in searched:
            when[field_name] = tuple(v for v in when.get(field_name, allowed)
                                     if v in allowed and v in searched[field_name])
            continue
        value = fixed.get(field_name, getattr(TrialConfig(), field_name))
        if value not in allowed:
            where = "fixes" if field_name in fixed else "leaves at its default"
            raise SpaceError(f"space {space!r}: param {p.name!r} is never active: {p.field} only matters with "
                             f"{KNOBS[p.field].describe_when()}, and the space {where} {field_name}={value!r}; "
                             f"search {field_name} too or drop {p.name!r}")
    if any(not allowed for allowed in when.values()):
        raise SpaceError(f"space {space!r}: param {p.name!r} is never active: its `when` excludes every value "
                         f"where {p.field} matters ({KNOBS[p.field].describe_when()})")
    return dataclasses.replace(p, when=tuple(when.items()))


def _in_dependency_order(space: str, params: list[Param]) -> tuple[Param, ...]:
    """The params, stably reordered so each comes after every param that sets a field its `when` reads."""
    setters: dict[str, set[str]] = {}
    for p in params:
        setters.setdefault(p.field, set()).add(p.name)
    ordered: list[Param] = []
    remaining = list(params)
    while remaining:
        placed = {q.name for q in ordered}
        ready = next((p for p in remaining
                      if all(setters.get(f, set()) - {p.name} <= placed for f, _ in p.when)), None)
        if ready is None:
            names = ", ".join(p.name for p in remaining)
            raise SpaceError(f"space {space!r}: params {names} depend on each other through `when`; "
                             "a condition may only read fields that other params set first")
        ordered.append(ready)
        remaining.remove(ready)
    return tuple(ordered)


def validate_space(space: Space) -> None:
    """Reject a space that could sample an invalid TrialConfig, before any trial starts.

    Optuna names must be unique; a field set by two params needs exclusive `when`s; `when` may only
    look at categorical/fixed fields set earlier. Then configs with the numeric knobs at their
    ends are built as TrialConfigs (`_corners`), so a range that breaks a combination (e.g. a
    schedule whose betas leave (0, 1] at the smallest T) is named here instead of crashing a trial.
    """
    names = [p.name for p in space.params]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpaceError(f"space {space.name!r}: param name(s) {', '.join(dupes)} appear twice; give each branch its own name")
    settable = set(space.fixed)
    for p in space.params:
        for f, _ in p.when:
            if f not in settable:
                raise SpaceError(f"space {space.name!r}: param {p.name!r} depends on {f!r}, which no earlier "
                                 "categorical param or `fixed` sets; move it below that param")
        if p.kind == "categorical":
            settable.add(p.field)
    seen: set[str] = set()
    for values in _corners(space):
        key = repr(sorted(values.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            TrialConfig.from_dict({**space.fixed, **values})
        except ValueError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise SpaceError(f"space {space.name!r} can sample an invalid config ({shown}): {exc}. Narrow the "
                             "range, add a `when` condition, or split the knob into per-branch params") from None


def _corners(space: Space) -> typing.Iterator[dict[str, Any]]:
    """Configs with every numeric knob at one of its ends: all of them when there are few, else a seeded
    random set. Constraints are monotone in the numeric knobs, so the ends are where ranges break; with
    ~1000 random corners every pair and triple of (choice, end) shows up with near certainty (a triple
    of 7 x 2 x 2 levels is missed with probability (1 - 1/28)^1000 < 1e-15)."""
    branches = list(_branches(space))
    total = sum(2 ** len(nums) for _, nums in branches)
    if total <= _MAX_VALIDATION_CONFIGS:
        for cats, nums in branches:
            for ends in itertools.product((0, 1), repeat=len(nums)):
                yield {**cats, **{p.field: p.ends()[e] for p, e in zip(nums, ends)}}
        return
    rng = random.Random(0)
    for _ in range(_MAX_VALIDATION_CONFIGS):
        yield space.assign(lambda _, p: rng.choice(p.choices) if p.kind == "categorical"
                           else p.ends()[rng.randrange(2)])


def _branches(space: Space) -> typing.Iterator[tuple[dict[str, Any], list[Param]]]:
    """Every combination of categorical choices reachable under the `when`s, with its numeric params."""
    base = space.base_values()

    def walk(i: int, values: dict[str, Any], cats: dict[str, Any], nums: list[Param]):
        if i == len(space.params):
            yield cats, nums
            return
        p = space.params[i]
        if not p.active(values):
            yield from walk(i + 1, values, cats, nums)
            return
        if p.field in cats or any(q.field == p.field for q in nums):
            raise SpaceError(f"space {space.name!r}: field {p.field!r} is set by two params in one branch "
                             f"({p.name!r} and an earlier one); make their `when` conditions exclusive")
        if p.kind == "categorical":
            for c in p.choices:
                yield from walk(i + 1, {**values, p.field: c}, {**cats, p.field: c}, nums)
        else:
            yield from walk(i + 1, values, cats, nums + [p])

    yield from walk(0, base, {}, [])


# --------------------------------------------------------------------------------------------------
# Built-in spaces
# --------------------------------------------------------------------------------------------------
ALL_DATASETS = tuple(REGISTRY)

FULL: dict[str, Any] = {
    "description": "every design choice the mission names, on all six datasets",
    "datasets": list(ALL_DATASETS),
    "counts": {"paired_samples": 32, "repeats": 3, "num_samples": 48, "confirm_top": 3},
    "baselines": ["most_popular", "sasrec"],
    "fixed": {"stage3_epochs": 200},
    "params": {
        # Ranges, scales and activity conditions are the knobs' own (adrec.config.KNOBS).
        "noise_schedule": {},
        "beta_a": {},
        "beta_b": {},
        "diffusion_steps": {},
        "stage_plan": {},
        "stage1_epochs": {},
        "stage2_epochs": {},
        "positional_encoding": {},
        "noise_level": {},
        "denoiser": {},
        "aggregation": {"when": {"denoiser": ["transformer"]}},
        # An MLP has no attention to cross-attend with and no norm to modulate: its own branch.
        "aggregation_mlp": {"field": "aggregation", "choices": ["linear", "concat"], "when": {"denoiser": ["mlp"]}},
        "lambda_uncertainty": {},
        "mse_weight": {},
        "lr": {},
        # The authors' behaviour vs each correction (README's deviation table): cheap to search, so the
        # sweep itself answers whether a correction matters.
        "warmup_embedding": {},
        "selection": {},
        "loss_combination": {},
        "score_padding_item": {},
    },
}

PAPER: dict[str, Any] = {
    "description": "the authors' defaults over seeds: the reference point for every other config",
    "datasets": list(ALL_DATASETS),
    "counts": {"paired_samples": 1, "repeats": 5, "num_samples": 0, "confirm_top": 0},
    "baselines": ["most_popular", "sasrec"],
    "fixed": {},
    "params": {},
}

# README's main job: a small real study on ml-100k in ~10 minutes on a 2-core machine. 12 configs from a
# decorrelated Latin hypercube (6 per level of each two-level knob: the analysis ranks a level seen in
# >= 5 configs and fits a dataset with >= 12; MSE weight is continuous, so no two configs are equal),
# each trained once at `python -m adrec train --quick`'s settings (adrec.cli.QUICK: short stages,
# batches of 64); the 4 best re-run with a fresh seed (the confirm phase), which gives the seed-noise
# floor; most_popular as the level to beat. The knobs act after stage 1, so the stage-1 cache trains it
# once per seed. No optimise phase: a few TPE trials would show nothing.
SMOKE: dict[str, Any] = {
    "description": "ml-100k, 12 configs at short epochs, the best 4 re-run with a fresh seed: do aggregation, "
                   "positional encoding, noise level and MSE weight matter early in training? (~10 min on 2 cores)",
    "datasets": ["ml-100k"],
    "counts": {"paired_samples": 12, "repeats": 1, "num_samples": 0, "confirm_top": 4},
    "baselines": ["most_popular"],
    "fixed": dict(QUICK),
    "params": {
        "aggregation": {"choices": ["linear", "adaln"]},
        "positional_encoding": {"choices": ["none", "learned"]},
        "noise_level": {},
        "mse_weight": {},
    },
}

BUILTIN: dict[str, dict[str, Any]] = {"full": FULL, "paper": PAPER, "smoke": SMOKE}


def load_space(name_or_path: str) -> Space:
    """A built-in space by name, or a YAML file by path; validated before it is returned."""
    if name_or_path in BUILTIN:
        return parse_space(name_or_path, BUILTIN[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise SpaceError(f"space file {str(path)!r} does not exist; give a path to a YAML space or one "
                             f"of the built-in spaces: {', '.join(BUILTIN)}")
        import yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SpaceError(f"space file {str(path)!r} is not valid YAML: {exc}") from None
        return parse_space(path.stem, raw)
    raise SpaceError(f"unknown space {name_or_path!r}; use one of {', '.join(BUILTIN)} or a path to a .yaml file")


__all__ = ["ALL_DATASETS", "BASELINES", "BUILTIN", "Param", "SWEEP_FIELDS", "Space", "SpaceError",
           "load_space", "parse_space", "validate_space"]
