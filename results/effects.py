"""Per dataset: the level model, interactions, adjusted effects and their verdicts.

One `DatasetFit` per dataset holds the level model (`results.model`) of the seed-averaged metric of
its paired configs: every knob that varies there, plus the pairwise interactions that pass the
screen below, all fitted once and bootstrapped once over configs. Everything per dataset is read
off that one fit:

- a knob's *effect*: the range of its adjusted level means (partial dependence), with an
  interval simultaneous over all its level pairs (bootstrap max-|t|);
- *interactions*: each pair of knobs is screened by the F-test of adding its interaction block to
  the additive model (Holm over all pairs of the dataset); a pair is kept when it is significant
  AND its largest difference-in-differences exceeds the seed-noise floor; kept pairs enter the
  model, and a knob's *conditional* effect at each level of its partner is reported;
- a conditional knob (lambda_uncertainty needs aggregation=linear) is analysed only on the configs
  where it is active: nested coding in the model, and its partial dependence averages over those
  configs only;
- a sweep too small for every knob at once screens knobs forward by F-test and reads each other
  knob from the screened model plus itself (`screened_models`).

The verdict words (`judge`):
- matters: the simultaneous 95% interval of the effect excludes 0 AND the effect exceeds the
  seed-noise floor (the standard deviation of one run when only its seed changes);
- depends on J: not so on average, but it matters at some level of the knob J it interacts with;
- small: the interval excludes 0 but the effect is below the floor (a real, small effect);
- equivalent: the interval includes 0 and lies inside +/- the floor (two one-sided tests);
- not detected: none of these; the interval's upper end says how large the effect could be.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import f as f_dist

from results import model as lm
from results.knobs import Levels, by_name

ALPHA = 0.05
MIN_UNITS_PER_LEVEL = 5  # a level seen in fewer configs is modelled but never ranked
MIN_CONFIGS = 12  # a dataset with fewer paired configs gets no model
MAX_PAIRS = 3  # interaction blocks added to one dataset's model (the largest kept pairs)
MIN_CELL = 3  # an interaction cell seen in fewer configs does not count towards its size
MAX_CANDIDATES = 5  # significant pairs tried per selection step (by p-value) for their size
WORDS = ("matters", "depends", "equivalent", "small", "not detected")


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends on the seed and the keys only, not on the order of the loop."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def judge(effect: float, low: float, high: float, floor: float) -> tuple[str, str]:
    """The report's rule for one effect (>= 0) with its simultaneous interval [low, high]."""
    known = not np.isnan(floor)
    if low > 0 and (not known or effect > floor):
        why = f"interval [{low:.4g}, {high:.4g}] excludes 0"
        return "matters", why + (f" and effect {effect:.4g} > seed noise {floor:.4g}" if known
                                 else " (seed-noise floor unknown)")
    if low > 0:
        return "small", f"interval excludes 0 but effect {effect:.4g} <= seed noise {floor:.4g}"
    if known and high < floor:
        return "equivalent", f"interval [{low:.4g}, {high:.4g}] inside +/- seed noise {floor:.4g}"
    return "not detected", f"no effect detected (could be up to {high:.4g})"


@dataclass
class DatasetFit:
    dataset: str
    floor: float
    units: pd.DataFrame  # this dataset's paired configs (one row each)
    levels: dict[str, Levels]
    model: lm.LevelModel | None
    additive: lm.LevelModel | None = None  # without interactions: the pair screen's baseline
    eligible: dict[str, list[int]] = field(default_factory=dict)  # rankable levels per knob
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # every screened pair
    tss: float = np.nan
    # the model each knob is read from: `model` itself, except in a small sweep where a knob
    # left out of the screened model gets that model plus itself (see `fit_dataset`)
    models: dict[str, lm.LevelModel] = field(default_factory=dict)

    @property
    def knobs(self) -> list[str]:
        return list(self.models)

    def m(self, knob: str) -> lm.LevelModel:
        return self.models[knob]

    def label(self, knob: str, code: int) -> str:
        return self.levels[knob].order[code]


