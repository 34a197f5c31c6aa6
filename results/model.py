"""The level model of one dataset: the seed-averaged metric of each paired config as a sum of
per-knob level effects plus a few pairwise interactions, fitted by least squares, and its
bootstrap over configs.

Every knob's levels enter as treatment-coded dummies. A conditional knob's dummies are zero where
it is inactive, with an "active" column for the rows where it is, so its level effects are
estimated only from the configs where it does something (nested coding) and never move onto the
knob it depends on. Columns that add nothing to the span of earlier ones (a level that only ever
occurs with one level of another knob) are dropped once, on the full data.

What the report calls a knob's *adjusted* level mean is the model's partial dependence: the
prediction averaged over the configs where the knob is active, with the knob set to that level
and everything else as it was. Differences of adjusted means are therefore adjusted for every
other knob in the model (an unbalanced design cannot make a noise knob look like it matters),
and they are linear in the coefficients, so the bootstrap over configs only refits one small
least-squares problem per resample: all resamples at once as a batched weighted fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

# ("1",) | ("main", k, level) | ("slope", k) | ("curve", k) | ("active", k) | ("pair", j, a, k, b)
Spec = tuple
BOOT_CHUNK = 250  # resamples per batched solve (bounds memory: chunk x p x p floats)


def build_matrix(codes: dict[str, np.ndarray], values: dict[str, np.ndarray],
                 specs: list[Spec]) -> np.ndarray:
    """Design matrix of the rows described by `codes` (knob -> level index, -1 inactive) and
    `values` (numeric knob -> its standardised value on its scale)."""
    n = len(next(iter(codes.values()))) if codes else 0
    X = np.empty((n, len(specs)))
    for col, spec in enumerate(specs):
        if spec[0] == "1":
            X[:, col] = 1.0
        elif spec[0] == "main":
            X[:, col] = codes[spec[1]] == spec[2]
        elif spec[0] == "slope":
            X[:, col] = np.where(codes[spec[1]] >= 0, values[spec[1]], 0.0)
        elif spec[0] == "curve":
            X[:, col] = np.where(codes[spec[1]] >= 0, values[spec[1]] ** 2 - 1.0, 0.0)
        elif spec[0] == "active":
            X[:, col] = codes[spec[1]] >= 0
        else:
            _, j, a, k, b = spec
            X[:, col] = (codes[j] == a) & (codes[k] == b)
    return X


def candidate_specs(codes: dict[str, np.ndarray], n_levels: dict[str, int], ref: dict[str, int],
                    pairs: Iterable[tuple[str, str]] = (),
                    values: dict[str, np.ndarray] | None = None,
                    numeric_bins: bool = True) -> list[Spec]:
    specs: list[Spec] = [("1",)]
    for k, c in codes.items():
        if numeric_bins or not values or k not in values:
            specs += [("main", k, lv) for lv in range(n_levels[k])
                      if lv != ref[k] and (c == lv).any()]
        if values and k in values:
            specs += [("slope", k), ("curve", k)]
    # after every level column: where a knob is active only at one level of another (lambda
    # needs aggregation=linear), that level's own column is kept and the activity one dropped
    specs += [("active", k) for k, c in codes.items() if 0 < (c >= 0).sum() < len(c)]
    for j, k in pairs:
        for a in range(n_levels[j]):
            for b in range(n_levels[k]):
                if a != ref[j] and b != ref[k] and ((codes[j] == a) & (codes[k] == b)).any():
                    specs.append(("pair", j, a, k, b))
    return specs


def independent(X: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """Indices of the columns kept by a greedy Gram-Schmidt pass (each must add to the span)."""
    basis = np.empty((X.shape[0], 0))
    keep = []
    for col in range(X.shape[1]):
        x = X[:, col]
        norm = np.linalg.norm(x)
        if norm == 0:
            continue
        r = x - basis @ (basis.T @ x)
        r = r - basis @ (basis.T @ r)  # re-orthogonalise once: dummies are far from orthogonal
        rn = np.linalg.norm(r)
        if rn > tol * norm:
            keep.append(col)
            basis = np.column_stack([basis, r / rn])
    return np.array(keep, dtype=int)


@dataclass
class LevelModel:
    """A fitted level model of one dataset (see the module docstring)."""

    codes: dict[str, np.ndarray]
    values: dict[str, np.ndarray]  # numeric knobs: standardised value per row
    level_values: dict[str, np.ndarray]  # numeric knobs: standardised value of each level
    n_levels: dict[str, int]
    ref: dict[str, int]
    pairs: tuple[tuple[str, str], ...]
    specs: list[Spec]
    y: np.ndarray
    beta: np.ndarray
    rss: float
    boot: np.ndarray | None = None  # (B, p) coefficients of the resamples
    absent: np.ndarray | None = None  # (B, p) True where a column had no row in the resample
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other metrics' coefficients
    numeric_bins: bool = True  # False: numeric knobs by their trend terms only

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def p(self) -> int:
        return len(self.specs)

    def matrix(self, override: dict[str, int] | None = None,
               rows: np.ndarray | None = None) -> np.ndarray:
        """Design rows (all, or `rows`), with the knobs of `override` set to those levels (a
        numeric knob's value to its level's representative value)."""
        codes = self.codes if rows is None else {k: c[rows] for k, c in self.codes.items()}
        values = self.values if rows is None else {k: v[rows] for k, v in self.values.items()}
        if override:
            n = len(next(iter(codes.values())))
            codes = {**codes, **{k: np.full(n, v) for k, v in override.items()}}
            values = {**values, **{k: np.full(n, self.level_values[k][v] if v >= 0 else 0.0)
                                   for k, v in override.items() if k in self.level_values}}
        return build_matrix(codes, values, self.specs)

    def active_rows(self, *knobs: str) -> np.ndarray:
        mask = np.ones(self.n, dtype=bool)
        for k in knobs:
            mask &= self.codes[k] >= 0
        return mask

    def pd_vector(self, setting: dict[str, int]) -> np.ndarray:
        """c with c @ beta = the prediction averaged over the rows where every knob of `setting`
        is active, with those knobs set to the given levels (partial dependence)."""
        rows = self.active_rows(*setting)
        if not rows.any():
            return np.full(self.p, np.nan)
        return self.matrix(setting, rows).mean(axis=0)

    def point_vector(self, codes: dict[str, int]) -> np.ndarray:
        """c with c @ beta = the prediction for one config given by its level codes."""
        values = {k: np.array([self.level_values[k][v] if v >= 0 else 0.0])
                  for k, v in codes.items() if k in self.level_values}
        return build_matrix({k: np.array([v]) for k, v in codes.items()}, values, self.specs)[0]

    def estimate(self, C: np.ndarray, metric: str | None = None) -> np.ndarray:
        beta = self.beta if metric is None else self.extra[metric]
        return C @ beta

    def resamples(self, C: np.ndarray) -> np.ndarray:
        """(B, m) bootstrap values of the m contrasts in the rows of C; NaN in a resample that
        lacks a column a contrast uses (a level no resampled config has)."""
        assert self.boot is not None and self.absent is not None, "bootstrap() first"
        C = np.atleast_2d(C)
        values = self.boot @ C.T
        uses = np.abs(C) > 1e-12
        values[(self.absent.astype(np.int32) @ uses.T.astype(np.int32)) > 0] = np.nan
        return values


def fit(codes: dict[str, np.ndarray], n_levels: dict[str, int], y: np.ndarray,
        pairs: Iterable[tuple[str, str]] = (), values: dict[str, np.ndarray] | None = None,
        level_values: dict[str, np.ndarray] | None = None,
        numeric_bins: bool = True) -> LevelModel:
    """Least-squares fit; the reference level of each knob is its most frequent one.

    A binned numeric knob in `values` gets a linear and a quadratic term in its standardised
    value (on its scale) beside its level dummies (or instead of them, `numeric_bins=False`), so
    a smooth trend inside a bin is not left in the residual, where an unrelated knob sampled
    unevenly along it could pick it up.
    """
    values, level_values = values or {}, level_values or {}
    ref = {}
    for k, c in codes.items():
        counts = np.bincount(c[c >= 0], minlength=n_levels[k])
        ref[k] = int(np.argmax(counts))
    pairs = tuple(pairs)
    specs = candidate_specs(codes, n_levels, ref, pairs, values, numeric_bins)
    X = build_matrix(codes, values, specs)
    keep = independent(X)
    specs = [specs[i] for i in keep]
    X = X[:, keep]
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    rss = float(np.sum((y - X @ beta) ** 2))
    return LevelModel(codes, values, level_values, n_levels, ref, pairs, specs, y, beta, rss,
                      numeric_bins=numeric_bins)


def refit(model: LevelModel, pairs: Iterable[tuple[str, str]]) -> LevelModel:
    """The same data, knobs and terms with another set of interaction pairs."""
    return fit(model.codes, model.n_levels, model.y, pairs, model.values, model.level_values,
               model.numeric_bins)


class PairScreen:
    """RSS of a model refitted with one more block of columns, without refitting: the block is
    projected off the model's column space (one QR of the model) and the residual's projection
    on what is left is the RSS it removes."""

    def __init__(self, model: "LevelModel"):
        self.model = model
        X = build_matrix(model.codes, model.values, model.specs)
        self.q, _ = np.linalg.qr(X)
        self.resid = model.y - X @ model.beta

    def rss_with(self, pair: tuple[str, str]) -> tuple[float, int]:
        """(RSS, added independent columns) with the pair's interaction block added."""
        m = self.model
        j, k = pair
        extra = [s for s in candidate_specs({j: m.codes[j], k: m.codes[k]}, m.n_levels, m.ref,
                                            [pair]) if s[0] == "pair"]
        if not extra:
            return m.rss, 0
        Z = build_matrix(m.codes, m.values, extra)
        Z = Z - self.q @ (self.q.T @ Z)
        u, sv, _ = np.linalg.svd(Z, full_matrices=False)
        rank = int((sv > 1e-8 * max(1.0, np.sqrt(m.n))).sum())
        if rank == 0:
            return m.rss, 0
        gain = float(np.sum((u[:, :rank].T @ self.resid) ** 2))
        return m.rss - gain, rank


