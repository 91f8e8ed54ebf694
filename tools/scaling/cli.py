"""``seqtrain scaling plan | run | fit | compare``."""

from __future__ import annotations

import json


def scaling(args) -> int:
    if args.scaling_command == "plan":
        from tools.scaling.plan import plan

        rows = plan(args.ladder, args.out)
        for r in rows:
            print(f"point {r['point']:>2}  C {r['budget']:.3g}  {r['shape']:<40} N {r['nonemb_params']:>9,}  "
                  f"D {r['tokens']:>11,}  D/N {r['tokens_per_param']:>7}  steps {r['steps']:>6}  "
                  f"lr {r['lr']:.2e}  budget error {r['budget_error']:.2%}")
        print(f"wrote {args.out}/plan.csv and {len(rows)} configs in {args.out}/points/")
    elif args.scaling_command == "run":
        from tools.scaling.run import run

        slurm = {"partition": args.partition, "account": args.account, "time": args.time,
                 "gpus_per_node": args.gpus_per_node}
        results = run(args.plan, args.executor, args.nproc_per_node, slurm, wait=args.wait)
        print(f"{len(results)} points finished; results in {args.plan}/results.csv")
    elif args.scaling_command == "fit":
        from tools.scaling.fit import fit_command

        result = fit_command(args)
        if args.json:
            print(json.dumps(result, indent=2))
    elif args.scaling_command == "compare":
        from tools.scaling.plot import compare_plot

        compare_plot(args.plans, args.out)
        print(f"wrote {args.out}")
    return 0
