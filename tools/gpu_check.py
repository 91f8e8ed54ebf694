"""The GPU check: what a session lent a GPU runs first, in one call of at most 7 minutes (then
the gpu-marked tests, 1.5 more).

    python -m tools.gpu_check --out DIR            # or: make gpu-check GPU_OUT=DIR
    bash tools/gpu_check.sh                        # on a lent device machine (the script says how)
    python -m tools.gpu_check --out DIR --dry-run  # the same checks on the CPU with the debug GPT

Checks, each recorded in ``DIR/gpu_check.json`` with its figures or its one-line error (a
failing check does not stop the others):

- ``throughput``: GPT-2 124M, bf16, sequence 1024, without and with ``torch.compile``:
  tokens/s, MFU, peak device memory (``seqtrain bench``'s worker, a fresh process each);
- ``zero2``: the same on ZeRO-2 (one GPU: DeepSpeed's ZeRO-2 optimizer and buckets);
- ``planner``: the planner's predicted bytes (less its CUDA-context allowance) against the
  measured peak of those runs (``torch.cuda.max_memory_allocated``), plus one with activation
  checkpointing (in the dry run the measurement is the process's resident set, imports
  included: a smoke test, not a comparison);
- ``sdpa``: the loss with flash attention against the math kernel on the same batch;
- ``adamw``: fused AdamW against the foreach implementation, three steps on the model's
  parameters: largest difference in the weights, and time per step of each;
- ``hf_export``: our GPT and ``transformers``' GPT-2 holding the same weights, logits compared on
  the device in fp32;
- ``nccl``: two processes on two GPUs, an all-reduce's result and bus bandwidth (skipped on a
  machine with one GPU; gloo on the CPU in the dry run).

Each part runs under its own time limit (``LIMITS_S``) and the JSON is rewritten after each,
so a part that hangs, or the script's own 7-minute stop, keeps what was measured before it.
The ``gpu``-marked tests (``pytest -m gpu``) run after it where pytest is installed
(``tools/gpu_check.sh``).

The dry run swaps the model for the debug GPT at sequence 64 in fp32 on the CPU and takes two
steps, so that the script is exercised by the test suite and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import models
from tools.bench import run_variant
from tools.export_hf import HF_ACTIVATION, gpt_to_gpt2_state_dict
from trainer.accounting.flops import cpu_model
from trainer.accounting.planner import RUNTIME_BYTES, Layout, memory_bytes, shape_of
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
GPU = {"config": "configs/gpt/gpt2-124m.yaml", "steps": 10, "warmup": 3,
       "set": ["train.precision=bf16", "train.compile=false", "train.micro_batch_size=8",
               "train.global_batch_size=8", "data.max_bytes=8000000", "parallel.zero_stage=0"]}
DRY = {"config": "configs/gpt/debug.yaml", "steps": 2, "warmup": 1,
       "set": ["train.precision=fp32", "train.compile=false", "data.seq_len=64", "model.max_seq_len=64",
               "train.micro_batch_size=2", "train.global_batch_size=2", "parallel.zero_stage=0"]}
RUNS = {"base": [], "compile": ["train.compile=true"], "zero2": ["parallel.zero_stage=2"],
        "activation_checkpointing": ["train.activation_checkpointing=true"]}


def _bench_runs(spec: dict) -> dict[str, dict]:
    return {name: run_variant("engine", spec["config"], [*spec["set"], *extra], spec["steps"], spec["warmup"])
            for name, extra in RUNS.items()}


def _throughput(r: dict) -> dict:
    return {k: r[k] for k in ("tokens_per_s", "mfu", "peak_memory_mb", "ms_per_step", "final_loss", "device")}


def _planner(spec: dict, runs: dict[str, dict]) -> dict:
    out = {}
    for name, extra in RUNS.items():
        if name == "compile":
            continue
        cfg = load_config(spec["config"], [*spec["set"], *extra])
        t, p = cfg.train, cfg.parallel
        lay = Layout(1, 1, 1, p.zero_stage, t.micro_batch_size, t.activation_checkpointing)
        predicted = (memory_bytes(shape_of(cfg), lay)["total"] - RUNTIME_BYTES) / 2**20
        measured = runs[name]["peak_memory_mb"]
        out[name] = {"predicted_mb": round(predicted, 1), "measured_mb": round(measured, 1),
                     "measured_over_predicted": round(measured / predicted, 3)}
    return out


def _model_and_batch(spec: dict, device: torch.device):
    cfg = load_config(spec["config"], spec["set"])
    c = cfg.model.model_copy(update={"vocab_size": 50304 if "gpt2" in spec["config"] else 512, "dropout": 0.0})
    model = models.build(c, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (2, cfg.data.seq_len + 1), generator=g).to(device)
    return model, ids[:, :-1], ids[:, 1:], c


def _sdpa(spec: dict, device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, y, _ = _model_and_batch(spec, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    losses = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
            with sdpa_kernel(backend):
                losses[name] = float(model(x, y))
    return {**losses, "abs_diff": abs(losses["flash"] - losses["math"])}


def _adamw(spec: dict, device: torch.device) -> dict:
    model, x, y, _ = _model_and_batch(spec, device)
    model(x, y).backward()
    out: dict[str, Any] = {}
    weights = {}
    for impl in ("fused", "foreach"):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p, q in zip(params, model.parameters(), strict=True):
            p.grad = q.grad.clone()
        opt = torch.optim.AdamW(params, lr=1e-3, fused=impl == "fused", foreach=impl == "foreach")
        opt.step()  # warm-up: states allocated, kernels loaded
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(2):
            opt.step()
        _sync(device)
        out[f"{impl}_ms_per_step"] = (time.perf_counter() - t0) / 2 * 1e3
        weights[impl] = params
    out["max_abs_weight_diff"] = max((a - b).abs().max().item()
                                     for a, b in zip(weights["fused"], weights["foreach"], strict=True))
    return out


def _hf_export(spec: dict, device: torch.device) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    model, x, _, c = _model_and_batch(spec, device)
    model.eval()
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer,
        n_head=c.n_head, n_inner=c.ff_size, activation_function=HF_ACTIVATION[c.activation],
        layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=c.tie_embeddings)).to(device).eval()
    hf.load_state_dict(gpt_to_gpt2_state_dict(model), strict=False)
    with torch.no_grad():
        diff = (hf(x).logits.float() - model(x).float()).abs().max().item()
    return {"max_abs_logit_diff": diff}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LIMITS_S = {"throughput": 240, "zero2": 10, "planner": 30, "sdpa": 45, "adamw": 45, "hf_export": 45,
            "nccl": 90}
"""Each part's own time limit (the script as a whole stops at 7 minutes): a part that hangs
is recorded as timed out and the next one runs."""


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout


def _attempt(results: dict, name: str, fn: Callable[[], dict], out: Path) -> None:
    """Run one part under its limit; write the JSON after it, so a kill keeps what was measured."""
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(LIMITS_S[name])
    try:
        results[name] = {"ok": True, **fn()}
    except PartTimeout:
        results[name] = {"ok": False, "error": f"timed out after {LIMITS_S[name]} s"}
    except Exception as e:  # one check's failure is a result, not the end of the others
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "traceback": traceback.format_exc(limit=-3)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(results[name])[:300]}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "gpu_check.json")


def _nccl(cuda: bool) -> dict:
    """Two processes: an all-reduce's result and bus bandwidth over NCCL (gloo in the dry run);
    skipped on a machine with one GPU."""
    if cuda and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: needs two"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "tools.gpu_check", "--nccl-worker"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=LIMITS_S["nccl"] - 5)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(lines[-1])


def _nccl_worker() -> None:
    """One rank of ``_nccl``: five timed all-reduces of 256 MiB (4 MiB on CPUs)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    x = torch.full(((256 if cuda else 4) * 2**18,), float(rank + 1), device=device)  # fp32
    dist.all_reduce(x)  # warm-up (communicator set-up)
    correct = bool((x == 3.0).all())
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(x)
        _sync(device)  # a collective returns once queued: time it to completion
        best = min(best, time.perf_counter() - t0)
    n = 2  # ranks: a ring all-reduce moves 2(n-1)/n of the buffer per rank
    if rank == 0:
        print(json.dumps({"backend": dist.get_backend(), "correct": correct, "mb": x.numel() * 4 / 2**20,
                          "busbw_gb_s": x.numel() * 4 * 2 * (n - 1) / n / best / 1e9}), flush=True)
    dist.destroy_process_group()


