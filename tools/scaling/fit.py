"""Fit scaling laws to (N, D, loss) points, as Hoffmann et al. (2022) do.

Approach 2 (IsoFLOP profiles): per compute budget, a parabola of loss in ln N; its minimum gives
N_opt(C) (and D_opt(C) from the budget's own N-D relation); power laws N_opt ∝ C^a, D_opt ∝ C^b
through the minima.

Approach 3 (parametric): L(N, D) = E + A / N^α + B / D^β, fitted with the prediction in
log-sum-exp form, log L̂ = LSE(log A − α ln N, log B − β ln D, log E), and a Huber loss on
log L̂ − log L, each point's weighted by its budget (``FitOptions``), summed over points (a
mean-reduced objective or loose tolerances stall L-BFGS near its start), minimised by L-BFGS from
the best initialisations of Hoffmann's grid (α, β ∈ {0, 0.5, …, 2}, log E ∈ {−1, −0.5, …, 1},
log A, log B ∈ {0, 5, …, 25}).
Under C = 6ND the compute-optimal allocation is N_opt = G (C/6)^a, D_opt = G⁻¹ (C/6)^b with
a = β/(α+β), b = α/(α+β), G = (αA / βB)^(1/(α+β)).

Intervals: bootstrap over points (resampled with replacement), 2.5th and 97.5th percentiles.
"""

from __future__ import annotations

import csv
import itertools
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from trainer.errors import DataError

GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
}
PARAMS = ("E", "A", "B", "alpha", "beta", "a", "b")
# Box for L-BFGS-B in (log E, log A, log B, alpha, beta): wide around Hoffmann's grid, and it
# keeps a degenerate resample (points that do not constrain a term) from overflowing exp().
BOUNDS = [(-10.0, 10.0), (-10.0, 60.0), (-10.0, 60.0), (0.0, 5.0), (0.0, 5.0)]


@dataclass(frozen=True)
class FitOptions:
    """How Approach 3 is fitted. The defaults are the choices that predicted the Chinchilla points
    of larger budgets best (docs/scaling.md, "Back-tested fits", measures each one)."""

    huber_delta: float = 1e-2
    """Huber δ on log-loss residuals. Hoffmann et al.'s 1e-3 turns residuals above 0.1 % into an
    absolute loss, and a fit on few budgets then follows a handful of points."""
    budget_weight: float = 0.3
    """A point's residual weighs (C / C_max)^w: the law's three terms describe large budgets
    better than small ones, whose finite-size deviations should not set the extrapolation. 0 weighs
    all points alike."""
    min_tokens_per_param: float = 1.5
    """Points trained on fewer tokens per parameter are left out of the fit (see ``in_regime``);
    a back-test still predicts them."""


@dataclass
class Points:
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray

    def __len__(self) -> int:
        return len(self.N)

    def take(self, idx: np.ndarray) -> Points:
        return Points(self.N[idx], self.D[idx], self.loss[idx], self.C[idx])


def _grid() -> np.ndarray:
    """Initialisations as rows (e, a, b, alpha, beta)."""
    g = GRID
    return np.array(list(itertools.product(g["e"], g["a"], g["b"], g["alpha"], g["beta"])))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _weights(pts: Points, budget_weight: float) -> np.ndarray:
    return (pts.C / pts.C.max()) ** budget_weight


