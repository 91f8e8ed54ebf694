"""``seqtrain launch slurm|torchrun CONFIG``: render, submit or run the launch of a training job."""

from __future__ import annotations

import argparse

from trainer.commands._args import add_overrides


def register(sub) -> None:
    la = sub.add_parser("launch", help="launch training on a Slurm cluster or with torchrun")
    lsub = la.add_subparsers(dest="launcher", required=True)
    _slurm_parser(lsub)
    _torchrun_parser(lsub)
    la.set_defaults(run=main)


def _slurm_parser(lsub) -> None:
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
    sl.add_argument("--eval-follow", action="store_true",
                    help="also submit a job that evaluates each checkpoint as it appears (needs --run-dir)")
    sl.add_argument("--eval-args", default="", help="arguments for that `seqtrain eval`, one string "
                    "(e.g. '--tasks hellaswag --limit 500')")
    sl.add_argument("--eval-every-seconds", type=int, default=60, help="how often the follower looks")
    sl.add_argument("--prepare", action="store_true",
                    help="instead of training, tokenize the config's data as a job array of --parts tasks "
                         "(each `seqtrain data prepare --part i/N --workers CPUS`)")
    sl.add_argument("--parts", type=int, default=4, help="with --prepare: array tasks (default 4)")
    add_overrides(sl, help="override a config value (repeatable)")
    mode = sl.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the script")
    mode.add_argument("--submit", action="store_true", help="write it to the log folder and sbatch it")
    sl.add_argument("--wait", action="store_true", help="with --submit: wait for the job to finish")


def _torchrun_parser(lsub) -> None:
    tr = lsub.add_parser("torchrun", help="run (or print) torchrun for this node")
    tr.add_argument("config")
    tr.add_argument("--nproc-per-node", type=int, default=1)
    tr.add_argument("--nnodes", type=int, default=1)
    tr.add_argument("--node-rank", type=int, default=0)
    tr.add_argument("--master-addr", default="127.0.0.1")
    tr.add_argument("--master-port", type=int, default=29500)
    tr.add_argument("--max-restarts", type=int, default=0)
    tr.add_argument("--run-dir")
    add_overrides(tr, help="override a config value (repeatable)")
    tr.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def main(args: argparse.Namespace) -> int:
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
            max_restarts=args.max_restarts, eval_follow=args.eval_follow,
            eval_args=shlex.split(args.eval_args), eval_every_seconds=args.eval_every_seconds,
            prepare_parts=args.parts if args.prepare else None,
        )
        if args.dry_run:
            print(job.render(), end="")
            if job.eval_follow:
                print("\n# ---- and beside it (sbatch --dependency=after:TRAIN_JOB SCRIPT TRAIN_JOB):\n")
                print(job.render_eval(), end="")
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
