"""The layout planner's memory prediction against measurement, on this machine.

    python -m tools.bench_planner [--steps 3] [--layouts single,dp2_z3,...] [--shape llama]

Trains a 110 M-parameter GPT (GPT-2 small's blocks, a 32,768-token vocabulary, fp32, sequence
256, micro-batch 4) for a few steps in each layout and compares each rank's ``memory.json``
(``train_peak_mb - baseline_mb``: what training added to the process) with the planner's
prediction for that layout less its 1 GiB CUDA-context allowance. On a CPU the measurement is
host RSS (glibc keeps freed memory: a high-water mark), so the comparison checks the model
states, activations and DeepSpeed's buffers, not a GPU's allocator. Beside it, each layout's
``init_peak_mb - baseline_mb`` (building this rank's part of the model) and its ratio to the
single process's: sharded construction's figure. ``--shape llama`` makes the same model
Llama-shaped (RoPE, RMSNorm, SwiGLU at 2048, 4 key/value heads for 12, no biases: 100.7 M).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.accounting.planner import RUNTIME_BYTES, Layout, memory_bytes, shape_of
from trainer.config import load_config
from trainer.launch import torchrun

PRESET = "configs/gpt/gpt2-124m.yaml"
BASE = ["train.precision=fp32", "train.compile=false", "data.seq_len=256", "model.max_seq_len=256",
        "data.max_bytes=4000000", "data.tokenizer.vocab_size=32768", "train.micro_batch_size=4",
        "eval.every=0", "checkpoint.every=0", "tracking.enabled=false", "train.warmup_steps=1"]
SHAPES = {"gpt2": [], "llama": ["model.position=rope", "model.norm=rmsnorm", "model.activation=swiglu",
                              "model.d_ff=2048", "model.n_kv_head=4", "model.bias=false"]}
# name: (dp, tp, pp, ZeRO stage, activation checkpointing)
LAYOUTS = {"single": (1, 1, 1, 0, False), "single_ac": (1, 1, 1, 0, True), "dp4_z1": (4, 1, 1, 1, False),
           "dp4_z2": (4, 1, 1, 2, False), "dp4_z3": (4, 1, 1, 3, False), "dp4_z3_ac": (4, 1, 1, 3, True),
           "tp2": (1, 2, 1, 0, False), "pp2": (1, 1, 2, 0, False), "tp2xpp2": (1, 2, 2, 0, False),
           "dp2_z1": (2, 1, 1, 1, False), "dp2_z2": (2, 1, 1, 2, False), "dp2_z3": (2, 1, 1, 3, False)}
DEFAULT = "single,single_ac,dp4_z1,dp4_z2,dp4_z3,dp4_z3_ac,tp2,pp2,tp2xpp2"


def overrides(dp: int, tp: int, pp: int, zero: int, ac: bool, steps: int, shape: str = "gpt2") -> list[str]:
    return [*BASE, *SHAPES[shape], f"train.global_batch_size={4 * dp}", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.zero_stage={zero}", f"train.activation_checkpointing={str(ac).lower()}", f"train.steps={steps}"]


def measure(name: str, steps: int, work: Path, shape: str = "gpt2") -> list[dict]:
    dp, tp, pp, zero, ac = LAYOUTS[name]
    n = dp * tp * pp
    args = ["-m", "trainer", "train", PRESET, "--run-dir", str(work / name)]
    for kv in overrides(dp, tp, pp, zero, ac, steps, shape):
        args += ["--set", kv]
    cmd = [*torchrun(n), *args] if n > 1 else [sys.executable, *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((work / name / "memory.json").read_text())


def predict(name: str, shape: str = "gpt2") -> dict[str, float]:
    dp, tp, pp, zero, ac = LAYOUTS[name]
    cfg = load_config(PRESET, overrides(dp, tp, pp, zero, ac, 1, shape))
    m = memory_bytes(shape_of(cfg), Layout(dp, tp, pp, zero, 4, ac))
    return {**m, "buffers": m["buffers"] - RUNTIME_BYTES, "total": m["total"] - RUNTIME_BYTES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layouts", default=DEFAULT, help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--shape", choices=list(SHAPES), default="gpt2", help="the decoder's shape")
    args = p.parse_args(argv)
    mib = 2**20
    print("| layout | predicted MiB | of which states / activations / buffers | measured MiB (max rank) | ratio "
          "| init growth MiB (max rank) | init / single's |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    single_init = None
    with tempfile.TemporaryDirectory() as d:
        for name in args.layouts.split(","):
            ranks = measure(name, args.steps, Path(d), args.shape)
            got = max(r["train_peak_mb"] - r["baseline_mb"] for r in ranks)
            init = max(r["init_peak_mb"] - r["baseline_mb"] for r in ranks)
            single_init = init if name == "single" else single_init
            m = predict(name, args.shape)
            states = (m["params"] + m["grads"] + m["optimizer"]) / mib
            vs = f"{init / single_init:.2f}" if single_init else "-"
            print(f"| {name} | {m['total'] / mib:,.0f} | {states:,.0f} / {m['activations'] / mib:,.0f} / "
                  f"{m['buffers'] / mib:,.0f} | {got:,.0f} | {got / (m['total'] / mib):.2f} | {init:,.0f} | {vs} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