def _objective(theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray,
               delta: float, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted sum of the Huber loss of log-space residuals, and its gradient in
    (e, a, b, alpha, beta)."""
    e, a, b, alpha, beta = theta
    terms = np.stack([a - alpha * lnN, b - beta * lnD, np.full_like(lnN, e)])
    pred = logsumexp(terms, axis=0)
    r = pred - lnL
    value = (w * _huber(r, delta)).sum()
    dr = w * np.where(np.abs(r) <= delta, r, delta * np.sign(r))
    w = np.exp(terms - pred)  # softmax weights: d pred / d term
    grad = np.array([(dr * w[2]).sum(), (dr * w[0]).sum(), (dr * w[1]).sum(),
                     (dr * w[0] * -lnN).sum(), (dr * w[1] * -lnD).sum()])
    return float(value), grad


def _objective_many(thetas: np.ndarray, lnN, lnD, lnL, delta: float, w: np.ndarray) -> np.ndarray:
    """The objective at many parameter rows at once (to rank the initialisation grid)."""
    e, a, b, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * lnN, b - beta * lnD, np.broadcast_to(e, (len(thetas), len(lnN)))])
    return (w * _huber(logsumexp(terms, axis=0) - lnL, delta)).sum(1)


def fit_approach3(pts: Points, starts: int = 64, extra_starts: list[np.ndarray] = (),
                  opts: FitOptions = FitOptions()) -> dict[str, float]:
    """L(N, D) = E + A/N^α + B/D^β by L-BFGS from the ``starts`` best grid initialisations."""
    lnN, lnD, lnL = np.log(pts.N), np.log(pts.D), np.log(pts.loss)
    w, delta = _weights(pts, opts.budget_weight), opts.huber_delta
    grid = _grid()
    order = np.argsort(_objective_many(grid, lnN, lnD, lnL, delta, w))[:starts]
    best = None
    for x0 in [*grid[order], *extra_starts]:
        res = minimize(_objective, x0, args=(lnN, lnD, lnL, delta, w), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                       options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20})
        if best is None or res.fun < best.fun:
            best = res
    e, a, b, alpha, beta = best.x
    out = {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta,
           "objective": float(best.fun), "theta": best.x.tolist()}
    s = alpha + beta
    out["a"], out["b"] = (beta / s, alpha / s) if s > 0 else (float("nan"), float("nan"))
    return out


def law(p: dict[str, float], N, D):
    return p["E"] + p["A"] / np.asarray(N, float) ** p["alpha"] + p["B"] / np.asarray(D, float) ** p["beta"]


def optimal_allocation(p: dict[str, float], C: float) -> dict[str, float]:
    """N_opt, D_opt and the predicted loss at budget C under C = 6ND."""
    alpha, beta = p["alpha"], p["beta"]
    G = (alpha * p["A"] / (beta * p["B"])) ** (1 / (alpha + beta))
    n = G * (C / 6) ** p["a"]
    d = (C / 6) ** p["b"] / G
    return {"N_opt": float(n), "D_opt": float(d), "loss": float(law(p, n, d))}


def budgets_of(pts: Points) -> list[np.ndarray]:
    """Indices of the points of each compute budget (budgets equal within 5 %)."""
    order = np.argsort(pts.C)
    groups: list[list[int]] = []
    for i in order:
        if groups and pts.C[i] <= pts.C[groups[-1][0]] * 1.05:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def fit_approach2(pts: Points) -> dict:
    """IsoFLOP parabolas and power laws through their minima."""
    minima = []
    for idx in budgets_of(pts):
        if len(np.unique(pts.N[idx])) < 3:
            continue
        x, y = np.log(pts.N[idx]), pts.loss[idx]
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            continue  # no minimum: the budget's sizes do not bracket the optimum
        xs = -c1 / (2 * c2)
        q1, q0 = np.polyfit(x, np.log(pts.D[idx]), 1)
        minima.append({"C": float(np.exp(np.log(pts.C[idx]).mean())), "N_opt": float(np.exp(xs)),
                       "D_opt": float(np.exp(q1 * xs + q0)), "loss": float(c0 + c1 * xs + c2 * xs**2),
                       "parabola": [float(c2), float(c1), float(c0)],
                       "bracketed": bool(x.min() <= xs <= x.max())})
    out: dict = {"budgets": minima}
    # A minimum outside the budget's sizes is an extrapolation of the parabola: not used.
    inside = [m for m in minima if m["bracketed"]]
    if len(inside) >= 2:
        lc = np.log([m["C"] for m in inside])
        a, ka = np.polyfit(lc, np.log([m["N_opt"] for m in inside]), 1)
        b, kb = np.polyfit(lc, np.log([m["D_opt"] for m in inside]), 1)
        out.update(a=float(a), b=float(b), log_k_N=float(ka), log_k_D=float(kb))
    return out


def fit_all(pts: Points, bootstrap: int = 200, seed: int = 0, starts: int = 64,
            opts: FitOptions = FitOptions()) -> dict:
    """Both approaches, with bootstrap intervals."""
    if len(pts) < 5:
        raise DataError(f"{len(pts)} points: a 5-parameter law needs at least 5 (N, D, loss) points")
    p3 = fit_approach3(pts, starts, opts=opts)
    p2 = fit_approach2(pts)
    rng = np.random.default_rng(seed)
    samples3: dict[str, list[float]] = {k: [] for k in PARAMS}
    samples2: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(bootstrap):
        idx = rng.integers(0, len(pts), len(pts))
        if len(np.unique(idx)) < 5:
            continue
        sub = pts.take(idx)
        # From the full data's optimum and the resample's two best grid points: the resample's
        # optimum lies near the full one, and a few starts keep 200 resamples to a minute.
        q = fit_approach3(sub, starts=2, extra_starts=[np.array(p3["theta"])], opts=opts)
        for k in PARAMS:
            samples3[k].append(q[k])
        with warnings.catch_warnings():  # resampled budgets repeat sizes: ill-conditioned polyfits
            warnings.simplefilter("ignore", np.exceptions.RankWarning)
            q2 = fit_approach2(sub)
        if "a" in q2:
            samples2["a"].append(q2["a"])
            samples2["b"].append(q2["b"])

    def ci(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    result = {k: float(p3[k]) for k in PARAMS}
    result["ci"] = {k: ci(v) for k, v in samples3.items()}
    result["approach3"] = {**{k: float(p3[k]) for k in PARAMS}, "objective": p3["objective"],
                           "theta": p3["theta"], "ci": result["ci"]}
    result["options"] = asdict(opts)
    p2["ci"] = {k: ci(v) for k, v in samples2.items()}
    result["approach2"] = p2
    result["points"] = len(pts)
    result["bootstrap"] = bootstrap
    return result


def predict(result: dict, C: float) -> dict:
    out = {"C": C, "approach3": optimal_allocation(result["approach3"], C)}
    p2 = result["approach2"]
    if "a" in p2:
        out["approach2"] = {"N_opt": float(math.exp(p2["log_k_N"]) * C ** p2["a"]),
                            "D_opt": float(math.exp(p2["log_k_D"]) * C ** p2["b"])}
    return out


# --------------------------------------------------------------------------- back-tests


def in_regime(pts: Points, min_tokens_per_param: float) -> np.ndarray:
    """Mask of the points trained on at least ``min_tokens_per_param`` tokens per parameter. The
    largest sizes of the smallest budgets see fewer tokens than they have parameters; their loss is
    still falling fast and no three-term law bends to them without bending the frontier."""
    return min_tokens_per_param <= pts.D / pts.N


def _predicted(pts: Points, fit_idx: np.ndarray, held_idx: np.ndarray, opts: FitOptions,
               extra_starts=()) -> tuple[dict, np.ndarray]:
    train = pts.take(fit_idx[in_regime(pts.take(fit_idx), opts.min_tokens_per_param)])
    if len(train) < 5:
        return {}, np.full(len(held_idx), np.nan)
    p = fit_approach3(train, starts=64 if not extra_starts else 4, extra_starts=extra_starts, opts=opts)
    return p, law(p, pts.N[held_idx], pts.D[held_idx])


def _errors(pts: Points, idx: np.ndarray, predicted: np.ndarray) -> dict:
    rel = (predicted - pts.loss[idx]) / pts.loss[idx]
    rows = [{"N": float(pts.N[i]), "D": float(pts.D[i]), "C": float(pts.C[i]), "loss": float(pts.loss[i]),
             "predicted": float(q), "rel_error": float(r)} for i, q, r in zip(idx, predicted, rel, strict=True)]
    return {"rows": rows, "mean_rel_error": float(np.abs(rel).mean()), "max_rel_error": float(np.abs(rel).max())}


def holdout_split(pts: Points, holdout_above: float, opts: FitOptions) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices of the points below ``holdout_above`` and of those held out (at or above), and how
    many of the former are fitted; a split that leaves fewer than 5 on either side is refused."""
    below, above = np.flatnonzero(holdout_above > pts.C), np.flatnonzero(holdout_above <= pts.C)
    fit_n = int(in_regime(pts.take(below), opts.min_tokens_per_param).sum())
    if fit_n < 5 or len(above) < 5:
        raise DataError(f"--holdout-above {holdout_above:g}: leaves {fit_n} points to fit and {len(above)} to "
                        f"predict; each side needs at least 5 (budgets run {pts.C.min():.3g} to {pts.C.max():.3g})")
    return below, above, fit_n


def backtest(pts: Points, holdout_above: float, opts: FitOptions = FitOptions()) -> dict:
    """Fit on the points of budgets below ``holdout_above``, predict every point at or above it."""
    below, above, fit_n = holdout_split(pts, holdout_above, opts)
    p, predicted = _predicted(pts, below, above, opts)
    return {"kind": "holdout", "holdout_above": holdout_above, "fit_points": fit_n, "held_points": len(above),
            "law": {k: float(p[k]) for k in ("E", "A", "B", "alpha", "beta")}, **_errors(pts, above, predicted)}


def leave_one_budget_out(pts: Points, result: dict, opts: FitOptions = FitOptions()) -> dict:
    """Each budget predicted by a law fitted on all the others (started from the full fit's
    optimum and four grid points, as the bootstrap does). A budget whose removal leaves fewer
    than 5 points to fit is not predicted."""
    groups = budgets_of(pts)
    idx, predicted = [], []
    for g in groups:
        rest = np.setdiff1d(np.arange(len(pts)), g)
        _, q = _predicted(pts, rest, g, opts, [np.array(result["approach3"]["theta"])])
        if np.isfinite(q).all():
            idx.append(g)
            predicted.append(q)
    if not idx:
        return {"kind": "leave-one-budget-out", "budgets": len(groups), "predicted_budgets": 0}
    return {"kind": "leave-one-budget-out", "budgets": len(groups), "predicted_budgets": len(idx),
            **_errors(pts, np.concatenate(idx), np.concatenate(predicted))}


# --------------------------------------------------------------------------- inputs


def points_from_csv(path: Path) -> Points:
    if not path.is_file():
        raise DataError(f"--csv {path}: no such file")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    need = {"N", "D", "loss"}
    if not rows or not need <= rows[0].keys():
        raise DataError(f"--csv {path}: needs columns N,D,loss (and optionally C); has {sorted(rows[0]) if rows else 'no rows'}")
    N = np.array([float(r["N"]) for r in rows])
    D = np.array([float(r["D"]) for r in rows])
    C = np.array([float(r["C"]) if r.get("C") else 6 * n * d for r, n, d in zip(rows, N, D, strict=True)])
    return Points(N, D, np.array([float(r["loss"]) for r in rows]), C)


def newest_plan(runs, experiment: str):
    """The runs of the experiment's newest plan (the one whose latest run started last): a
    re-planned ladder logs to the same experiment, and mixing two plans' points would fit
    neither. Runs from before plans were tagged count as one plan."""
    if "tags.plan" not in runs:
        return runs
    plan = runs["tags.plan"].fillna("(untagged)")
    newest = plan[runs["start_time"].idxmax()]
    older = plan[plan != newest]
    if len(older):
        print(f"--experiment {experiment}: fitting plan {newest} ({(plan == newest).sum()} runs); "
              f"{len(older)} runs of {older.nunique()} older plan(s) left out", file=sys.stderr)
    return runs[plan == newest]


def points_from_mlflow(experiment: str, tracking_uri: str | None = None) -> Points:
    """Finished runs of a ladder's experiment: tags N, D, budget; the last val_loss."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise DataError(f"--experiment {experiment}: no such MLflow experiment at {mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'")
    need = ["tags.N", "tags.D", "tags.budget", "metrics.val_loss"]
    if runs.empty or any(c not in runs for c in need):
        raise DataError(f"--experiment {experiment}: no finished runs with tags N, D, budget and a val_loss")
    runs = newest_plan(runs.dropna(subset=need), experiment)
    return Points(runs["tags.N"].astype(float).to_numpy(), runs["tags.D"].astype(float).to_numpy(),
                  runs["metrics.val_loss"].astype(float).to_numpy(), runs["tags.budget"].astype(float).to_numpy())
