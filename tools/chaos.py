"""Chaos run: train under a schedule of injected faults, restarting the way a cluster does, and
compare the final weights with a fault-free run of the same config.

Faults come from ``SEQTRAIN_FAULT`` (``trainer/callbacks/faults.py``; each fires once per run directory).
Each launch is ``torchrun --max-restarts`` (crashes and hangs: the agent restarts the workers,
which resume from the last checkpoint); a launch that ends cleanly before the last step (a
SIGTERM/SIGUSR1 stop, as before a preemption) is launched again, as a Slurm requeue would.

    python -m tools.chaos CONFIG --faults kill@2:r1,term@4,... --nproc 2 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.checkpoint import load_model_state
from trainer.config import load_config
from trainer.launch import torchrun

REPO = Path(__file__).resolve().parents[1]


def _launch(config: str, run_dir: Path, overrides: list[str], nproc: int, env: dict[str, str],
            max_restarts: int) -> subprocess.CompletedProcess:
    cmd = [*torchrun(nproc, max_restarts=max_restarts), "-m", "trainer", "train", config,
           "--run-dir", str(run_dir), *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def _last_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else 0


def chaos_run(config: str, overrides: list[str], faults: str, run_dir: Path, reference_dir: Path,
              nproc: int = 2, env: dict[str, str] | None = None, max_launches: int = 10) -> dict[str, Any]:
    """Train ``run_dir`` under ``faults`` and ``reference_dir`` without; the figures."""
    import os

    import torch

    steps = load_config(config, overrides).train.steps
    base = {**(env or os.environ), "PYTHONPATH": str(REPO)}
    base.pop("SEQTRAIN_FAULT", None)
    ref = _launch(config, reference_dir, overrides, nproc, base, 0)
    if ref.returncode != 0:
        raise RuntimeError(f"fault-free run failed:\n{ref.stderr[-3000:]}")
    launches, out, err = 0, "", ""
    while _last_step(run_dir) < steps and launches < max_launches:
        p = _launch(config, run_dir, overrides, nproc, {**base, "SEQTRAIN_FAULT": faults}, max_launches)
        launches, out, err = launches + 1, out + p.stdout, err + p.stderr
        (run_dir / f"launch_{launches}.log").write_text(p.stdout + "\n----- stderr -----\n" + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"launch {launches} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    a = load_model_state(reference_dir / "checkpoints" / f"step_{steps:08d}")
    b = load_model_state(run_dir / "checkpoints" / f"step_{steps:08d}")
    computed = len(re.findall(r"^step +\d+ +loss", out, flags=re.M))
    return {
        "faults": len(faults.split(",")),
        "launches": launches,  # 1 + the relaunches after clean stops (what a requeue does)
        # Every worker group prints its banner once: the starts beyond one per launch are
        # torchrun's restarts after a crash or a hang.
        "restarts": len(re.findall(r"params, world \d+", out)) - launches,
        "crashes": err.count("failed (exitcode: -9)"),
        "hangs": err.count("failed (exitcode: 5)"),
        "steps": steps,
        "steps_computed": computed,
        "steps_lost": computed - steps,
        "max_abs_weight_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
        "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--faults", required=True, help="SEQTRAIN_FAULT schedule, e.g. kill@2:r1,term@4")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/chaos"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    print(json.dumps(chaos_run(a.config, a.overrides, a.faults, a.out / "faulty", a.out / "reference", a.nproc),
                     indent=2))


if __name__ == "__main__":
    sys.exit(main())
