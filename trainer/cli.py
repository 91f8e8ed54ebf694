"""The ``seqtrain`` command line. Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.errors import SeqtrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqtrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML preset")
    t.add_argument("config", help="YAML preset, e.g. configs/gpt/debug.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr=3e-4")
    t.add_argument("--run-dir", type=Path, help="run directory (default runs/<name>)")

    g = sub.add_parser("generate", help="sample from a language model or translate with a "
                       "sequence-to-sequence model (checkpoint or run directory)")
    g.add_argument("checkpoint", help="run directory, checkpoints folder or checkpoint")
    g.add_argument("--prompt", default="", help="language models: text to continue")
    g.add_argument("--source", action="append", default=[],
                   help="sequence-to-sequence: a source sentence (repeatable)")
    g.add_argument("--input", type=Path, help="sequence-to-sequence: a file of source lines")
    g.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)

    la = sub.add_parser("launch", help="launch training on a Slurm cluster or with torchrun")
    lsub = la.add_subparsers(dest="launcher", required=True)
    sl = lsub.add_parser("slurm", help="render a batch script from launch/slurm.sbatch; print or submit it")
    sl.add_argument("config", help="YAML preset; '%%a' in it (or in --set values) is the array index")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=0, help="0 for CPU nodes")
    sl.add_argument("--nproc-per-node", type=int, help="processes per node (default: one per GPU, 1 on CPU)")
    sl.add_argument("--cpus-per-task", type=int)
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--qos")
    sl.add_argument("--time", default="01:00:00")
    sl.add_argument("--array", help="job array spec, e.g. 0-11%%4: one run per index")
    sl.add_argument("--job-name")
    sl.add_argument("--log-dir", default="logs")
    sl.add_argument("--signal-seconds", type=int, default=120,
                    help="USR1 this many seconds before the time limit: save, stop, requeue")
    sl.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    sl.add_argument("--run-dir")
    sl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    mode = sl.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the script")
    mode.add_argument("--submit", action="store_true", help="write it to the log folder and sbatch it")
    sl.add_argument("--wait", action="store_true", help="with --submit: wait for the job to finish")
    tr = lsub.add_parser("torchrun", help="run (or print) torchrun for this node")
    tr.add_argument("config")
    tr.add_argument("--nproc-per-node", type=int, default=1)
    tr.add_argument("--nnodes", type=int, default=1)
    tr.add_argument("--node-rank", type=int, default=0)
    tr.add_argument("--master-addr", default="127.0.0.1")
    tr.add_argument("--master-port", type=int, default=29500)
    tr.add_argument("--max-restarts", type=int, default=0)
    tr.add_argument("--run-dir")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--dry-run", action="store_true", help="print the command instead of running it")

    ev = sub.add_parser("eval", help="evaluate a checkpoint, or every checkpoint of a run directory")
    ev.add_argument("checkpoint", help="run directory (every checkpoint: a curve) or one checkpoint")
    ev.add_argument("--data", help="a config whose data section to evaluate on (its validation split), "
                    "or for sequence-to-sequence a .tsv/.jsonl of pairs")
    ev.add_argument("--text-file", help="language models: a plain text file to evaluate on")
    ev.add_argument("--beam", type=int, default=1, help="sequence-to-sequence beam size (1: greedy)")
    ev.add_argument("--limit", type=int, default=500, help="sequence-to-sequence pairs to decode")
    ev.add_argument("--max-tokens", type=int, default=200_000, help="language-model tokens to score")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ex = sub.add_parser("export", help="export a checkpoint (any layout) for other tools")
    ex.add_argument("checkpoint")
    ex.add_argument("--format", choices=["hf", "safetensors"], default="hf",
                    help="hf: a transformers GPT-2 folder; safetensors: full fp32 weights of any family")
    ex.add_argument("--out", required=True, type=Path)

    im = sub.add_parser("import-hf", help="start a GPT run from a local GPT-2-style transformers folder")
    im.add_argument("hf_dir", type=Path)
    im.add_argument("--out", required=True, type=Path)
    im.add_argument("--name")

    be = sub.add_parser("bench", help="tokens/s, time per phase, MFU and memory against a plain PyTorch loop")
    be.add_argument("config")
    be.add_argument("--steps", type=int, default=20, help="measured steps (after --warmup)")
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--features", action="store_true", help="also each speed feature on/off")
    be.add_argument("--repeat", type=int, default=3,
                    help="runs per variant (interleaved; best and median reported)")
    be.add_argument("--plain-set", dest="plain_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra options for the plain loop only, e.g. train.compile=true (its best options)")
    be.add_argument("--json", action="store_true")
    be.add_argument("--nproc", type=int, default=1,
                    help="data-parallel processes per variant (torchrun); communication is timed")
    be.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

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
    sf = ssub.add_parser("fit", help="fit Approach 2 and 3 (Hoffmann et al. 2022) laws, plot them")
    src = sf.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="MLflow experiment of a ladder's runs")
    src.add_argument("--csv", type=Path, help="CSV with columns N,D,loss (and optionally C)")
    sf.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's local default)")
    sf.add_argument("--out", type=Path, help="directory for fit.json and the plots")
    sf.add_argument("--predict", type=float, action="append", default=[], metavar="C",
                    help="predict N_opt, D_opt and loss at this compute budget (repeatable)")
    sf.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    sf.add_argument("--json", action="store_true", help="print the result as JSON")
    scm = ssub.add_parser("compare", help="loss against non-embedding parameters for several ladders")
    scm.add_argument("plans", type=Path, nargs="+", help="plan directories (with results.csv)")
    scm.add_argument("--out", type=Path, required=True, help="PNG to write")

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize the corpus of a config into packed shards")
    dp.add_argument("config")
    dp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from trainer.config import load_config

    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        from trainer import distributed
        from trainer.train import train

        trainer = train(cfg, args.run_dir or Path("runs") / cfg.name)
        distributed.shutdown()
        global _SKIP_TEARDOWN
        _SKIP_TEARDOWN = distributed.world_size() > 1
        if trainer.diverged:
            return 3  # a failed job for the scheduler, unlike a clean preemption stop
    elif args.command == "generate" and (args.source or args.input):
        from trainer.generate import translate

        sources = list(args.source)
        if args.input:
            if not args.input.is_file():
                raise SeqtrainError(f"--input {args.input}: no such file")
            sources += [line for line in args.input.read_text().splitlines() if line.strip()]
        for src, out in zip(sources, translate(args.checkpoint, sources, args.beam, args.length_penalty), strict=True):
            print(f"{src}\t{out}")
    elif args.command == "generate":
        from trainer.generate import generate_text

        samples = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                                args.top_k, args.top_p, args.seed, args.num_samples)
        for i, s in enumerate(samples):
            print(f"----- sample {i} -----\n{s}")
    elif args.command == "bench":
        import json

        from tools.bench import bench, table
        from trainer.config import load_config

        load_config(args.config, [*args.overrides, *args.plain_overrides])  # one-line errors here, not in a worker
        results = bench(args.config, args.overrides, args.steps, args.warmup, args.features, args.repeat,
                        args.nproc, args.plain_overrides)
        print(json.dumps(results, indent=2) if args.json else table(results))
    elif args.command == "eval":
        return _eval(args)
    elif args.command == "export":
        from tools.export_hf import export_hf, export_safetensors

        if args.format == "safetensors":
            print(f"wrote {export_safetensors(args.checkpoint, args.out)}")
        else:
            check = export_hf(args.checkpoint, args.out)
            print(f"wrote {args.out} (transformers GPT-2); reloaded logits differ by at most "
                  f"{check['max_abs_logit_diff']:.2e}")
    elif args.command == "import-hf":
        from tools.import_hf import import_hf

        cfg_path = import_hf(args.hf_dir, args.out, args.name)
        print(f"wrote {args.out}; fine-tune with: seqtrain train {cfg_path} --set data.source=...")
    elif args.command == "launch":
        return _launch(args)
    elif args.command == "scaling":
        from tools.scaling.cli import scaling

        return scaling(args)
    elif args.command == "data":
        cfg = load_config(args.config, args.overrides)
        from trainer.data import prepare

        prep = prepare(cfg.data)
        print(f"{prep.dir}: " + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in prep.meta["splits"].items()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from tools.evaluate import evaluate_checkpoint, evaluate_run
    from trainer import checkpoint

    kw = dict(data=args.data, text_file=args.text_file, beam=args.beam, limit=args.limit,
              max_tokens=args.max_tokens)
    target = Path(args.checkpoint)
    if (target / "checkpoints").is_dir():
        results = evaluate_run(target, **kw)
    else:
        results = [evaluate_checkpoint(checkpoint.resolve(target), **kw)]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for r in results:
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("samples", "checkpoint", "family"))
        print(f"{r['checkpoint']}: {shown}")
    for s in results[-1]["samples"]:
        print(f"  sample: {s!r}")
    if len(results) > 1:
        print(f"curve: {target / 'eval' / 'curve.png'}; results: {target / 'eval' / 'results.jsonl'}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from trainer.config import load_config
    from trainer.launch import SlurmJob, torchrun_command

    name = None
    if "%a" not in args.config:  # validate here, before anything is queued
        name = load_config(args.config, [o for o in args.overrides if "%a" not in o]).name
    if args.launcher == "slurm":
        job = SlurmJob(
            config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task,
            partition=args.partition, account=args.account, qos=args.qos, time=args.time,
            array=args.array, job_name=args.job_name or name, overrides=args.overrides,
            run_dir=args.run_dir, log_dir=args.log_dir, signal_seconds=args.signal_seconds,
            max_restarts=args.max_restarts,
        )
        if args.dry_run:
            print(job.render(), end="")
        else:
            print(job.submit(wait=args.wait))
        return 0
    cmd = torchrun_command(args.config, args.nproc_per_node, args.nnodes, args.node_rank,
                           args.master_addr, args.master_port, args.overrides, args.run_dir,
                           args.max_restarts)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)


_SKIP_TEARDOWN = False
"""Set after a finished multi-process training run; see ``main``."""


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except SeqtrainError as e:
        print(f"seqtrain: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    if _SKIP_TEARDOWN:
        # Everything is saved, logged and the process group destroyed. Native threads of the
        # distributed stack can still abort a rank during interpreter teardown ("terminate
        # called without an active exception", seen in about 1 of 20 two-process CPU runs),
        # which turns a finished job into a failed one for torchrun and Slurm: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
