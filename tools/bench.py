"""``seqtrain bench``: throughput, time per phase, MFU and peak memory of the trainer, against a
plain PyTorch loop on the same model, data and optimizer (the floor to compare with).

Each variant runs in a fresh process (clean peak memory, clean ``torch.compile`` caches):
``python -m tools.bench worker --variant engine|plain CONFIG --set ...`` prints one JSON line.
Phases are timed with a device synchronisation at each boundary, which the real loop does not
do; the ``steady`` tokens/s is measured separately without those syncs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.accounting import comm
from trainer.accounting.flops import measured_peak, peak_flops
from trainer.build import build_data, build_model, build_module, setup, whole_model
from trainer.callbacks import memory
from trainer.config import load_config
from trainer.data.prefetch import Prefetcher
from trainer.engine.initialize import build_optimizer, build_scheduler
from trainer.engine.train_module import count_targets, model_loss
from trainer.errors import SeqtrainError
from trainer.launch import python_launcher
from trainer.loop import sdpa_context

# Speed features, each measured on and off against the configuration as given.
FEATURES: dict[str, list[str]] = {
    "baseline": [],
    "compile": ["train.compile=true"],
    "sdpa_math": ["train.sdpa_backend=math"],
    "activation_checkpointing": ["train.activation_checkpointing=true"],
    "adamw_foreach": ["train.optimizer_impl=foreach"],
    "adamw_loop": ["train.optimizer_impl=loop"],
    "host_allocator_system": ["train.host_allocator=system"],
    "no_prefetch": ["data.prefetch=false"],
    "sync_every_step": ["train.log_every=1"],
    "bf16": ["train.precision=bf16", "train.grad_accum_dtype=bf16"],
}


COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter",
               "all_gather", "broadcast")
_comm = {"on": False, "s": 0.0, "calls": 0}


def _time_collectives() -> None:
    """Wrap torch.distributed's collectives so the synchronised phase split can charge their
    time to communication (patched before DeepSpeed initialises, which keeps references)."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name)

        @functools.wraps(fn)  # keeps the signature trainer/accounting/comm.py reads the payload by
        def timed(*args, _fn=fn, **kwargs):
            if not _comm["on"]:
                return _fn(*args, **kwargs)
            # On a GPU a collective returns once queued: synchronise on both sides so the host
            # clock spans the transfer itself (the work before it is charged to its phase).
            _sync(distributed.device())
            t0 = time.perf_counter()
            out = _fn(*args, **kwargs)
            if kwargs.get("async_op") and out is not None:
                out.wait()
            _sync(distributed.device())
            _comm["s"] += time.perf_counter() - t0
            _comm["calls"] += 1
            return out

        setattr(dist, name, timed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing boundary (benchmark only)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: process peak RSS


class PlainLoop:
    """The floor to compare with: the same model, data, optimizer arithmetic, clipping and
    schedule in a plain PyTorch loop, with the train module's interface (data parallelism by
    hand; no tensor or pipeline parallelism)."""

    def __init__(self, cfg, model: torch.nn.Module, dims, device: torch.device) -> None:
        self.cfg, self.model, self.dims, self.device = cfg, model, dims, device
        self.opt = build_optimizer(model, cfg)
        self.sched = build_scheduler(self.opt, cfg)
        self.flops_per_token, _ = model.flops_per_token(cfg.data.seq_len)
        self.peak_flops = peak_flops(device, cfg.train.precision, cfg.train.peak_tflops)
        self.autocast = contextlib.nullcontext
        if cfg.train.precision == "bf16":
            # The plain way to train in bf16: fp32 weights and optimizer, matmuls in bf16 under
            # autocast (DeepSpeed's bf16 instead keeps bf16 weights with an fp32 master copy).
            self.autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
        elif cfg.train.precision == "fp16":
            raise SeqtrainError("seqtrain bench: the plain loop runs fp32 and bf16, not fp16 "
                                "(it has no loss scaler); bench train.precision=bf16 instead")

    def train_batch(self, micro_batches, on_output=None, mark=lambda phase: None):
        accum = self.cfg.train.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device, dtype=torch.long)
        for n, batch in enumerate(micro_batches, start=1):
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            mark("data")
            with self.autocast():
                out = self.model(**batch)
            if on_output is not None:
                on_output(n - 1, out)
            loss = model_loss(out)
            mark("forward")
            (loss / accum).backward()
            mark("backward")
            if n == accum:
                self._optimizer_step()
            mark("optimizer")
            loss_sum += loss.detach()
            tokens += count_targets(batch)
        return loss_sum / accum, tokens

    def _optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.dims.world_size > 1:
            # Data parallelism by hand: one flat all-reduce of the averaged gradients per
            # optimizer step, none on accumulation micro-steps.
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            grads = [p.grad for p in params]
            flat = _flatten_dense_tensors(grads).div_(self.dims.world_size)
            torch.distributed.all_reduce(flat)
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(r)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


