"""Training time lost per checkpoint save, synchronous vs ``checkpoint.async``.

Runs ``seqtrain train`` on the same model three ways per round, rounds interleaved: no saves
(the baseline), a synchronous save every K steps, an asynchronous one. A step's time is read
from its metrics row (``log_every=1``: each row's window runs from the previous row to this
step's end, so a save's cost lands in the step after it, and an asynchronous writer's
interference in the steps it overlaps). Lost per save = (run's step time − baseline run's step
time, summed over steps 2..N) / saves before the end; the final save is left out (a run waits
for it either way).

    python -m tools.bench_checkpoint [--rounds 2] [--steps 26] [--every 8] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A GPT of 113 M parameters (GPT-2 small's blocks, 16 of them) on characters, so that no large
# tokenizer has to be trained first: one 128-token sequence per step, fp32, one process.
MODEL = ["model.n_layer=16", "model.n_head=12", "model.d_model=768", "model.max_seq_len=128",
         "data.seq_len=128", "data.tokenizer.kind=char", "train.micro_batch_size=1",
         "train.global_batch_size=1", "train.log_every=1", "eval.every=0", "eval.batches=1",
         "tracking.enabled=false", "checkpoint.keep_last=2"]
VARIANTS = {"none": ["checkpoint.every=0"], "sync": [], "async": ["checkpoint.async=true"]}


def run(variant: str, steps: int, every: int, extra: list[str], root: Path) -> list[float]:
    """Per-step seconds (steps 2..N) of one run."""
    run_dir = root / f"{variant}-{len(list(root.iterdir()))}"
    sets = [f"train.steps={steps}", f"checkpoint.every={every}", *MODEL, *VARIANTS[variant], *extra]
    cmd = [sys.executable, "-m", "trainer", "train", str(REPO / "configs/gpt/debug.yaml"), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"{variant} run failed: {p.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    # ``tokens`` counts from the start of the run; a row's rate is over its own window.
    return [(r["tokens"] - prev["tokens"]) / r["tokens_per_s"] for prev, r in itertools.pairwise(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=26)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--set", dest="extra", action="append", default=[])
    args = ap.parse_args()
    saves = (args.steps - 1) // args.every  # saves before the last step
    lost: dict[str, list[float]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
        for r in range(args.rounds):
            times = {v: run(v, args.steps, args.every, args.extra, Path(tmp)) for v in VARIANTS}
            base = statistics.median(times["none"])
            for v in lost:
                lost[v].append((sum(times[v]) - sum(times["none"])) / saves)
            print(f"round {r + 1}: step {base:.3f} s (median, no saves); lost per save: sync "
                  f"{lost['sync'][-1]:.2f} s, async {lost['async'][-1]:.2f} s", flush=True)
    sync, asyn = statistics.median(lost["sync"]), statistics.median(lost["async"])
    print(json.dumps({"lost_per_save_sync_s": sync, "lost_per_save_async_s": asyn,
                      "async_over_sync": asyn / sync, "saves_per_run": saves, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
