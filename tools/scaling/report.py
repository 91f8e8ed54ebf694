"""``seqtrain scaling fit``: points from a ladder's MLflow runs or a CSV ► the fits of
``fit.py`` ► printed, written as ``fit.json`` with the plots of ``plot.py``, logged to MLflow."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np

from tools.scaling.fit import (
    PARAMS,
    FitOptions,
    Points,
    backtest,
    budgets_of,
    fit_all,
    holdout_split,
    in_regime,
    leave_one_budget_out,
    points_from_csv,
    points_from_mlflow,
    predict,
)
from tools.scaling.plot import backtest_figure, plot_all
from trainer.errors import DataError


def _options(args) -> FitOptions:
    """The fitter's options from the command line; a flag left out keeps ``FitOptions``' default."""
    given = {k: getattr(args, k) for k in ("huber_delta", "budget_weight", "min_tokens_per_param")}
    opts = FitOptions(**{k: v for k, v in given.items() if v is not None})
    values = (opts.huber_delta, opts.budget_weight, opts.min_tokens_per_param)
    if not (all(map(math.isfinite, values)) and opts.huber_delta > 0 and min(values) >= 0):
        raise DataError(f"--huber-delta {opts.huber_delta:g} / --budget-weight {opts.budget_weight:g} / "
                        f"--min-tokens-per-param {opts.min_tokens_per_param:g}: need δ > 0, W ≥ 0 and R ≥ 0")
    return opts


def fit_command(args) -> dict:
    opts = _options(args)
    every = points_from_mlflow(args.experiment, args.tracking_uri) if args.experiment else points_from_csv(args.csv)
    keep = in_regime(every, opts.min_tokens_per_param)
    pts = every.take(np.flatnonzero(keep))
    if not keep.all() and keep.sum() < 5:
        raise DataError(f"{keep.sum()} of {len(every)} points have at least {opts.min_tokens_per_param:g} tokens per "
                        "parameter; a 5-parameter law needs 5 (--min-tokens-per-param 0 fits them all)")
    if args.holdout_above is not None:  # a split that cannot be fitted, refused before the minutes of fitting
        holdout_split(every, args.holdout_above, opts)
    if not keep.all():
        print(f"{(~keep).sum()} of {len(every)} points have fewer than {opts.min_tokens_per_param:g} tokens per "
              "parameter: left out of the fits (still predicted in the back-test)")
    result = fit_all(pts, bootstrap=args.bootstrap, opts=opts)
    result["predictions"] = [predict(result, c) for c in args.predict]
    if args.holdout_above is not None:
        result["backtest"] = backtest(every, args.holdout_above, opts)
    else:
        result["backtest"] = leave_one_budget_out(every, result, opts)
    a2 = result["approach2"]
    inside = sum(m["bracketed"] for m in a2["budgets"])
    print(f"{len(pts)} points, {len(a2['budgets'])} IsoFLOP minima, {inside} of them inside their "
          "budget's sizes (only those make Approach 2's power laws)")
    print("Approach 3: L = {E:.3f} + {A:.3g}/N^{alpha:.3f} + {B:.3g}/D^{beta:.3f};  N_opt ∝ C^{a:.3f}, "
          "D_opt ∝ C^{b:.3f}".format(**result))
    for k in PARAMS:
        lo_hi = result["ci"][k]
        if lo_hi:
            print(f"  {k:>5} = {result[k]:.4g}  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]")
    if "a" in a2:
        print(f"Approach 2: N_opt ∝ C^{a2['a']:.3f}, D_opt ∝ C^{a2['b']:.3f}")
    for p in result["predictions"]:
        q = p["approach3"]
        print(f"C = {p['C']:.3g}: N_opt {q['N_opt']:.3g}, D_opt {q['D_opt']:.3g}, loss {q['loss']:.4f} (Approach 3)"
              + (f"; N_opt {p['approach2']['N_opt']:.3g}, D_opt {p['approach2']['D_opt']:.3g} (Approach 2)"
                 if "approach2" in p else ""))
    _print_backtest(result["backtest"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fit.json").write_text(json.dumps(result, indent=2))
        files = plot_all(pts, result, args.out)
        if "rows" in result["backtest"]:
            files.append(backtest_figure(result["backtest"], args.out / "backtest.png"))
        print(f"wrote {args.out}/fit.json and {', '.join(f.name for f in files)}")
        if args.experiment:
            with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(args.experiment).experiment_id,
                                  run_name=f"{args.experiment}-fit"):
                mlflow.set_tag("kind", "scaling-fit")
                mlflow.log_metrics({k: result[k] for k in PARAMS if math.isfinite(result[k])})
                if "rows" in result["backtest"]:
                    mlflow.log_metrics({f"backtest_{k}": result["backtest"][k]
                                        for k in ("mean_rel_error", "max_rel_error")})
                for f in [args.out / "fit.json", *files]:
                    mlflow.log_artifact(str(f))
    return result


def _print_backtest(bt: dict) -> None:
    """Predicted against observed loss per held-out budget, then the mean and max |relative error|
    over all held-out points."""
    if "rows" not in bt:
        print(f"back-test ({bt['kind']}): no budget leaves 5 points to fit without it; nothing predicted")
        return
    head = (f"back-test: fitted on {bt['fit_points']} points below C = {bt['holdout_above']:.3g}, predicting "
            f"{bt['held_points']}" if bt["kind"] == "holdout" else
            f"back-test: leave one budget out ({bt['predicted_budgets']} of {bt['budgets']} budgets predicted)")
    print(head)
    rows = bt["rows"]
    held = Points(*(np.array([r[k] for r in rows]) for k in ("N", "D", "loss", "C")))
    print(f"  {'budget C':>10} {'points':>6} {'observed':>9} {'predicted':>9} {'mean |err|':>10} {'max |err|':>9}")
    for g in _print_groups(held):
        err = np.abs([rows[i]["rel_error"] for i in g])
        print(f"  {np.exp(np.log(held.C[g]).mean()):>10.3g} {len(g):>6} {held.loss[g].mean():>9.4f} "
              f"{np.mean([rows[i]['predicted'] for i in g]):>9.4f} {err.mean():>10.2%} {err.max():>9.2%}")
    print(f"  held-out points: mean |relative error| {bt['mean_rel_error']:.2%}, max {bt['max_rel_error']:.2%}")


def _print_groups(pts: Points) -> list[np.ndarray]:
    """The budgets themselves, or quarter decades of C when budgets are many (points read off a
    published figure have a budget each)."""
    groups = budgets_of(pts)
    if len(groups) <= 12:
        return groups
    q = np.floor(4 * np.log10(pts.C))
    return [np.flatnonzero(q == v) for v in np.unique(q)]
