"""Context parallelism against the single-device GPT (2 forked gloo processes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from models import build
from models.gpt import GPTConfig
from tests.trainer.parallel.test_tensor import _spawn
from trainer.parallel.context import apply_context_parallel, heads_to_tokens, tokens_to_heads

pytestmark = pytest.mark.distributed

CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=64, dropout=0.0)
# The Llama shape with grouped-query attention (a key/value head per rank) and the z-loss.
LLAMA = CFG.model_copy(update=dict(n_kv_head=2, position="rope", norm="rmsnorm", activation="swiglu",
                                   bias=False, tie_embeddings=False, d_ff=48))


def _mean(t: torch.Tensor, world: int) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world


def _equals_single_device_llama(rank: int, world: int) -> None:
    _equals_single_device(rank, world, LLAMA, z_loss=1e-2)


def _equals_single_device(rank: int, world: int, cfg: GPTConfig = CFG, z_loss: float = 0.0) -> None:
    """The mean over cp ranks of their losses and gradients (what DeepSpeed's data-parallel
    averaging makes of them) equals the single-device model's, with labels ignored unevenly
    across the ranks' parts; evaluation mode gives the whole logits on every rank."""
    torch.manual_seed(0)
    ids, labels = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    labels[0, :5] = -100  # all in rank 0's half
    full = build(cfg, seed=3)
    cp = apply_context_parallel(copy.deepcopy(full), dist.group.WORLD)
    full.loss_fn.z_loss = cp.loss_fn.z_loss = z_loss
    loss_ref, loss = full(ids, labels), cp(ids, labels)
    torch.testing.assert_close(_mean(loss, world), loss_ref, atol=1e-6, rtol=1e-6)
    loss_ref.backward()
    loss.backward()
    ref = dict(full.named_parameters())
    for name, p in cp.named_parameters():
        torch.testing.assert_close(_mean(p.grad, world), ref[name].grad, atol=1e-6, rtol=1e-5, msg=name)
    full.eval()
    cp.eval()
    torch.testing.assert_close(cp(ids), full(ids), atol=1e-6, rtol=1e-5)


def _all_to_all_round_trip(rank: int, world: int) -> None:
    """tokens ► heads gives each rank its channel block of the whole sequence in order, and
    heads ► tokens inverts it."""
    torch.manual_seed(1)
    whole = torch.randn(2, 8, 12)  # the same on every rank: (b, s, c)
    mine = whole.chunk(world, dim=1)[rank]
    heads = tokens_to_heads(mine, dist.group.WORLD)
    assert torch.equal(heads, whole.chunk(world, dim=2)[rank])
    assert torch.equal(heads_to_tokens(heads, dist.group.WORLD), mine)


@pytest.mark.parametrize("fn", [_equals_single_device, _equals_single_device_llama, _all_to_all_round_trip],
                         ids=["parity", "parity-llama-gqa-zloss", "all-to-all"])
def test_context_parallel(fn) -> None:
    _spawn(fn)
