"""What an architecture buys, at equal CPU minutes: presets trained through ``seqtrain train``
on one thread each, then scored on their held-out test split with ``seqtrain eval``.

    python -m tools.bench_architectures listops|textlines [--jobs 2] [--out /tmp/bench-arch]

``listops``: the child-sum Tree-LSTM on gold trees against two sequential readers of the same
expressions, an LSTM and a Transformer encoder (``configs/listops/``); test accuracy.

``textlines``: the four-corner MD-LSTM against a 1D bidirectional LSTM over the same block
columns (``configs/textlines/``); character error rate on the test lines, drawn in a slanted
font no training line has.

Each run is its own process with ``OMP_NUM_THREADS=1``; ``--jobs`` run side by side (one per
core). Its CPU time (user + system, from ``wait4``) is what the comparison holds equal: each
preset's step count was chosen to take about 15 CPU minutes on the machines this project runs
on, and the measured minutes are printed beside each accuracy. Prints Markdown rows for
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SUITES = {
    "listops": ["configs/listops/tree-lstm.yaml", "configs/listops/lstm.yaml", "configs/listops/transformer.yaml"],
    "textlines": ["configs/textlines/mdlstm.yaml", "configs/textlines/bilstm.yaml"],
}


def _start(config: str, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    cmd = [sys.executable, "-m", "trainer", "train", config, "--run-dir", str(run_dir),
           "--set", "tracking.enabled=false"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _train_all(configs: list[str], out: Path, jobs: int) -> dict[str, float]:
    """CPU seconds of each run, ``jobs`` at a time."""
    pending, running, cpu = list(configs), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            proc = _start(config, out / Path(config).stem)
            running[proc.pid] = (config, proc, time.time())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        config, _, t0 = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{config} failed: see {out / Path(config).stem}.log")
        cpu[config] = usage.ru_utime + usage.ru_stime
        print(f"{config}: {cpu[config] / 60:.1f} CPU min, {(time.time() - t0) / 60:.1f} min wall", flush=True)
    return cpu


def _test_score(run_dir: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "trainer", "eval", str(run_dir / "checkpoints"), "--split",
                          "test", "--json"], check=True, capture_output=True, text=True)
    rows = json.loads(res.stdout)
    return rows[-1] if isinstance(rows, list) else rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-arch"))
    a = ap.parse_args()
    out = a.out / a.suite
    out.mkdir(parents=True, exist_ok=True)
    configs = SUITES[a.suite]
    cpu = _train_all(configs, out, a.jobs)
    metric, count = ("accuracy", "examples") if a.suite == "listops" else ("cer", "lines")
    print(f"| preset | model | steps | CPU min | test {metric} | {count} |\n|---|---|---:|---:|---:|---:|")
    for config in configs:
        r = _test_score(out / Path(config).stem)
        print(f"| `{config}` | {r['family']} | {r['step']} | {cpu[config] / 60:.1f} | {100 * r[metric]:.1f} % "
              f"| {r[count]} |")


if __name__ == "__main__":
    main()