class PhaseTimer:
    """``mark(phase)`` for a train module: synchronises the device at each boundary and charges
    the time since the last boundary to ``phase``, less the time spent inside collectives,
    which goes to ``communication``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = dict.fromkeys(("communication",), 0.0)
        self.start()

    def start(self) -> None:
        _sync(self.device)
        self.last, self.last_comm = time.perf_counter(), _comm["s"]

    def __call__(self, phase: str) -> None:
        _sync(self.device)
        now, comm = time.perf_counter(), _comm["s"]
        self.ms[phase] = self.ms.get(phase, 0.0) + 1000 * (now - self.last - (comm - self.last_comm))
        self.ms["communication"] += 1000 * (comm - self.last_comm)
        self.last, self.last_comm = now, comm


def _measure(module, data, cfg, dims, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Warm-up steps, then half the steps as the loop runs them (a host sync only at the logging
    cadence) for tokens/s, then the other half synchronised at every phase boundary."""
    t = cfg.train
    on_output = getattr(data.train, "after_forward", None)
    source = (Prefetcher(data.train, dims.dp_rank, t.grad_accum, 0, steps + warmup)
              if cfg.data.prefetch and on_output is None else data.train)

    def step(s: int, mark=None):
        micro = (source.micro_batch(s, m, dims.dp_rank) for m in range(t.grad_accum))
        with sdpa_context(t.sdpa_backend):
            return module.train_batch(micro, on_output, **({"mark": mark} if mark else {}))

    for s in range(warmup):
        step(s)
    half = steps // 2
    _sync(device)
    t0, n_tok = time.perf_counter(), torch.zeros((), dtype=torch.long, device=device)
    for s in range(warmup, warmup + half):
        loss, tokens = step(s)
        n_tok += tokens
        if (s + 1) % t.log_every == 0:
            float(loss)  # the logging cadence's host sync point
    _sync(device)
    steady = int(n_tok) / (time.perf_counter() - t0)  # this replica's tokens/s (replicas run in lockstep)
    timer = PhaseTimer(device)
    _comm.update(on=True, calls=0)
    counter = comm.counter()
    if counter is not None:
        counter.take()  # count the timed steps only
    for s in range(warmup + half, warmup + steps):
        timer.start()
        loss, _ = step(s, timer)
    _comm["on"] = False
    traffic = counter.take() if counter is not None else {}
    if isinstance(source, Prefetcher):
        source.close()
    n_timed = steps - half
    return {"steady": steady, "final_loss": float(loss),
            "ms_per_step": {k: v / n_timed for k, v in timer.ms.items()},
            "collectives_per_step": _comm["calls"] / n_timed,
            # This rank's collectives per step by group and kind: calls and payload bytes.
            "comm": {k: {"calls": v["calls"] / n_timed, "bytes": v["bytes"] / n_timed} for k, v in traffic.items()}}


