"""Plots of a scaling fit (PNG): IsoFLOP curves, the compute-optimal frontier, the fitted law's
loss contours, residuals; and loss against non-embedding parameters for several ladders."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tools.scaling.fit import Points, budgets_of, law, optimal_allocation  # noqa: E402
from trainer.errors import DataError


def plot_all(pts: Points, result: dict, out: Path) -> list[Path]:
    return [_isoflop(pts, result, out / "isoflop.png"), _frontier(result, out / "frontier.png"),
            _contours(pts, result, out / "contours.png"), _residuals(pts, result, out / "residuals.png")]


def _isoflop(pts: Points, result: dict, path: Path) -> Path:
    return _save(isoflop_figure(pts, result), path)


def isoflop_figure(pts: Points, result: dict):
    """One colour per budget on a colour bar of log10 C (legible with dozens of budgets); the
    fitted parabolas and their Approach 2 minima (★)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    minima = {round(np.log10(m["C"]), 3): m for m in result["approach2"]["budgets"]}
    budgets = budgets_of(pts)
    log_c = [float(np.log(pts.C[idx]).mean() / np.log(10)) for idx in budgets]
    norm = matplotlib.colors.Normalize(min(log_c), max(max(log_c), min(log_c) + 1e-9))
    for lc, idx in zip(log_c, budgets, strict=True):
        color = plt.cm.viridis(norm(lc))
        ax.scatter(pts.N[idx], pts.loss[idx], color=color, s=18)
        m = minima.get(round(lc, 3))
        if m:
            x = np.linspace(np.log(pts.N[idx]).min() - 0.2, np.log(pts.N[idx]).max() + 0.2, 100)
            ax.plot(np.exp(x), np.polyval(m["parabola"], x), color=color, lw=1)
            ax.scatter([m["N_opt"]], [m["loss"]], color=color, marker="*", s=160, edgecolor="k", zorder=3)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                 label="compute budget log10 C (FLOPs)")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)",
           title=f"IsoFLOP profiles, {len(budgets)} budgets (Approach 2 minima ★)")
    return fig


def _frontier(result: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    mins = result["approach2"]["budgets"]
    cs = np.array([m["C"] for m in mins]) if mins else np.array([1e12])
    grid = np.logspace(np.log10(cs.min()) - 0.5, np.log10(cs.max()) + 1.5, 50)
    alloc = [optimal_allocation(result["approach3"], c) for c in grid]
    for ax, key, exp_key in ((axes[0], "N_opt", "a"), (axes[1], "D_opt", "b")):
        if mins:
            ax.scatter(cs, [m[key] for m in mins], color="k", zorder=3, label="IsoFLOP minima")
        a2 = result["approach2"]
        if exp_key in a2:
            k = a2["log_k_N" if key == "N_opt" else "log_k_D"]
            ax.plot(grid, np.exp(k) * grid ** a2[exp_key], "--", label=f"Approach 2: ∝ C^{a2[exp_key]:.2f}")
        ax.plot(grid, [q[key] for q in alloc], label=f"Approach 3: ∝ C^{result[exp_key]:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=key)
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal frontier")
    return _save(fig, path)


def _contours(pts: Points, result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    n = np.logspace(np.log10(pts.N.min()) - 0.5, np.log10(pts.N.max()) + 0.5, 120)
    d = np.logspace(np.log10(pts.D.min()) - 0.5, np.log10(pts.D.max()) + 0.5, 120)
    nn, dd = np.meshgrid(n, d)
    z = law(result["approach3"], nn, dd)
    norm = matplotlib.colors.Normalize(vmin=min(z.min(), pts.loss.min()), vmax=max(np.percentile(z, 95), pts.loss.max()))
    cs = ax.contourf(nn, dd, np.minimum(z, norm.vmax), levels=20, cmap="viridis", norm=norm)
    fig.colorbar(cs, ax=ax, label="fitted loss")
    ax.scatter(pts.N, pts.D, c=pts.loss, cmap="viridis", norm=norm, edgecolor="w")
    c_line = np.logspace(np.log10(6 * n.min() * d.min()), np.log10(6 * n.max() * d.max()), 50)
    opt = [optimal_allocation(result["approach3"], c) for c in c_line]
    ax.plot([q["N_opt"] for q in opt], [q["D_opt"] for q in opt], "w--", label="compute-optimal")
    ax.set(xscale="log", yscale="log", xlim=(n.min(), n.max()), ylim=(d.min(), d.max()),
           xlabel="N", ylabel="tokens D", title="L(N, D) = E + A/N^α + B/D^β")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _residuals(pts: Points, result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    r = np.log(law(result["approach3"], pts.N, pts.D)) - np.log(pts.loss)
    ax.scatter(pts.N, r, c=np.log10(pts.C), cmap="viridis")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="N", ylabel="log L̂ − log L", title="Approach 3 residuals (colour: log10 C)")
    return _save(fig, path)


def backtest_figure(bt: dict, path: Path) -> Path:
    """Relative error of each held-out point's predicted loss against its budget; the fit's
    cut where there is one."""
    fig, ax = plt.subplots(figsize=(6, 4))
    C = np.array([r["C"] for r in bt["rows"]])
    err = 100 * np.array([r["rel_error"] for r in bt["rows"]])
    ax.scatter(C, err, c=np.log10([r["N"] for r in bt["rows"]]), cmap="viridis", s=14)
    ax.axhline(0, color="k", lw=0.8)
    if bt["kind"] == "holdout":
        ax.axvline(bt["holdout_above"], color="tab:red", ls="--", lw=1, label="fitted below this budget")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="compute budget C (FLOP)", ylabel="(L̂ − L) / L  (%)",
           title=f"back-test, {bt['kind']}: mean |err| {bt['mean_rel_error']:.2%}, max {bt['max_rel_error']:.2%}"
                 "\n(colour: log10 N)")
    return _save(fig, path)


def compare_plot(plans: list[Path], out: Path) -> Path:
    """Final loss against non-embedding parameters for several ladders (as Kaplan et al. 2020
    compare Transformers and LSTMs): one IsoFLOP curve per (ladder, budget), one colour per
    ladder, darker for larger budgets."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, plan in enumerate(plans):
        f = plan / "results.csv"
        if not f.is_file():
            raise DataError(f"{plan}: no results.csv (run `seqtrain scaling run {plan}` first)")
        rows = list(csv.DictReader(f.open()))
        budgets = sorted({float(r["budget"]) for r in rows})
        cmap = plt.get_cmap(["Blues", "Oranges", "Greens", "Purples"][k % 4])
        for j, c in enumerate(budgets):
            sel = sorted((float(r["N"]), float(r["loss"])) for r in rows if float(r["budget"]) == c)
            color = cmap(0.45 + 0.5 * j / max(1, len(budgets) - 1))
            # One legend entry per ladder, however many budgets it has.
            label = f"{plan.name} ({rows[0]['family']}), C {budgets[0]:.2g} to {budgets[-1]:.2g}" if j == len(budgets) - 1 else None
            ax.plot([n for n, _ in sel], [v for _, v in sel], "o-", color=color, label=label)
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)",
           title="IsoFLOP curves per ladder (darker: larger budget)")
    ax.legend(fontsize=7)
    return _save(fig, out)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