def add_metric(model: LevelModel, name: str, values: np.ndarray) -> None:
    """Fit the same design to another metric (rows with a missing value are left out)."""
    ok = np.isfinite(values)
    if ok.sum() <= model.p:
        return
    X = build_matrix(model.codes, model.values, model.specs)[ok]
    model.extra[name], *_ = np.linalg.lstsq(X, values[ok], rcond=None)


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) resample counts: each resample draws n configs with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap(model: LevelModel, weights: np.ndarray) -> None:
    """Refit the model on every resample given by `weights` (counts per config), in chunks."""
    X = build_matrix(model.codes, model.values, model.specs)
    n, p = X.shape
    outer = (X[:, :, None] * X[:, None, :]).reshape(n, p * p)
    Xy = X * model.y[:, None]
    present = (X != 0).astype(np.float64)
    boots, absent = [], []
    eye = np.eye(p)
    for start in range(0, len(weights), BOOT_CHUNK):
        W = weights[start:start + BOOT_CHUNK]
        G = (W @ outer).reshape(len(W), p, p)
        h = W @ Xy
        gone = (W @ present) == 0
        # a column no resampled config has is all zero in G and h: a 1 on its diagonal pins
        # its coefficient to 0 (it is marked absent, so no contrast uses it)
        G += gone[:, :, None] * eye[None]
        scale = np.einsum("bii->b", G) / p
        G += (1e-10 * scale)[:, None, None] * eye[None]
        boots.append(np.linalg.solve(G, h[:, :, None])[:, :, 0])
        absent.append(gone)
    model.boot = np.vstack(boots)
    model.absent = np.vstack(absent)