def worker(variant: str, config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """One variant in this process: the trainer's own builders, then ``_measure``."""
    cfg = load_config(config, [*overrides, "tracking.enabled=false", f"train.steps={steps + warmup}"])
    if distributed.world_size() > 1:
        _time_collectives()  # before DeepSpeed initialises (it keeps references)
    cfg, dims, device = setup(cfg)
    data = build_data(cfg, dims)
    cfg = data.cfg
    model = build_model(cfg, dims, device)
    module = build_module(cfg, model, dims, device) if variant == "engine" else PlainLoop(cfg, model, dims, device)
    m = _measure(module, data, cfg, dims, device, steps, warmup)
    whole = whole_model(cfg, model, dims)
    return {
        "variant": variant,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "params": whole.num_params(),
        "tokens_per_s": m["steady"] * dims.dp,  # all data-parallel replicas together
        "world_size": dims.world_size,
        "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp, "zero_stage": cfg.parallel.zero_stage},
        # Communication: time inside torch.distributed collectives (none with one process),
        # taken out of the phase it happened in.
        "ms_per_step": m["ms_per_step"],
        "collectives_per_step": m["collectives_per_step"],
        "comm": m["comm"],
        "mfu": m["steady"] * dims.dp / dims.world_size * module.flops_per_token / module.peak_flops,
        "flops_per_token": module.flops_per_token,
        "flops_per_token_6n": whole.flops_per_token(cfg.data.seq_len)[1],
        "peak_flops": module.peak_flops,
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_reserved_mb": memory.reserved_peak_mb(device),  # GPUs: the allocator's reservation
        "final_loss": m["final_loss"],
    }


def _with_cpu_peak(config: str, overrides: list[str]) -> list[str]:
    """One CPU peak per precision for every variant: each worker probing its own would add
    noise to MFU."""
    t = load_config(config, overrides).train
    if t.peak_tflops is not None or torch.cuda.is_available():
        return overrides
    return [*overrides, f"train.peak_tflops={measured_peak(torch.device('cpu'), t.precision) / 1e12:.4f}"]


def failure_line(stderr: str) -> str:
    """The line that says why a worker failed: the last exception or ``seqtrain: error`` line,
    not torchrun's failure summary around it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^(seqtrain: error|[\w.]*(Error|Exception|Interrupt)\b)", ln) and "ChildFailedError" not in ln:
            return ln
    return next((ln for ln in reversed(lines) if ln.strip("=-") != ""), "(no output)")


def run_variant(variant: str, config: str, overrides: list[str], steps: int, warmup: int,
                nproc: int = 1) -> dict[str, Any]:
    overrides = _with_cpu_peak(config, overrides)
    cmd = [*python_launcher(nproc), "-m", "tools.bench", "worker", "--variant", variant, config,
           "--steps", str(steps), "--warmup", str(warmup), *(a for o in overrides for a in ("--set", o))]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        raise SeqtrainError(f"bench worker ({variant} {' '.join(overrides)}) exited {p.returncode}: "
                            f"{failure_line(p.stderr)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _variants(config: str, overrides: list[str], plain_overrides: list[str],
              features: bool) -> dict[str, tuple[str, list[str]]]:
    """Name ► (worker variant, overrides). The plain loop is data-parallel only: a layout with
    tensor or pipeline parallelism benches the trainer alone."""
    p = load_config(config, overrides).parallel
    variants: dict[str, tuple[str, list[str]]] = {"engine": ("engine", overrides)}
    if p.tp * p.pp == 1:
        # The plain loop runs without the trainer's host allocator tuning unless --plain-set asks.
        variants["plain"] = ("plain", [*overrides, "train.host_allocator=system", *plain_overrides])
    if features:
        variants |= {f"feature:{k}": ("engine", [*overrides, *v]) for k, v in FEATURES.items() if v}
    return variants


def bench(config: str, overrides: list[str], steps: int = 20, warmup: int = 5,
          features: bool = False, repeat: int = 1, nproc: int = 1,
          plain_overrides: list[str] | None = None) -> dict[str, Any]:
    """The trainer with ``overrides`` against the plain loop with ``overrides`` +
    ``plain_overrides`` (e.g. the plain loop's best options), and optionally each speed feature.

    Shared machines are noisy: every repeat runs each variant once, in turn (so a slow spell
    hits all of them), and each variant reports its best run, with the median beside it.
    """
    plain_overrides = plain_overrides or []
    results: dict[str, Any] = {"config": config, "overrides": overrides, "steps": steps,
                               "warmup": warmup, "repeat": repeat, "nproc": nproc,
                               "plain_overrides": plain_overrides, "plain": None}
    variants = _variants(config, overrides, plain_overrides, features)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, (variant, ovr) in variants.items():
            runs[name].append(run_variant(variant, config, ovr, steps, warmup, nproc))
    for name, rs in runs.items():
        best = _best_of(rs, runs["engine"])
        if name.startswith("feature:"):
            results.setdefault("features", {})[name.removeprefix("feature:")] = best
        else:
            results[name] = best
    if results["plain"] is not None:
        e, p = results["engine"], results["plain"]
        results["engine_overhead"] = 1 - e["tokens_per_s"] / p["tokens_per_s"]
        # Engine overhead from each repeat's adjacent pair (engine run, then plain run).
        results["engine_overhead_paired"] = [1 - 1 / x for x in p["paired_vs_engine"]]
        results["engine_overhead_paired_median"] = statistics.median(results["engine_overhead_paired"])
    return results


def _best_of(rs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's best run, with every run's tokens/s, their median, and each run against the
    trainer's run of the same repeat."""
    best = max(rs, key=lambda r: r["tokens_per_s"])
    best["all_tokens_per_s"] = [r["tokens_per_s"] for r in rs]
    best["median_tokens_per_s"] = statistics.median(best["all_tokens_per_s"])
    # Taken a minute apart: slow spells of a shared machine last minutes, so adjacent pairs
    # compare far better than bests do.
    best["paired_vs_engine"] = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, base, strict=True)]
    best["paired_vs_engine_median"] = statistics.median(best["paired_vs_engine"])
    return best


