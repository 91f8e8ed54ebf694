"""Under torchrun (or alone): build the layout given by ``--set`` overrides, reshard checkpoint
CKPT into it, then read every parameter's master weight and Adam moments back through the
optimizer (DeepSpeed's own getters under ZeRO) and check they equal the checkpoint's
consolidated tensors, sliced for this rank, exactly.

    python tests/trainer/checkpoint/reshard_worker.py CKPT CONFIG KEY=VALUE...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def read_back(engine, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # collectives: every rank, same order
        return {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
    st = engine.optimizer.state[p]
    return {"fp32": p.detach(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}


def main(ckpt: Path, config: str, overrides: list[str]) -> None:
    from trainer import checkpoint
    from trainer.build import build_data, build_model, build_module, setup
    from trainer.checkpoint import reshard
    from trainer.config import load_config

    cfg, dims, device = setup(load_config(config, overrides))
    cfg = build_data(cfg, dims).cfg
    module = build_module(cfg, build_model(cfg, dims, device), dims, device)
    state = reshard.read(ckpt, checkpoint.saved_config(ckpt))
    reshard.apply(module, state, cfg, dims)
    rename = reshard._local_to_single(cfg) if dims.pp > 1 else (lambda n: n)
    checked = 0
    for name, p in module.engine.module.named_parameters():
        got = read_back(module.engine, p)
        whole = rename(name)
        for k in reshard.KEYS:
            want = reshard._local_slice(state.tensors[k][whole], whole, cfg, dims)
            assert torch.equal(got[k].reshape(want.shape), want), (dims.rank, name, k)
        checked += 1
    steps = {float(st["step"]) for st in reshard._base_optimizer(module.engine).state.values()}
    assert steps == {state.adam_step}, steps
    print(f"rank {dims.rank}: {checked} parameters, moments and step {state.adam_step:g} equal", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    from trainer import distributed

    distributed.leave(0)  # trainer/distributed.py says why a rank leaves without teardown