@dataclass(frozen=True)
class Simultaneous:
    """Estimates of m contrasts with simultaneous intervals (bootstrap max-|t|)."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    se: np.ndarray
    critical: float


def simultaneous(model: LevelModel, C: np.ndarray, alpha: float) -> Simultaneous:
    """Intervals est +/- c * se that hold together for all rows of C with probability 1 - alpha.

    se is each contrast's bootstrap standard deviation; c is the (1 - alpha) quantile over
    resamples of max_j |boot_j - est_j| / se_j (a bootstrap max-|t|, as in Tukey's or Dunnett's
    procedures). The critical value rests on the alpha tail of the resamples (100 of 2000 at 5%),
    not on a Bonferroni tail of a few, so a verdict does not move with the bootstrap seed.
    """
    C = np.atleast_2d(C)
    est = C @ model.beta
    values = model.resamples(C)
    se = np.nanstd(values, axis=0, ddof=1)
    ok = se > 0
    if not ok.any():
        return Simultaneous(est, est.copy(), est.copy(), se, 0.0)
    t = np.abs(values[:, ok] - est[ok]) / se[ok]
    t = np.where(np.isnan(t), -np.inf, t).max(axis=1)
    t = t[np.isfinite(t)]
    critical = float(np.quantile(t, 1 - alpha)) if len(t) else np.nan
    return Simultaneous(est, est - critical * se, est + critical * se, se, critical)
