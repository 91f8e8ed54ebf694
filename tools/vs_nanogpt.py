"""seqtrain beside nanoGPT at nanoGPT's own CPU recipe, on one text file, on this machine.

    python -m tools.vs_nanogpt TEXT_FILE [--pairs 3] [--nanogpt ../shared/anchors/nanogpt/run.sh]

Each pair runs nanoGPT (its script, which prints its validation loss and whole-process wall
time) and ``seqtrain train configs/gpt/nanogpt-char.yaml`` (the same shape, batch, schedule,
steps and held-out tail), in alternating order so that a slow spell of a shared machine does
not always land on the same side. Both pay their data preparation before the clock starts
(nanoGPT's script prepares before timing; seqtrain's cache is filled by a first short run).
Prints a table per pair, the median ratio (nanoGPT's wall / seqtrain's) and, with ``--json``,
the figures as JSON. Nothing of nanoGPT is part of this project: its script is only called.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.accounting.flops import cpu_model

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs/gpt/nanogpt-char.yaml"
DEFAULT_NANOGPT = REPO.parent / "shared/anchors/nanogpt/run.sh"


def run_nanogpt(script: Path, text: Path) -> dict[str, float]:
    """Wall time and final validation loss as nanoGPT's script prints them."""
    out = subprocess.run(["bash", str(script), str(text), sys.executable], capture_output=True,
                         text=True, check=True).stdout
    val = re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", out)
    wall = re.search(r"^WALL (\d+(?:\.\d+)?)", out, re.M)
    if not val or wall is None:
        raise RuntimeError(f"unexpected output of {script}:\n{out[-2000:]}")
    return {"wall_s": float(wall.group(1)), "val_loss": float(val[-1])}


def run_seqtrain(text: Path, store: Path, extra: list[str], steps: int | None = None) -> dict:
    """Whole-process wall time (as a user waits: start to exit), final validation loss, the
    time to the first step with its parts (first metrics row) and the median step time."""
    with tempfile.TemporaryDirectory() as d:
        overrides = [f"data.source={text}", "data.max_bytes=null", f"tracking.uri=sqlite:///{store}", *extra,
                     *([f"train.steps={steps}"] if steps else [])]
        args = [sys.executable, "-m", "trainer", "train", str(PRESET), "--run-dir", d]
        for kv in overrides:
            args += ["--set", kv]
        t0 = time.perf_counter()
        subprocess.run(args, cwd=d, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    steps_s = [(b["tokens"] - a["tokens"]) / b["tokens_per_s"] / (b["step"] - a["step"])
               for a, b in zip(train, train[1:], strict=False)]
    return {"wall_s": wall, "val_loss": [r for r in rows if "val_loss" in r][-1]["val_loss"],
            "time_to_first_step_s": train[0]["time_to_first_step_s"],
            "startup": {k.removeprefix("startup_").removesuffix("_s"): v
                        for k, v in train[0].items() if k.startswith("startup_")},
            "step_ms": 1000 * statistics.median(steps_s) if steps_s else None}


def compare(text: Path, pairs: int, script: Path, extra: list[str]) -> dict:
    store = Path(tempfile.mkdtemp(prefix="vs-nanogpt-")) / "mlflow.db"
    # Fills the data cache and creates the tracking store, as a user's first run does (nanoGPT
    # prepares its data before its clock starts).
    run_seqtrain(text, store, extra, steps=2)
    results = []
    for i in range(pairs):
        order = ["nanogpt", "seqtrain"] if i % 2 == 0 else ["seqtrain", "nanogpt"]
        pair = {}
        for who in order:
            pair[who] = run_nanogpt(script, text) if who == "nanogpt" else run_seqtrain(text, store, extra)
            print(f"pair {i + 1} {who}: {pair[who]['wall_s']:.1f} s, val loss {pair[who]['val_loss']:.4f}",
                  file=sys.stderr, flush=True)
        pair["ratio"] = pair["nanogpt"]["wall_s"] / pair["seqtrain"]["wall_s"]
        results.append(pair)
    return {"text": str(text), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "seqtrain_overrides": extra, "pairs": results,
            "median_ratio": statistics.median(p["ratio"] for p in results)}


def machine() -> str:
    return f"{os.cpu_count()} CPUs, {cpu_model()}"


def table(r: dict) -> str:
    lines = [f"{r['text']} on {r['machine']}, {r['date']}",
             "| pair | nanoGPT wall s | seqtrain wall s | ratio | nanoGPT val loss | seqtrain val loss | seqtrain first step s | seqtrain step ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, p in enumerate(r["pairs"], start=1):
        n, s = p["nanogpt"], p["seqtrain"]
        lines.append(f"| {i} | {n['wall_s']:.1f} | {s['wall_s']:.1f} | {p['ratio']:.3f} | {n['val_loss']:.4f} | "
                     f"{s['val_loss']:.4f} | {s['time_to_first_step_s']:.2f} | {s['step_ms'] or 0:.1f} |")
    lines.append(f"median ratio (nanoGPT wall / seqtrain wall): {r['median_ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text", type=Path, help="a text file of about 1 MB")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--nanogpt", type=Path, default=DEFAULT_NANOGPT, help="nanoGPT's run.sh")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="seqtrain config override (repeatable)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for path, what in ((args.text, "text file"), (args.nanogpt, "nanoGPT script (--nanogpt)")):
        if not path.is_file():
            print(f"vs_nanogpt: error: {what} {path} not found", file=sys.stderr)
            return 2
    r = compare(args.text.resolve(), args.pairs, args.nanogpt.resolve(), args.overrides)
    print(json.dumps(r, indent=2) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
