"""Tensor-parallel layers against the single-device model they shard (2 forked gloo processes)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import build
from models.encdec import EncDecConfig
from models.fused_qkv import fuse
from models.gpt import GPTConfig
from trainer.distributed import free_port
from trainer.families import FAMILIES
from trainer.parallel.tensor import apply_tensor_parallel

pytestmark = pytest.mark.distributed


def _spawn(fn, world: int = 2) -> None:
    port = free_port()
    mp.start_processes(_entry, args=(fn, world, port), nprocs=world, start_method="fork")


def _entry(rank: int, fn, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world)
    finally:
        dist.destroy_process_group()


def _sharded_grad_matches(full: torch.nn.Module, tp: torch.nn.Module, rank: int, world: int) -> None:
    """Every parameter of the TP model: its gradient equals the full gradient's slice."""
    ref = dict(full.named_parameters(remove_duplicate=False))
    for name, p in tp.named_parameters():
        g = ref[name].grad
        if getattr(p, "tensor_model_parallel", False):
            g = g.chunk(world, dim=p.partition_dim)[rank]
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5, msg=f"grad of {name}")


def _check_family(family: str, rank: int, world: int) -> None:
    torch.manual_seed(0)
    if family in ("gpt", "llama"):
        llama = dict(n_kv_head=2, position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                     tie_embeddings=False, d_ff=48)
        cfg = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=64, dropout=0.0,
                        **(llama if family == "llama" else {}))
        batch = {"input_ids": torch.randint(0, 64, (3, 16))}
        batch["labels"] = torch.randint(0, 64, (3, 16))
        batch["labels"][0, :5] = -100
        full_vocab = 64
    else:
        cfg = EncDecConfig(n_enc_layers=2, n_dec_layers=2, n_head=4, d_model=32, max_seq_len=16,
                           src_vocab_size=48, tgt_vocab_size=64, dropout=0.0, label_smoothing=0.1)
        batch = {"src": torch.randint(2, 48, (3, 10)), "tgt_in": torch.randint(2, 64, (3, 9)),
                 "labels": torch.randint(2, 64, (3, 9))}
        batch["src"][1, 7:] = cfg.pad_id
        full_vocab = 64
    full = build(cfg, seed=3)
    spec = FAMILIES[cfg.family]
    tp = apply_tensor_parallel(copy.deepcopy(full), spec.tp_plan, dist.group.WORLD, spec.tp_rng_regions, full_vocab)
    if family == "llama":  # and the z-loss, through the vocab-parallel loss
        full.loss_fn.z_loss = tp.loss_fn.z_loss = 1e-2
    loss_ref = full(**batch)
    loss = tp(**batch)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    loss_ref.backward()
    loss.backward()
    _sharded_grad_matches(full, tp, rank, world)
    # Evaluation mode gathers whole logits (decoding needs them) and the loss is the plain one.
    full.eval()
    tp.eval()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(tp(**no_labels), full(**no_labels), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tp(**batch), full(**batch), atol=1e-6, rtol=1e-6)


def _gpt(rank: int, world: int) -> None:
    _check_family("gpt", rank, world)


def _llama(rank: int, world: int) -> None:
    _check_family("llama", rank, world)


def _encdec(rank: int, world: int) -> None:
    _check_family("encdec", rank, world)


def _dropout(rank: int, world: int) -> None:
    """With dropout on, replicated activations must see the same masks on every tensor rank:
    then the replicated parameters' gradients agree exactly across ranks."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=64, dropout=0.3)
    model = apply_tensor_parallel(build(cfg, seed=3), FAMILIES["gpt"].tp_plan, dist.group.WORLD,
                                  FAMILIES["gpt"].tp_rng_regions, 64)
    torch.manual_seed(11)  # the same stream on both ranks, as training seeds it
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            both = [torch.empty_like(p.grad) for _ in range(world)]
            dist.all_gather(both, p.grad)
            assert torch.equal(both[0], both[1]), f"replicated {name} got different gradients"
    # Inside the head-parallel region each rank draws its own masks. Give both ranks' heads
    # the same weights: the attention outputs (row-parallel inputs) then differ only by dropout.
    attn = model.h[0].attn
    with torch.no_grad():
        attn.c_attn.bias.zero_()
        zero = torch.zeros(16, 32)
        attn.c_attn.weight.copy_(fuse([zero, zero, torch.eye(32)[:16]], attn.head_dim))
    seen: list[torch.Tensor] = []
    attn.c_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    for train in (False, True):
        model.train(train)
        torch.manual_seed(5)
        model(x)
        both = [torch.empty_like(seen[-1]) for _ in range(world)]
        dist.all_gather(both, seen[-1])
        assert torch.equal(both[0], both[1]) is not train, f"train={train}: head outputs across ranks"


@pytest.mark.parametrize("fn", [_gpt, _llama, _encdec, _dropout], ids=["gpt", "llama-gqa-zloss", "encdec", "dropout"])
def test_tensor_parallel_equals_single_device(fn) -> None:
    _spawn(fn)
