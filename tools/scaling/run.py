"""``seqtrain scaling run PLAN``: train every point of a plan, locally or as a Slurm job array.

Resumable: a finished point (its ``result.json`` written) is skipped; an interrupted one resumes
from its own checkpoints (every point's run directory is ``PLAN/runs/{i}``, and ``seqtrain
train`` resumes there by itself). Each point logs to the ladder's MLflow experiment with tags
budget, N, D, family and plan id; ``PLAN/results.csv`` collects N, D and the final validation loss.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from trainer.errors import SeqtrainError
from trainer.launch import SlurmJob, python_launcher

RESULT_FIELDS = ["point", "budget", "N", "N_total", "D", "C", "flops_per_token", "loss", "train_loss", "family"]


def _plan_rows(plan_dir: Path) -> list[dict]:
    f = plan_dir / "plan.csv"
    if not f.is_file():
        raise SeqtrainError(f"{plan_dir}: no plan.csv; make one with `seqtrain scaling plan LADDER --out {plan_dir}`")
    with f.open() as fh:
        return list(csv.DictReader(fh))


def _finished(run_dir: Path, steps: int) -> tuple[float, float] | None:
    """(final val_loss, last train loss) of a run that reached ``steps``, else None."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r and r["step"] == steps]
    train = [r for r in rows if "loss" in r and r["step"] == steps]
    return (evals[-1]["val_loss"], train[-1]["loss"]) if evals and train else None


def collect(plan_dir: Path) -> list[dict]:
    """Write ``result.json`` for each finished point and ``results.csv`` for all of them."""
    results = []
    for row in _plan_rows(plan_dir):
        run_dir = plan_dir / "runs" / row["point"]
        done = _finished(run_dir, int(row["steps"]))
        if done is None:
            continue
        res = {"point": int(row["point"]), "budget": float(row["budget"]), "N": int(row["nonemb_params"]),
               "N_total": int(row["params"]), "D": int(row["tokens"]), "C": float(row["achieved_flops"]),
               "flops_per_token": float(row["flops_per_token"]), "loss": done[0], "train_loss": done[1],
               "family": row["family"]}
        (run_dir / "result.json").write_text(json.dumps(res, indent=2))
        results.append(res)
    with (plan_dir / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        w.writeheader()
        w.writerows(results)
    return results


def pending(plan_dir: Path) -> list[int]:
    return [int(r["point"]) for r in _plan_rows(plan_dir)
            if not (plan_dir / "runs" / r["point"] / "result.json").is_file()]


def run(plan_dir: Path, executor: str = "local", nproc: int = 1, slurm: dict | None = None,
        wait: bool = False, log=print) -> list[dict]:
    """Train the plan's pending points; returns the results collected so far."""
    plan_dir = plan_dir.resolve()
    collect(plan_dir)
    todo = pending(plan_dir)
    log(f"{len(todo)} of {len(_plan_rows(plan_dir))} points to train: {todo}")
    if executor == "slurm":
        if todo:
            job = SlurmJob(config=str(plan_dir / "points" / "%a.yaml"), array=",".join(map(str, todo)),
                           run_dir=str(plan_dir / "runs" / "%a"), nproc_per_node=nproc,
                           log_dir=str(plan_dir / "logs"), job_name=plan_dir.name, **(slurm or {}))
            job.validate()
            try:
                out = job.submit(wait=wait)
            except SeqtrainError as e:
                if not wait:
                    raise
                out = str(e)  # some task failed; the finished ones are collected below
            log(f"{'finished' if wait else 'submitted'}: {out} (run `seqtrain scaling run {plan_dir}` "
                "again when it is done: finished points are collected, failed ones resubmitted)")
        return collect(plan_dir)
    for i in todo:
        cfg, run_dir = plan_dir / "points" / f"{i}.yaml", plan_dir / "runs" / str(i)
        log(f"point {i}: training ({cfg})")
        p = subprocess.run([*python_launcher(nproc), "-m", "trainer", "train", str(cfg), "--run-dir", str(run_dir)])
        if p.returncode != 0:
            raise SeqtrainError(f"point {i} failed (exit {p.returncode}); its log is above, its run "
                                f"directory {run_dir}; run the same command to resume")
        collect(plan_dir)
    return collect(plan_dir)
