"""Activation memory per rank: one process, tensor parallelism, and with sequence parallelism.

    python -m tools.bench_activations [--seq 2048] [--batch 1] [--tp 2]

Counts the bytes autograd keeps for backward during one training forward of the debug GPT
(``configs/gpt/debug.yaml``'s shape, positions extended to ``--seq``), every saved tensor's
storage once (views of one buffer count once; parameters are not activations and are left
out). That is what a GPU holds between forward and backward, without the allocator's rounding,
measured the same way in every layout. The tensor-parallel ranks are forked gloo processes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import build
from models.gpt import GPTConfig
from trainer.config import load_config
from trainer.distributed import free_port
from trainer.families import FAMILIES
from trainer.parallel.sequence import apply_sequence_parallel
from trainer.parallel.tensor import apply_tensor_parallel


def saved_bytes(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``model(*inputs)`` (a
    loss), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*inputs)
    loss.backward()  # runs the backward collectives too, so every rank ends in step
    return sum(seen.values())


def _model(cfg: GPTConfig, layout: str) -> torch.nn.Module:
    model = build(cfg, seed=0)
    if layout == "one process":
        return model
    spec = FAMILIES["gpt"]
    if layout.endswith("+ sp"):
        return apply_sequence_parallel(model, spec.tp_plan, spec.sp_plan, dist.group.WORLD, cfg.vocab_size)

    return apply_tensor_parallel(model, spec.tp_plan, dist.group.WORLD, spec.tp_rng_regions, cfg.vocab_size)


def _rank(rank: int, world: int, port: int, cfg: GPTConfig, batch: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    for layout in (f"tp{world}", f"tp{world} + sp"):
        n = saved_bytes(_model(cfg, layout), ids, ids)
        if rank == 0:
            out.put((layout, n))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args(argv)
    model = load_config("configs/gpt/debug.yaml", []).model
    cfg = GPTConfig(**{**model.model_dump(), "max_seq_len": args.seq, "vocab_size": 2048})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    rows = [("one process", saved_bytes(_model(cfg, "one process"), ids, ids))]
    out = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_rank, args=(args.tp, free_port(), cfg, args.batch, out), nprocs=args.tp, start_method="fork")
    while not out.empty():
        rows.append(out.get())
    print(f"debug GPT (n_layer {cfg.n_layer}, d_model {cfg.d_model}, {cfg.n_head} heads), sequence "
          f"{args.seq}, micro-batch {args.batch}, fp32: activation memory per rank (saved for backward)")
    print("| layout | MiB per rank | of one process |\n| --- | ---: | ---: |")
    for layout, n in rows:
        print(f"| {layout} | {n / 2**20:.1f} | {n / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
