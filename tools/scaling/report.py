"""``seqtrain scaling fit``: points from a ladder's MLflow runs or a CSV ► the fits of
``fit.py`` ► printed, written as ``fit.json`` with the plots of ``plot.py``, logged to MLflow."""

from __future__ import annotations

import json
import math

import mlflow

from tools.scaling.fit import PARAMS, fit_all, points_from_csv, points_from_mlflow, predict
from tools.scaling.plot import plot_all


def fit_command(args) -> dict:
    pts = points_from_mlflow(args.experiment, args.tracking_uri) if args.experiment else points_from_csv(args.csv)
    result = fit_all(pts, bootstrap=args.bootstrap)
    result["predictions"] = [predict(result, c) for c in args.predict]
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
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fit.json").write_text(json.dumps(result, indent=2))
        files = plot_all(pts, result, args.out)
        print(f"wrote {args.out}/fit.json and {', '.join(f.name for f in files)}")
        if args.experiment:
            with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(args.experiment).experiment_id,
                                  run_name=f"{args.experiment}-fit"):
                mlflow.set_tag("kind", "scaling-fit")
                mlflow.log_metrics({k: result[k] for k in PARAMS if math.isfinite(result[k])})
                for f in [args.out / "fit.json", *files]:
                    mlflow.log_artifact(str(f))
    return result
