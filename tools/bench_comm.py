"""Bytes per step of every parallel layout, measured against the analytic volume.

    python -m tools.bench_comm [--layouts tp2,cp2,...] [--json]

Trains the parity matrix's tiny GPT (``tests/trainer/parallel/test_layouts.py``'s shape: 4
blocks, d 32, 2 heads, vocabulary 320, 32-token windows, micro-batch 2, global batch 8, fp32)
for 4 steps in each layout, reads rank 0's counted collectives per step from the last metrics
row (``trainer/accounting/comm.py``) and prints them beside ``trainer/accounting/comm_volume.py``'s formulas for
the same layout, per process group and kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.accounting.comm_volume import StepShape, step_shape, volumes, wire
from trainer.config import load_config
from trainer.launch import torchrun

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.n_layer=4", "model.n_head=2", "model.d_model=32", "model.max_seq_len=32", "data.seq_len=32",
        "data.tokenizer.vocab_size=300", "parallel.vocab_multiple=64", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.steps=4", "train.log_every=4", "eval.every=0", "eval.batches=2",
        "checkpoint.every=0", "tracking.enabled=false", "data.max_bytes=400000"]
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "dp2-zero0": (2, []),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["parallel.cp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2-activation-checkpointing": (2, ["parallel.pp=2", "train.activation_checkpointing=true"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "dp2xtp2-zero2": (4, ["parallel.tp=2", "parallel.zero_stage=2"]),
    "dp2xtp2-sp-zero2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"]),
    "dp2xpp2-zero1": (4, ["parallel.pp=2", "parallel.zero_stage=1"]),
    "dp2xcp2-zero2": (4, ["parallel.cp=2", "parallel.zero_stage=2"]),
}


def measure(name: str, workdir: Path, env: dict[str, str] | None = None):
    """(measured, analytic) payload bytes per step on rank 0 by ``group.kind``, from a 4-step
    run of ``name`` and its resolved config, and the step's shape."""
    nproc, extra = LAYOUTS[name]
    run = workdir / name
    args = [f"--set={a}" for a in [*BASE, *extra]]
    cmd = [*torchrun(nproc), "-m", "trainer", "train", "configs/gpt/debug.yaml", "--run-dir", str(run), *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    shape = step_shape(load_config(str(run / "config.yaml"), []))
    return measured(last), volumes(shape), shape


def measured(row: dict[str, float]) -> dict[str, float]:
    """``group.kind`` ► bytes per step of a metrics row's ``comm_<group>_<kind>_bytes``."""
    out = {}
    for k, v in row.items():
        if k.startswith("comm_") and k != "comm_bytes":
            group, _, kind = k[len("comm_"):-len("_bytes")].partition("_")
            if group == "dp" and kind.startswith("cp_"):  # dp+cp, flattened to dp_cp
                group, kind = "dp+cp", kind[len("cp_"):]
            out[f"{group}.{kind}"] = v
    return out


def table(results: dict[str, tuple[dict[str, float], dict[str, float]]], shapes: dict[str, StepShape]) -> str:
    """Payloads by group and kind, then what rank 0 puts on the wire per group (ring factors:
    the comparison that holds when DeepSpeed picks another collective than the formula)."""
    lines = ["| layout | group.kind | measured B/step | analytic B/step | measured / analytic |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, (meas, ana) in results.items():
        for key in sorted(set(meas) | set(ana)):
            m, a = meas.get(key, 0.0), ana.get(key, 0.0)
            ratio = f"{m / a:.4f}" if a else "—"
            lines.append(f"| {name} | {key} | {m:,.0f} | {a:,.0f} | {ratio} |")
    lines += ["", "| layout | group | measured wire B/step | analytic wire B/step | measured / analytic |",
              "| --- | --- | ---: | ---: | ---: |"]
    for name, (meas, ana) in results.items():
        shape = shapes[name]
        mw, aw = wire(shape, meas), wire(shape, ana)
        for group in sorted(set(mw) | set(aw)):
            m, a = mw.get(group, 0.0), aw.get(group, 0.0)
            if m or a:
                lines.append(f"| {name} | {group} | {m:,.0f} | {a:,.0f} | {f'{m / a:.3f}' if a else '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out, shapes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts.split(","):
            *out[name], shapes[name] = measure(name, Path(tmp))
            print(name, "done", file=sys.stderr, flush=True)
    print(json.dumps({k: {"measured": m, "analytic": a} for k, (m, a) in out.items()}, indent=1)
          if args.json else table(out, shapes))


if __name__ == "__main__":
    main()
