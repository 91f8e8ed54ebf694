"""Sequence parallelism against the single-device GPT (2 forked gloo processes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from models import build
from models.gpt import GPTConfig
from tests.trainer.parallel.test_tensor import _sharded_grad_matches, _spawn
from trainer.families import FAMILIES
from trainer.parallel.sequence import apply_sequence_parallel
from trainer.parallel.tensor import apply_tensor_parallel

pytestmark = pytest.mark.distributed

CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=64, dropout=0.0)
# The Llama shape with grouped-query attention (a key/value head per rank) and the z-loss.
LLAMA = CFG.model_copy(update=dict(n_kv_head=2, position="rope", norm="rmsnorm", activation="swiglu",
                                   bias=False, tie_embeddings=False, d_ff=48))
SPEC = FAMILIES["gpt"]


def _sp(model: torch.nn.Module) -> torch.nn.Module:
    return apply_sequence_parallel(model, SPEC.tp_plan, SPEC.sp_plan, dist.group.WORLD, 64)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 64, (3, 16)), "labels": torch.randint(0, 64, (3, 16))}
    batch["labels"][0, :5] = -100
    return batch


def _equals_single_device_llama(rank: int, world: int) -> None:
    _equals_single_device(rank, world, LLAMA, z_loss=1e-2)


def _equals_single_device(rank: int, world: int, cfg: GPTConfig = CFG, z_loss: float = 0.0) -> None:
    """Loss and every gradient (sharded ones by their slice, whole ones whole) equal the
    single-device model's; evaluation mode gives its whole logits."""
    batch = _batch()
    full = build(cfg, seed=3)
    sp = _sp(copy.deepcopy(full))
    full.loss_fn.z_loss = sp.loss_fn.z_loss = z_loss
    loss_ref, loss = full(**batch), sp(**batch)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    loss_ref.backward()
    loss.backward()
    _sharded_grad_matches(full, sp, rank, world)
    full.eval()
    sp.eval()
    torch.testing.assert_close(sp(batch["input_ids"]), full(batch["input_ids"]), atol=1e-6, rtol=1e-5)


def _saved_shapes(model: torch.nn.Module, batch: dict) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return shapes


def _keeps_shards(rank: int, world: int) -> None:
    """No (batch, whole sequence, whole width) activation is kept for backward under sequence
    parallelism; plain tensor parallelism keeps several per block (its LayerNorm and linear
    inputs, residuals)."""
    batch = _batch()
    whole = (3, 16, CFG.d_model)
    tp = apply_tensor_parallel(build(CFG, seed=3), SPEC.tp_plan, dist.group.WORLD, SPEC.tp_rng_regions, 64)
    assert _saved_shapes(tp, batch).count(whole) >= 2 * CFG.n_layer
    shapes = _saved_shapes(_sp(build(CFG, seed=3)), batch)
    assert whole not in shapes
    assert shapes.count((3, 16 // world, CFG.d_model)) >= 2 * CFG.n_layer


def _dropout_per_rank(rank: int, world: int) -> None:
    """With dropout on, each rank's tokens draw their own masks, reproducibly: the same seed
    gives the same loss, and the ranks' embedding dropouts differ."""
    cfg = CFG.model_copy(update={"dropout": 0.5})
    model = _sp(build(cfg, seed=3))
    seen: list[torch.Tensor] = []
    model.h[0].ln_1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = torch.zeros(2, 16, dtype=torch.long)  # the same token everywhere: only dropout differs
    losses = []
    for _ in range(2):
        torch.manual_seed(11)
        losses.append(model(x, x))
    assert torch.equal(losses[0], losses[1])
    both = [torch.empty_like(seen[-1]) for _ in range(world)]
    dist.all_gather(both, seen[-1])
    assert not torch.equal(both[0], both[1])


@pytest.mark.parametrize("fn", [_equals_single_device, _equals_single_device_llama, _keeps_shards, _dropout_per_rank],
                         ids=["parity", "parity-llama-gqa-zloss", "shards", "dropout"])
def test_sequence_parallel(fn) -> None:
    _spawn(fn)
