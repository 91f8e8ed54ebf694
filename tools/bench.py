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
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")

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
    "bf16": ["train.precision=bf16"],
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

        def timed(*args, _fn=fn, **kwargs):
            if not _comm["on"]:
                return _fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = _fn(*args, **kwargs)
            if kwargs.get("async_op") and out is not None:
                out.wait()
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


def worker(variant: str, config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    from trainer import distributed, host_memory
    from trainer.config import load_config
    from trainer.data.prefetch import Prefetcher
    from trainer.engine import build_optimizer, build_scheduler
    from trainer.flops import peak_flops
    from trainer.parallel import ParallelDims
    from trainer.train import _lm_data, _seq2seq_data, build_model

    cfg = load_config(config, [*overrides, "tracking.enabled=false", f"train.steps={steps + warmup}"])
    distributed.setup_environment()
    cfg = cfg.resolve(distributed.world_size())
    if distributed.world_size() > 1:
        _time_collectives()
    distributed.init_process_group()
    distributed.quiet_deepspeed()
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, distributed.rank())
    device = distributed.device()
    host_memory.configure(cfg.train.host_allocator, device)  # as the trainer does (the plain loop: only when asked)
    train_b, _, _ = _seq2seq_data(cfg, dims, []) if cfg.is_seq2seq else _lm_data(cfg, dims)
    t = cfg.train
    model = build_model(cfg, device)
    autocast = contextlib.nullcontext
    if variant == "engine":
        from trainer import engine as engine_mod

        engine, _ = engine_mod.initialize(model, cfg)
        forward, backward, opt_step = engine, engine.backward, engine.step
        scale = 1.0  # DeepSpeed divides by grad_accum itself
    else:
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg)
        forward, backward = model, lambda loss: loss.backward()
        if t.precision == "bf16":
            # The plain way to train in bf16: fp32 weights and optimizer, matmuls in bf16 under
            # autocast (DeepSpeed's bf16 instead keeps bf16 weights with an fp32 master copy).
            autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
        elif t.precision == "fp16":
            from trainer.errors import SeqtrainError

            raise SeqtrainError("seqtrain bench: the plain loop runs fp32 and bf16, not fp16 "
                                "(it has no loss scaler); bench train.precision=bf16 instead")
        micro_count = [0]

        def opt_step() -> None:
            micro_count[0] += 1
            if micro_count[0] % t.grad_accum == 0:
                if dims.world_size > 1:
                    # Data parallelism by hand: one flat all-reduce of the averaged gradients
                    # per optimizer step, none on accumulation micro-steps.
                    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    flat = _flatten_dense_tensors(grads).div_(dims.world_size)
                    torch.distributed.all_reduce(flat)
                    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                        g.copy_(r)
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)

        scale = 1.0 / t.grad_accum
    stateful = hasattr(train_b, "after_forward")
    source = (Prefetcher(train_b, dims.dp_rank, t.grad_accum, 0, steps + warmup)
              if cfg.data.prefetch and not stateful else train_b)

    from trainer.loop import sdpa_context

    def one_step(step: int, timed: dict[str, float] | None) -> tuple[torch.Tensor, int]:
        with sdpa_context(t.sdpa_backend):
            return _one_step(step, timed)

    def _one_step(step: int, timed: dict[str, float] | None) -> tuple[torch.Tensor, int]:
        loss_sum, tokens = torch.zeros((), device=device), 0
        for micro in range(t.grad_accum):
            comm_in = dict.fromkeys(PHASES, 0.0)
            t0 = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in source.micro_batch(step, micro, dims.dp_rank).items()}
            if timed is not None:
                _sync(device)
            t1 = time.perf_counter()
            c = _comm["s"]
            with autocast():
                out = forward(**batch)
            if stateful:
                train_b.after_forward(micro, out)
            loss = out[0] if isinstance(out, tuple) else out
            if timed is not None:
                _sync(device)
            t2 = time.perf_counter()
            comm_in["forward"], c = _comm["s"] - c, _comm["s"]
            backward(loss * scale)
            if timed is not None:
                _sync(device)
            t3 = time.perf_counter()
            comm_in["backward"], c = _comm["s"] - c, _comm["s"]
            opt_step()
            comm_in["optimizer"] = _comm["s"] - c
            if timed is not None:
                _sync(device)
                t4 = time.perf_counter()
                for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    timed[name] += dt - comm_in[name]
                    timed["communication"] += comm_in[name]
            loss_sum += loss.detach()
            tokens += int((batch["labels"] != -100).sum()) if timed is not None else batch["labels"].numel()
        return loss_sum / t.grad_accum, tokens

    for s in range(warmup):
        one_step(s, None)
    _sync(device)
    # Steady state: the loop as it runs, a host sync only at the logging cadence.
    every = t.log_every
    t0 = time.perf_counter()
    n_tok = 0
    half = steps // 2
    for s in range(warmup, warmup + half):
        loss, tok = one_step(s, None)
        n_tok += tok
        if (s + 1) % every == 0:
            float(loss)  # the logging cadence's host sync point
    _sync(device)
    steady = n_tok / (time.perf_counter() - t0)  # this replica's tokens/s (replicas run in lockstep)
    # Phase split: synchronised at every boundary.
    timed = dict.fromkeys((*PHASES, "communication"), 0.0)
    last = 0.0
    _comm.update(on=True, calls=0)
    for s in range(warmup + half, warmup + steps):
        loss, _ = one_step(s, timed)
        last = float(loss)
    _comm["on"] = False
    n_timed = steps - half
    fpt, fpt_6n = model.flops_per_token(cfg.data.seq_len)
    peak = peak_flops(device, t.precision, t.peak_tflops)
    if isinstance(source, Prefetcher):
        source.close()
    return {
        "variant": variant,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "params": model.num_params(),
        "tokens_per_s": steady * dims.world_size,  # all replicas together
        "world_size": dims.world_size,
        # Communication: time inside torch.distributed collectives (none with one process),
        # taken out of the phase it happened in.
        "ms_per_step": {k: 1000 * v / n_timed for k, v in timed.items()},
        "collectives_per_step": _comm["calls"] / n_timed,
        "mfu": steady * fpt / peak,
        "flops_per_token": fpt,
        "flops_per_token_6n": fpt_6n,
        "peak_flops": peak,
        "peak_memory_mb": _peak_memory_mb(device),
        "final_loss": last,
    }