def run(out: Path, dry_run: bool) -> dict:
    cuda = torch.cuda.is_available() and not dry_run
    spec = GPU if cuda else DRY
    device = torch.device("cuda" if cuda else "cpu")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else cpu_model(),
        "dry_run": not cuda, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "config": spec["config"], "overrides": spec["set"]}
    runs: dict[str, dict] = {}

    def benches() -> dict:
        runs.update(_bench_runs(spec))
        return {name: _throughput(r) for name, r in runs.items()}

    _attempt(results, "throughput", benches, out)
    if runs:
        results["compile_speedup"] = runs["compile"]["tokens_per_s"] / runs["base"]["tokens_per_s"]
        _attempt(results, "zero2", lambda: {"loss_diff_vs_zero0": abs(runs["zero2"]["final_loss"]
                                                                      - runs["base"]["final_loss"])}, out)
        _attempt(results, "planner", lambda: _planner(spec, runs), out)
    _attempt(results, "sdpa", lambda: _sdpa(spec, device), out)
    _attempt(results, "adamw", lambda: _adamw(spec, device), out)
    _attempt(results, "hf_export", lambda: _hf_export(spec, device), out)
    _attempt(results, "nccl", lambda: _nccl(cuda), out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu_check.json (required)")
    p.add_argument("--dry-run", action="store_true", help="CPU, debug GPT, two steps (the test's run)")
    p.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)  # one rank of the nccl part
    args = p.parse_args(argv)
    if args.nccl_worker:
        _nccl_worker()
        return 0
    if args.out is None:
        p.error("the following arguments are required: --out")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry-run runs the same checks on the CPU", file=sys.stderr)
        return 2
    results = run(args.out, args.dry_run)
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"wrote {args.out / 'gpu_check.json'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
