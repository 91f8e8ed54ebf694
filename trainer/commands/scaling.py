"""``seqtrain scaling plan | run | fit | compare``: IsoFLOP plans, ladder runs, Chinchilla fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.commands._args import json_only


def register(sub) -> None:
    sc = sub.add_parser("scaling", help="scaling-law experiments: plan an IsoFLOP grid, run it, fit a law")
    ssub = sc.add_subparsers(dest="scaling_command", required=True)
    sp = ssub.add_parser("plan", help="one training config per (budget, size) and plan.csv")
    sp.add_argument("ladder", help="ladder YAML, e.g. configs/scaling/cpu-demo.yaml")
    sp.add_argument("--out", type=Path, required=True, help="plan directory")
    sr = ssub.add_parser("run", help="train the plan's unfinished points (resumable)")
    sr.add_argument("plan", type=Path, help="plan directory")
    sr.add_argument("--executor", choices=["local", "slurm"], default="local")
    sr.add_argument("--nproc-per-node", type=int, default=1, help="processes per point")
    sr.add_argument("--partition")
    sr.add_argument("--account")
    sr.add_argument("--time", default="01:00:00", help="Slurm time limit per point")
    sr.add_argument("--gpus-per-node", type=int, default=0)
    sr.add_argument("--wait", action="store_true", help="slurm: block until the array job ends, then collect")
    _fit_parser(ssub)
    scm = ssub.add_parser("compare", help="loss against non-embedding parameters for several ladders")
    scm.add_argument("plans", type=Path, nargs="+", help="plan directories (with results.csv)")
    scm.add_argument("--out", type=Path, required=True, help="PNG to write")
    sc.set_defaults(run=main)


def _fit_parser(ssub) -> None:
    sf = ssub.add_parser("fit", help="fit Approach 2 and 3 (Hoffmann et al. 2022) laws, plot them")
    src = sf.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="MLflow experiment of a ladder's runs")
    src.add_argument("--csv", type=Path, help="CSV with columns N,D,loss (and optionally C)")
    sf.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's local default)")
    sf.add_argument("--out", type=Path, help="directory for fit.json and the plots")
    sf.add_argument("--predict", type=float, action="append", default=[], metavar="C",
                    help="predict N_opt, D_opt and loss at this compute budget (repeatable)")
    sf.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    sf.add_argument("--holdout-above", type=float, metavar="C",
                    help="back-test: fit on the budgets below C, predict the points at or above it "
                         "(default: leave each budget out in turn)")
    # Defaults (None here) are tools.scaling.fit.FitOptions', measured in docs/scaling.md.
    sf.add_argument("--min-tokens-per-param", type=float, metavar="R",
                    help="fit only points trained on at least R tokens per parameter (default 1.5; "
                         "back-tests still predict the others)")
    sf.add_argument("--huber-delta", type=float, help="Huber loss δ on log-loss residuals (default 1e-2; "
                                                      "Hoffmann et al. used 1e-3)")
    sf.add_argument("--budget-weight", type=float, metavar="W",
                    help="each point's residual weighs (C / C_max)^W (default 0.3; 0 weighs all alike)")
    sf.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args: argparse.Namespace) -> int:
    return {"plan": _plan, "run": _run, "fit": _fit, "compare": _compare}[args.scaling_command](args)


def _plan(args: argparse.Namespace) -> int:
    from tools.scaling.plan import plan

    rows = plan(args.ladder, args.out)
    for r in rows:
        print(f"point {r['point']:>2}  C {r['budget']:.3g}  {r['shape']:<40} N {r['nonemb_params']:>9,}  "
              f"D {r['tokens']:>11,}  D/N {r['tokens_per_param']:>7}  steps {r['steps']:>6}  "
              f"lr {r['lr']:.2e}  budget error {r['budget_error']:.2%}")
    print(f"wrote {args.out}/plan.csv and {len(rows)} configs in {args.out}/points/")
    return 0


def _run(args: argparse.Namespace) -> int:
    from tools.scaling.run import run

    slurm = {"partition": args.partition, "account": args.account, "time": args.time,
             "gpus_per_node": args.gpus_per_node}
    results = run(args.plan, args.executor, args.nproc_per_node, slurm, wait=args.wait)
    print(f"{len(results)} points finished; results in {args.plan}/results.csv")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from tools.scaling.report import fit_command

    with json_only(args.json):
        result = fit_command(args)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tools.scaling.plot import compare_plot

    compare_plot(args.plans, args.out)
    print(f"wrote {args.out}")
    return 0
