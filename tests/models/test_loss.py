"""The chunked head + cross-entropy (``train.loss_chunk``) against whole logits and ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build
from models.gpt import GPTConfig
from models.loss import TokenCrossEntropy
from tests.conftest import REPO


def _reference(h, w, y, smoothing: float, z: float) -> torch.Tensor:
    """torch's own cross-entropy on whole logits, plus the z term written out."""
    x = F.linear(h, w).float()
    valid = y != -100
    zterm = z * (torch.logsumexp(x, -1).square() * valid).sum() / valid.sum()
    return F.cross_entropy(x, y, ignore_index=-100, label_smoothing=smoothing) + zterm


@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 1e-3)], ids=["plain", "smoothing-zloss"])
def test_chunked_loss_and_gradients_equal_whole_logits(smoothing, z):
    torch.manual_seed(0)
    n, d, vocab = 300, 32, 211  # 300 tokens in chunks of 64: the last one short
    h = torch.randn(n, d, requires_grad=True)
    w = (0.02 * torch.randn(vocab, d)).requires_grad_()
    y = torch.randint(0, vocab, (n,))
    y[::7] = -100  # ignored tokens count in no sum and no mean
    ref = _reference(h, w, y, smoothing, z)
    ref_h, ref_w = torch.autograd.grad(3.0 * ref, (h, w))  # an upstream gradient other than 1
    loss_fn = TokenCrossEntropy(smoothing)
    loss_fn.z_loss, loss_fn.chunk_tokens = z, 64
    got = loss_fn.head_forward(h, w, y)
    got_h, got_w = torch.autograd.grad(3.0 * got, (h, w))
    assert abs(got.item() - ref.item()) < 1e-6
    assert (got_h - ref_h).abs().max() < 1e-6 and (got_w - ref_w).abs().max() < 1e-6
    if z:  # the logged z term is the one added
        zref = ref.item() - F.cross_entropy(F.linear(h, w), y, ignore_index=-100, label_smoothing=smoothing).item()
        assert loss_fn.take_z_loss().item() == pytest.approx(zref, abs=1e-6)
    loss_fn.eval()  # evaluation: no smoothing, no z, no gradients kept
    with torch.no_grad():
        assert abs(loss_fn.head_forward(h, w, y).item() - _reference(h, w, y, 0.0, 0.0).item()) < 1e-6


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_gpt_with_chunked_loss_trains_as_with_whole_logits(shape):
    """Every parameter's gradient, the tied embedding's two contributions included (GPT-2
    shape), within 1e-6 of the whole-logits model's."""
    extra = {} if shape == "gpt2" else dict(position="rope", norm="rmsnorm", activation="swiglu", d_ff=64,
                                            n_kv_head=1, bias=False, tie_embeddings=False)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=32, vocab_size=300, **extra)
    ids = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    whole, chunked = build(cfg, seed=0), build(cfg, seed=0)
    chunked.loss_fn.chunk_tokens = 20
    for m in (whole, chunked):
        m.loss_fn.z_loss = 1e-3
        m(ids, ids).backward()
    assert abs(whole(ids, ids).item() - chunked(ids, ids).item()) < 1e-6
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() < 1e-6, name


def test_chunks_keep_no_logits_for_backward():
    """What autograd keeps between forward and backward: whole logits (tokens × vocab in fp32,
    and their softmax) without chunks; the head input's and the weight's gradients with them."""
    from tools.bench_activations import saved_bytes
    from tools.bench_loss_chunk import Head

    tokens, d, vocab = 512, 64, 4096
    h, y = torch.randn(tokens, d, requires_grad=True), torch.randint(0, vocab, (tokens,))
    whole = saved_bytes(Head(d, vocab, chunk=0), h, y)
    chunked = saved_bytes(Head(d, vocab, chunk=128), h, y)
    logits, kept = tokens * vocab * 4, (tokens * d + vocab * d) * 4  # fp32
    assert whole > logits  # the log-softmax cross-entropy saves
    assert whole - chunked >= logits - kept  # traded for the two gradients, nothing else


def test_loss_chunk_config_resolution():
    from trainer.config import load_config
    from trainer.errors import ConfigError

    preset, vocab = str(REPO / "configs/gpt/gpt2-124m.yaml"), "model.vocab_size=50304"
    assert load_config(preset, [vocab]).loss_chunk_tokens() == 2**26 // 50304  # 256 MiB of fp32 logits
    assert load_config(preset, [vocab, "train.loss_chunk=0"]).loss_chunk_tokens() == 0
    assert load_config(preset, [vocab, "train.loss_chunk=512"]).loss_chunk_tokens() == 512
    for layout in ("parallel.tp=2", "parallel.zero_stage=3"):  # automatic: whole logits there
        assert load_config(preset, [vocab, layout]).loss_chunk_tokens() == 0
    with pytest.raises(ConfigError, match=r"train.loss_chunk=512 applies to model.family gpt without tensor"):
        load_config(preset, ["train.loss_chunk=512", "parallel.tp=2"]).resolve(2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_loss_on_the_gpu_in_bf16():
    """bf16 head input and weight, as DeepSpeed's bf16 engine runs them: the chunks' loss and
    gradients within bf16's rounding of the whole-logits path (fp32 logits in both)."""
    torch.manual_seed(0)
    n, d, vocab = 4096, 256, 50304
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(vocab, d, device="cuda")).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    whole, chunked = TokenCrossEntropy(), TokenCrossEntropy()
    chunked.chunk_tokens = 1024
    a = whole(F.linear(h, w), y)
    ga = torch.autograd.grad(a, (h, w))
    b = chunked.head_forward(h, w, y)
    gb = torch.autograd.grad(b, (h, w))
    assert abs(a.item() - b.item()) < 1e-3 * a.item()
    for x, z in zip(ga, gb, strict=True):
        assert (x.float() - z.float()).norm() < 2**-7 * x.float().norm()