def _with_cpu_peak(config: str, overrides: list[str]) -> list[str]:
    """One CPU peak per precision for every variant: each worker probing its own would add
    noise to MFU."""
    from trainer.config import load_config
    from trainer.flops import matmul_peak

    t = load_config(config, overrides).train
    if t.peak_tflops is not None or torch.cuda.is_available():
        return overrides
    return [*overrides, f"train.peak_tflops={matmul_peak(precision=t.precision) / 1e12:.4f}"]


def run_variant(variant: str, config: str, overrides: list[str], steps: int, warmup: int,
                nproc: int = 1) -> dict[str, Any]:
    overrides = _with_cpu_peak(config, overrides)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "tools.bench", "worker", "--variant", variant, config,
           "--steps", str(steps), "--warmup", str(warmup), *(a for o in overrides for a in ("--set", o))]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        from trainer.errors import SeqtrainError

        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SeqtrainError(f"bench worker ({variant} {' '.join(overrides)}) failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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
                               "plain_overrides": plain_overrides}
    # The plain loop runs without the trainer's host allocator tuning unless --plain-set asks.
    plain = [*overrides, "train.host_allocator=system", *plain_overrides]
    variants: dict[str, tuple[str, list[str]]] = {"engine": ("engine", overrides), "plain": ("plain", plain)}
    if features:
        variants |= {f"feature:{k}": ("engine", [*overrides, *v]) for k, v in FEATURES.items() if v}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, (variant, ovr) in variants.items():
            runs[name].append(run_variant(variant, config, ovr, steps, warmup, nproc))
    base = runs["engine"]
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        best["all_tokens_per_s"] = [r["tokens_per_s"] for r in rs]
        best["median_tokens_per_s"] = statistics.median(best["all_tokens_per_s"])
        # Against the trainer's run of the same repeat, taken a minute apart: slow spells of a
        # shared machine last minutes, so adjacent pairs compare far better than bests do.
        best["paired_vs_engine"] = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, base, strict=True)]
        best["paired_vs_engine_median"] = statistics.median(best["paired_vs_engine"])
        if name.startswith("feature:"):
            results.setdefault("features", {})[name.removeprefix("feature:")] = best
        else:
            results[name] = best
    e, p = results["engine"], results["plain"]
    results["engine_overhead"] = 1 - e["tokens_per_s"] / p["tokens_per_s"]
    # Engine overhead from each repeat's adjacent pair (engine run, then plain run).
    results["engine_overhead_paired"] = [1 - 1 / x for x in p["paired_vs_engine"]]
    results["engine_overhead_paired_median"] = statistics.median(results["engine_overhead_paired"])
    return results


def table(results: dict[str, Any]) -> str:
    plain = " + ".join(["plain loop", *results.get("plain_overrides", [])])
    rows = [("engine", results["engine"]), (plain, results["plain"])]
    rows += [(f"engine + {k}", v) for k, v in results.get("features", {}).items()]
    head = ("| variant | tokens/s best | median | vs engine (paired median) | data | forward | backward "
            "| optimizer | comm | MFU | peak MB |")
    lines = [head, "|" + " --- |" * 11]
    for name, r in rows:
        ms = r["ms_per_step"]
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | "
            f"{100 * (r['paired_vs_engine_median'] - 1):+.1f}% | "
            f"{ms['data']:.1f} | {ms['forward']:.1f} | {ms['backward']:.1f} | "
            f"{ms['optimizer']:.1f} | {ms['communication']:.1f} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_memory_mb']:,.0f} |"
        )
    n, paired = results["nproc"], results["engine_overhead_paired"]
    ahead = sum(x <= 0 for x in paired)
    lines.append(f"\nengine overhead vs plain loop: {100 * results['engine_overhead']:+.1f}% best against best, "
                 f"{100 * results['engine_overhead_paired_median']:+.1f}% median of {len(paired)} adjacent pairs "
                 f"(engine ahead or equal in {ahead}); ms per optimizer step of the best run, "
                 f"{n} process{'es' if n > 1 else ''}")
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
    from trainer import distributed

    if distributed.rank() == 0:
        print(json.dumps(result), flush=True)
    distributed.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(sys.argv[2:])