def _numeric_values(levels: Levels, part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """A binned knob's standardised value per row (on its scale) and per level, else None."""
    if not levels.binned:
        return None
    knob = by_name(levels.knob)
    raw = pd.to_numeric(part[levels.knob], errors="coerce").to_numpy(float)
    reps = np.array([levels.x[lv] for lv in levels.order], dtype=float)
    if knob.scale == "log":
        raw, reps = np.log10(np.where(raw > 0, raw, np.nan)), np.log10(reps)
    on = np.isfinite(raw)
    if on.sum() < 3:
        return None
    centre, spread = np.nanmean(raw), np.nanstd(raw) or 1.0
    return np.where(on, (raw - centre) / spread, 0.0), (reps - centre) / spread


def fit_dataset(dataset: str, units: pd.DataFrame, levels: dict[str, Levels], metric: str,
                cost_metrics: list[str], floor: float, n_boot: int, seed: int) -> DatasetFit:
    """Fit, screen interactions, refit with the kept pairs and bootstrap (module docstring)."""
    part = units[units["dataset"] == dataset]
    fit = DatasetFit(dataset, floor, part, levels, None)
    codes, n_levels, values, level_values = {}, {}, {}, {}
    for name, lev in levels.items():
        c = lev.codes(part.index)
        counts = np.bincount(c[c >= 0], minlength=len(lev.order))
        if (counts > 0).sum() >= 2:
            codes[name], n_levels[name] = c, len(lev.order)
            numeric = _numeric_values(lev, part)
            if numeric is not None:
                values[name], level_values[name] = numeric
    y = part[metric].to_numpy(float)
    if len(part) < MIN_CONFIGS or not codes:
        warnings.warn(f"dataset {dataset!r} has {len(part)} completed paired configs; the level "
                      f"model needs at least {MIN_CONFIGS}, so effects there are not estimated",
                      stacklevel=2)
        return fit
    additive = choose_model(codes, n_levels, y, values, level_values)
    fit.tss = float(np.sum((y - y.mean()) ** 2))
    fit.additive = additive
    if len(y) - additive.p >= additive.p:
        fit.pairs, pairs = select_pairs(additive, floor)
        fit.model = lm.refit(additive, pairs) if pairs else additive
        fit.models = {name: fit.model for name in codes}
    else:
        fit.model, fit.models, chosen = screened_models(codes, n_levels, y, values, level_values)
        warnings.warn(f"dataset {dataset!r}: {len(y)} paired configs for {additive.p} model "
                      "terms; each knob is adjusted only for the knobs a forward F-screen keeps "
                      f"({', '.join(chosen) or 'none'}), and interactions are not screened "
                      "(sample more paired configs for the full model)", stacklevel=2)
    weights = lm.bootstrap_weights(len(y), n_boot, rng_for(seed, dataset))
    for model in {id(m): m for m in fit.models.values()}.values():
        lm.bootstrap(model, weights)
        for m in cost_metrics:
            if m in part:
                lm.add_metric(model, m, part[m].to_numpy(float))
    for name, c in codes.items():
        model = fit.m(name)
        specs = set(model.specs)
        counts = np.bincount(c[c >= 0], minlength=n_levels[name])
        fit.eligible[name] = [lv for lv in range(n_levels[name])
                              if counts[lv] >= MIN_UNITS_PER_LEVEL
                              and (lv == model.ref[name] or ("main", name, lv) in specs
                                   or ("slope", name) in specs)]
    return fit


def screened_models(codes: dict[str, np.ndarray], n_levels: dict[str, int], y: np.ndarray,
                    values: dict[str, np.ndarray], level_values: dict[str, np.ndarray]
                    ) -> tuple[lm.LevelModel, dict[str, lm.LevelModel], list[str]]:
    """For a sweep too small for every knob at once: forward selection of knobs (the F-test of
    adding each knob's block, p < 0.05, while the residual degrees of freedom stay >= 10 and
    >= half the terms), numeric knobs by their quadratic trend; then each knob left out is read
    from the selected model plus itself, so its effect is still adjusted for the knobs that
    matter. Returns (the selected model, the model of each knob, the selected knobs)."""
    def model_of(names: list[str]) -> lm.LevelModel:
        return lm.fit({k: codes[k] for k in names}, {k: n_levels[k] for k in names}, y,
                      values={k: values[k] for k in names if k in values},
                      level_values={k: level_values[k] for k in names if k in level_values},
                      numeric_bins=False)

    n, chosen = len(y), []
    current: lm.LevelModel | None = None
    rss0, p0 = float(np.sum((y - y.mean()) ** 2)), 1
    while True:
        best, best_p = None, ALPHA
        for k in codes:
            if k in chosen:
                continue
            trial = model_of([*chosen, k])
            df1, df2 = trial.p - p0, n - trial.p
            if df1 <= 0 or df2 < max(10, trial.p // 2) or trial.rss <= 0:
                continue
            p = float(f_dist.sf(((rss0 - trial.rss) / df1) / (trial.rss / df2), df1, df2))
            if p < best_p:
                best, best_p, current = k, p, trial
        if best is None:
            break
        chosen.append(best)
        rss0, p0 = current.rss, current.p
    models = {k: current if k in chosen else model_of([*chosen, k]) for k in codes}
    base = current if current is not None else next(iter(models.values()))
    return base, models, chosen


def choose_model(codes: dict[str, np.ndarray], n_levels: dict[str, int], y: np.ndarray,
                 values: dict[str, np.ndarray], level_values: dict[str, np.ndarray]
                 ) -> lm.LevelModel:
    """The richest additive model the configs carry: numeric knobs as bins + a quadratic trend,
    else by the trend alone; the first whose residual degrees of freedom are at least its number
    of terms, else the smaller one (and `fit_dataset` screens knobs instead)."""
    candidates = [lm.fit(codes, n_levels, y, values=values, level_values=level_values)]
    if values:
        candidates.append(lm.fit(codes, n_levels, y, values=values, level_values=level_values,
                                 numeric_bins=False))
    for model in candidates:
        if len(y) - model.p >= model.p:
            return model
    return min(candidates, key=lambda m: m.p)


def did(gamma: np.ndarray) -> float:
    """Largest difference-in-differences of an interaction table (NaN cells ignored)."""
    best = 0.0
    for a in range(gamma.shape[0]):
        for b in range(a + 1, gamma.shape[0]):
            d = gamma[a] - gamma[b]
            if np.isfinite(d).sum() >= 2:
                best = max(best, float(np.nanmax(d) - np.nanmin(d)))
    return best


def screen_pairs(model: lm.LevelModel, skip: set[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """F-test of adding each pair's interaction block to `model`, Holm-adjusted over the pairs
    screened, with the share of the total variance the block explains."""
    knobs = list(model.codes)
    tss = float(np.sum((model.y - model.y.mean()) ** 2)) or 1.0
    screen = lm.PairScreen(model)
    rows = []
    for i, j in enumerate(knobs):
        for k in knobs[i + 1:]:
            if (j, k) in skip:
                continue
            rss1, df1 = screen.rss_with((j, k))
            df2 = model.n - model.p - df1
            if df1 == 0 or df2 < 2 or rss1 <= 0:
                continue
            F = ((model.rss - rss1) / df1) / (rss1 / df2)
            rows.append({"knob_a": j, "knob_b": k, "df": df1, "F": F,
                         "p_value": float(f_dist.sf(F, df1, df2)),
                         "share": (model.rss - rss1) / tss})
    out = pd.DataFrame(rows, columns=["knob_a", "knob_b", "df", "F", "p_value", "share"])
    out = out.sort_values("p_value", kind="stable").reset_index(drop=True)
    m = len(out)
    out["p_holm"] = np.minimum(1.0, np.maximum.accumulate(out["p_value"] * (m - np.arange(m)))) \
        if m else []
    out["significant"] = out["p_holm"] < ALPHA
    return out


def select_pairs(additive: lm.LevelModel, floor: float
                 ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Forward selection of interaction pairs: screen every pair against the current model, add
    the most significant one (Holm) whose largest difference-in-differences exceeds the floor,
    re-screen the rest, up to MAX_PAIRS. Re-screening keeps a knob merely correlated with a
    real interaction (a confounded knob) from being named as a partner.

    Returns (the first screen, with `did` and `kept` filled in, and the kept pairs in order).
    """
    first = screen_pairs(additive)
    first["did"], first["kept"] = np.nan, False
    kept: list[tuple[str, str]] = []
    current, screen = additive, first
    while len(kept) < MAX_PAIRS and len(screen):
        chosen = None
        for _, row in screen[screen["significant"]].head(MAX_CANDIDATES).iterrows():
            pair = (row["knob_a"], row["knob_b"])
            size = did(interaction_table(lm.refit(additive, [*kept, pair]), *pair))
            hit = (first["knob_a"] == pair[0]) & (first["knob_b"] == pair[1])
            first.loc[hit, "did"] = size
            if np.isnan(floor) or size > floor:
                chosen = pair
                first.loc[hit, ["kept", "share"]] = [True, row["share"]]
                break
        if chosen is None:
            break
        kept.append(chosen)
        current = lm.refit(additive, kept)
        screen = screen_pairs(current, set(kept))
    first = first.sort_values(["kept", "share"], ascending=False, kind="stable")
    return first.reset_index(drop=True), kept


def interaction_table(model: lm.LevelModel, j: str, k: str) -> np.ndarray:
    """gamma[a, b]: the pair's interaction coefficient (0 on reference rows/columns, NaN where
    the cell is not estimable or seen in fewer than MIN_CELL configs)."""
    gamma = np.full((model.n_levels[j], model.n_levels[k]), np.nan)
    gamma[model.ref[j], :] = 0.0
    gamma[:, model.ref[k]] = 0.0
    for col, spec in enumerate(model.specs):
        if spec[0] == "pair" and spec[1] == j and spec[3] == k:
            gamma[spec[2], spec[4]] = model.beta[col]
    # a cell seen in a handful of configs says little: its size is not taken at face value
    counts = np.zeros_like(gamma)
    both = (model.codes[j] >= 0) & (model.codes[k] >= 0)
    np.add.at(counts, (model.codes[j][both], model.codes[k][both]), 1)
    gamma[counts < MIN_CELL] = np.nan
    return gamma


# --- effects ----------------------------------------------------------------------------------

def _pair_family(fit: DatasetFit, knob: str, given: dict[str, int] | None = None
                 ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Contrast rows PD(knob=a) - PD(knob=b) for all eligible a < b (optionally at a partner's
    level), and the PD vectors of the eligible levels."""
    given = given or {}
    levels = fit.eligible.get(knob, [])
    vectors = np.array([fit.m(knob).pd_vector({knob: lv, **given}) for lv in levels])
    pairs = [(a, b) for a in range(len(levels)) for b in range(a + 1, len(levels))]
    C = np.array([vectors[a] - vectors[b] for a, b in pairs]) if pairs else np.zeros((0, 0))
    return pairs, C, vectors


def _range(sim: lm.Simultaneous, idx: list[int]) -> tuple[float, float, float]:
    """(effect, low, high) of the range max|d| over the contrasts `idx` of a simultaneous set."""
    est = np.abs(sim.estimate[idx])
    low = np.where(sim.estimate[idx] >= 0, sim.low[idx], -sim.high[idx]).clip(min=0)
    high = np.maximum(np.abs(sim.low[idx]), np.abs(sim.high[idx]))
    return float(est.max()), float(low.max()), float(high.max())


def knob_effect(fit: DatasetFit, knob: str) -> dict:
    """The adjusted effect of one knob on one dataset, with its verdict word and reason."""
    model = fit.m(knob)
    row = {"knob": knob, "dataset": fit.dataset, "noise_floor": fit.floor,
           "n_configs": int((model.codes[knob] >= 0).sum())}
    levels = fit.eligible.get(knob, [])
    row["levels"] = len(levels)
    if len(levels) < 2:
        return {**row, "word": "not detected",
                "reason": f"fewer than 2 levels with >= {MIN_UNITS_PER_LEVEL} configs"}
    pairs, C, vectors = _pair_family(fit, knob)
    sim = lm.simultaneous(model, C, ALPHA)
    pd_values = vectors @ model.beta
    best, worst = int(np.argmax(pd_values)), int(np.argmin(pd_values))
    effect, low, high = _range(sim, list(range(len(pairs))))
    word, reason = judge(effect, low, high, fit.floor)
    return {**row, "best_level": fit.label(knob, levels[best]), "best_mean": pd_values[best],
            "worst_level": fit.label(knob, levels[worst]), "worst_mean": pd_values[worst],
            "effect": effect, "ci_low": low, "ci_high": high, "ci_level": 1 - ALPHA,
            "word": word, "reason": reason}


def conditional_effects(fit: DatasetFit, knob: str, partner: str) -> pd.DataFrame:
    """The effect of `knob` at each level of `partner` (one simultaneous family over all)."""
    rows, families = [], []
    for a in fit.eligible.get(partner, []):
        pairs, C, _ = _pair_family(fit, knob, {partner: a})
        if len(pairs) and np.isfinite(C).all():
            families.append((a, C))
    if not families:
        return pd.DataFrame()
    model = fit.m(knob)
    sim = lm.simultaneous(model, np.vstack([C for _, C in families]), ALPHA)
    start = 0
    for a, C in families:
        idx = list(range(start, start + len(C)))
        start += len(C)
        effect, low, high = _range(sim, idx)
        word, reason = judge(effect, low, high, fit.floor)
        vectors = np.array([model.pd_vector({knob: lv, partner: a})
                            for lv in fit.eligible[knob]])
        best = fit.eligible[knob][int(np.argmax(vectors @ model.beta))]
        rows.append({"knob": knob, "dataset": fit.dataset, "partner": partner,
                     "partner_level": fit.label(partner, a), "best_level": fit.label(knob, best),
                     "effect": effect, "ci_low": low, "ci_high": high,
                     "word": word, "reason": reason})
    return pd.DataFrame(rows)


def partners(fit: DatasetFit, knob: str) -> list[str]:
    """The knobs `knob` interacts with in the model (kept pairs), largest share first."""
    if fit.pairs.empty:
        return []
    kept = fit.pairs[fit.pairs["kept"]]
    out = []
    for a, b in zip(kept["knob_a"], kept["knob_b"]):
        if (a, b) in fit.m(knob).pairs and knob in (a, b):
            out.append(b if a == knob else a)
    return out


def effects_table(fits: list[DatasetFit], knobs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per (knob, dataset) with its verdict, the conditional effects behind 'depends')."""
    rows, conditional = [], []
    for fit in fits:
        for knob in knobs:
            if knob not in fit.knobs:
                rows.append({"knob": knob, "dataset": fit.dataset, "noise_floor": fit.floor,
                             "word": "not varied", "reason": "does not vary on this dataset"
                             if fit.model is not None else "too few configs for the model"})
                continue
            row = knob_effect(fit, knob)
            row["depends_on"] = ""
            for partner in partners(fit, knob):
                cond = conditional_effects(fit, knob, partner)
                if cond.empty:
                    continue
                conditional.append(cond)
                hits = cond[cond["word"] == "matters"]
                row["depends_on"] = partner if not row["depends_on"] else row["depends_on"]
                if row["word"] != "matters" and len(hits):
                    row["word"] = "depends"
                    row["reason"] = (f"matters where {partner}=" + "|".join(hits["partner_level"])
                                     + f" (best {hits['best_level'].iloc[0]}); " + row["reason"])
                elif row["word"] == "equivalent":  # an interaction rules out equivalence
                    row["word"] = "not detected"
                    row["reason"] = (f"no effect detected (could be up to {row['ci_high']:.4g}"
                                     f"); not equivalent: it interacts with {partner}")
                break
            rows.append(row)
    columns = ["knob", "dataset", "n_configs", "levels", "best_level", "best_mean", "worst_level",
               "worst_mean", "effect", "ci_low", "ci_high", "ci_level", "noise_floor", "word",
               "depends_on", "reason"]
    out = pd.DataFrame(rows).reindex(columns=columns)
    out["matters"] = out["word"].isin(["matters", "depends"])
    cond = pd.concat(conditional, ignore_index=True) if conditional else pd.DataFrame(
        columns=["knob", "dataset", "partner", "partner_level", "best_level", "effect", "ci_low",
                 "ci_high", "word", "reason"])
    return out, cond


def level_table(fits: list[DatasetFit], effects: pd.DataFrame, cost_metrics: list[str]
                ) -> pd.DataFrame:
    """Per (knob, dataset, level): configs, raw and adjusted mean (95% interval), whether it is
    recommended (not worse than the best level by an effect that matters) and adjusted costs."""
    rows = []
    eff = effects.set_index(["knob", "dataset"])
    for fit in fits:
        for knob in fit.knobs:
            lev = fit.levels[knob]
            model = fit.m(knob)
            codes = model.codes[knob]
            y = model.y
            eligible = fit.eligible.get(knob, [])
            vectors = {lv: model.pd_vector({knob: lv}) for lv in range(len(lev.order))
                       if (codes == lv).any()}
            best = eff.loc[(knob, fit.dataset), "best_level"] if (knob, fit.dataset) in eff.index \
                else None
            worse = _clearly_worse(fit, knob, eligible) if len(eligible) >= 2 else {}
            for lv, c in vectors.items():
                boots = model.resamples(c)[:, 0]
                lo, hi = np.nanquantile(boots, [ALPHA / 2, 1 - ALPHA / 2])
                label = lev.order[lv]
                row = {"knob": knob, "dataset": fit.dataset, "level": label, "x": lev.x[label],
                       "binned": lev.binned, "n_configs": int((codes == lv).sum()),
                       "raw_mean": float(y[codes == lv].mean()), "mean": float(c @ model.beta),
                       "ci_low": lo, "ci_high": hi, "ranked": lv in eligible,
                       "best": label == best,
                       "recommended": lv in eligible and not worse.get(lv, False)}
                for m in cost_metrics:
                    if m in model.extra:
                        row[m] = float(c @ model.extra[m])
                rows.append(row)
    columns = ["knob", "dataset", "level", "x", "binned", "n_configs", "raw_mean", "mean",
               "ci_low", "ci_high", "ranked", "best", "recommended", *cost_metrics]
    return pd.DataFrame(rows).reindex(columns=columns)


def _clearly_worse(fit: DatasetFit, knob: str, eligible: list[int]) -> dict[int, bool]:
    """Level -> True when the best level beats it by an effect that matters (same family as
    the knob's effect, so the two agree)."""
    pairs, C, vectors = _pair_family(fit, knob)
    sim = lm.simultaneous(fit.m(knob), C, ALPHA)
    values = vectors @ fit.m(knob).beta
    b = int(np.argmax(values))
    out = {}
    for i, (x, z) in enumerate(pairs):
        if b not in (x, z):
            continue
        other = z if x == b else x
        diff = abs(sim.estimate[i])
        low = sim.low[i] if x == b else -sim.high[i]
        word, _ = judge(diff, low, np.inf, fit.floor)
        out[eligible[other]] = word == "matters"
    return out


def heatmap(fit: DatasetFit, j: str, k: str) -> pd.DataFrame:
    """Adjusted mean (partial dependence) of every (level of j, level of k) cell, with counts."""
    rows = []
    cj, ck = fit.model.codes[j], fit.model.codes[k]
    for a in range(fit.model.n_levels[j]):
        for b in range(fit.model.n_levels[k]):
            n = int(((cj == a) & (ck == b)).sum())
            if not (cj == a).any() or not (ck == b).any():
                continue
            value = fit.model.pd_vector({j: a, k: b}) @ fit.model.beta
            rows.append({"dataset": fit.dataset, "knob_a": j, "level_a": fit.label(j, a),
                         "knob_b": k, "level_b": fit.label(k, b), "mean": value, "n_configs": n})
    return pd.DataFrame(rows)


def variance_shares(fits: list[DatasetFit]) -> pd.DataFrame:
    """Functional-ANOVA variance shares of each dataset's level model, unnormalised: each
    knob's main effect (the variance over configs of its partial dependence at each config's
    level, Hooker's functional ANOVA on the empirical design), each kept interaction (the
    variance its block explains), the seed noise, and the rest (other interactions and lack of
    fit), all as fractions of the variance of the config means."""
    rows = []
    for fit in fits:
        if fit.model is None or not fit.tss:
            continue
        n = fit.model.n
        for knob in fit.knobs:
            model = fit.m(knob)
            X = model.matrix()
            codes = model.codes[knob]
            on = codes >= 0
            # the knob's own terms at each config's value, plus its interaction terms averaged
            # over the partner's configs (the partial dependence, at the config's own value)
            own = [i for i, sp in enumerate(model.specs)
                   if sp[0] in ("main", "slope", "curve") and sp[1] == knob]
            pair = [i for i, sp in enumerate(model.specs) if sp[0] == "pair" and knob in sp[1::2]]
            avg = {int(lv): float(model.pd_vector({knob: int(lv)})[pair] @ model.beta[pair])
                   for lv in np.unique(codes[on])}
            values = X[on][:, own] @ model.beta[own] + np.array([avg[c] for c in codes[on]])
            share = float(np.sum((values - values.mean()) ** 2) / fit.tss) if len(values) else 0.0
            rows.append({"dataset": fit.dataset, "component": knob, "kind": "main",
                         "share": share, "n_configs": int(on.sum())})
        for _, pair in fit.pairs[fit.pairs["kept"]].iterrows() if len(fit.pairs) else []:
            rows.append({"dataset": fit.dataset,
                         "component": f"{pair['knob_a']} x {pair['knob_b']}",
                         "kind": "interaction", "share": float(pair["share"]), "n_configs": n})
        seeds = fit.units["n_seeds"].to_numpy(float)
        noise = (fit.floor ** 2 * np.mean(1 / seeds) * (n - 1) / fit.tss
                 if not np.isnan(fit.floor) else np.nan)
        rows.append({"dataset": fit.dataset, "component": "seed noise", "kind": "noise",
                     "share": noise, "n_configs": n})
        explained = sum(r["share"] for r in rows if r["dataset"] == fit.dataset
                        and r["kind"] in ("main", "interaction"))
        rest = 1 - explained - (0 if np.isnan(noise) else noise)
        rows.append({"dataset": fit.dataset, "component": "other interactions and lack of fit",
                     "kind": "remainder", "share": max(0.0, rest), "n_configs": n})
    return pd.DataFrame(rows, columns=["dataset", "component", "kind", "share", "n_configs"])


def default_codes(fit: DatasetFit) -> dict[str, int]:
    """Level codes of the authors' default config (-1 where a knob is inactive at the default)."""
    defaults = {name: by_name(name).default for name in fit.knobs}
    codes = {}
    for name in fit.knobs:
        knob = by_name(name)
        if not knob.is_active(defaults):
            codes[name] = -1
            continue
        level = fit.levels[name].level_of(knob.default)
        codes[name] = fit.levels[name].order.index(level) if level is not None else -1
    return codes


def tunability(fits: list[DatasetFit]) -> pd.DataFrame:
    """Tunability as Probst, Boulesteix & Bischl (JMLR 2019) define it, from each dataset's
    model: the gain from tuning one knob with every other knob at the authors' default, with
    an interval simultaneous over the levels tried (bootstrap max-|t|)."""
    rows = []
    for fit in fits:
        if fit.model is None:
            continue
        base = default_codes(fit)
        for knob in fit.knobs:
            model = fit.m(knob)
            x0 = model.point_vector(base)
            row = {"knob": knob, "dataset": fit.dataset, "noise_floor": fit.floor}
            if base[knob] < 0:
                rows.append({**row, "word": "inactive at the default",
                             "default_level": None})
                continue
            levels = [lv for lv in fit.eligible.get(knob, []) if lv != base[knob]]
            if not levels:
                rows.append({**row, "default_level": fit.label(knob, base[knob]),
                             "word": "not estimated"})
                continue
            C = np.array([model.point_vector({**base, knob: lv}) - x0 for lv in levels])
            # one simultaneous family over the levels tried against the default, as for effects:
            # the best of several noisy gains is not taken at face value
            sim = lm.simultaneous(model, C, ALPHA)
            best = int(np.argmax(sim.estimate))
            gain = max(0.0, float(sim.estimate[best]))
            lo = max(0.0, float(np.max(sim.low)))
            hi = max(0.0, float(np.max(sim.high)))
            word, _ = judge(gain, lo, hi, fit.floor)
            rows.append({**row, "default_level": fit.label(knob, base[knob]),
                         "tuned_level": fit.label(knob, levels[best]) if gain > 0 else
                         fit.label(knob, base[knob]), "gain": gain, "ci_low": lo, "ci_high": hi,
                         "word": word})
    columns = ["knob", "dataset", "default_level", "tuned_level", "gain", "ci_low", "ci_high",
               "noise_floor", "word"]
    return pd.DataFrame(rows).reindex(columns=columns)