TABLE_PHASES = ("data", "forward", "backward", "optimizer", "step", "communication")
"""Phase columns (a pipeline reports ``data`` and ``step``, the others all but ``step``)."""


def table(results: dict[str, Any]) -> str:
    rows = [("engine", results["engine"])]
    if results["plain"] is not None:
        rows.append((" + ".join(["plain loop", *results.get("plain_overrides", [])]), results["plain"]))
    rows += [(f"engine + {k}", v) for k, v in results.get("features", {}).items()]
    head = ("| variant | tokens/s best | median | vs engine (paired median) | "
            + " | ".join(TABLE_PHASES) + " | MFU | peak MB |")
    lines = [head, "|" + " --- |" * (6 + len(TABLE_PHASES))]
    for name, r in rows:
        ms = "".join(f" {r['ms_per_step'][k]:.1f} |" if k in r["ms_per_step"] else " - |" for k in TABLE_PHASES)
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | "
            f"{100 * (r['paired_vs_engine_median'] - 1):+.1f}% |{ms} "
            f"{100 * r['mfu']:.1f}% | {r['peak_memory_mb']:,.0f} |"
        )
    n = results["nproc"]
    where = f"ms per optimizer step of the best run, {n} process{'es' if n > 1 else ''}"
    if results["plain"] is None:
        lines.append(f"\nno plain loop (it is data-parallel only); {where}")
        return "\n".join(lines)
    paired = results["engine_overhead_paired"]
    ahead = sum(x <= 0 for x in paired)
    lines.append(f"\nengine overhead vs plain loop: {100 * results['engine_overhead']:+.1f}% best against best, "
                 f"{100 * results['engine_overhead_paired_median']:+.1f}% median of {len(paired)} adjacent pairs "
                 f"(engine ahead or equal in {ahead}); {where}")
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["engine", "plain"], required=True)
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    result = worker(a.variant, a.config, a.overrides, a.steps, a.warmup)

    if distributed.rank() == 0:
        print(json.dumps(result), flush=True)
    distributed.leave(0)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(sys.argv[2:])
