"""Export to Hugging Face ``transformers`` (and plain safetensors); the GPT ⇄ GPT-2 weight map.

GPT-2 stores linear weights as ``Conv1D`` (in, out) and fuses q, k, v into ``c_attn``; we keep
``nn.Linear`` (out, in) and separate q/k/v, so the mapping transposes and concatenates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from models.fused_qkv import fuse, unfuse
from trainer import checkpoint
from trainer.data.tokenizer import EOS, PAD, UNK
from trainer.errors import SeqtrainError
from trainer.evaluation.inference import load_for_inference

# Our ``model.activation`` ► transformers' ``activation_function`` (GPT-2's own is ``gelu_new``).
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def gpt_to_gpt2_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our GPT's weights under GPT-2's names and layouts (``transformer.*`` and ``lm_head``)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": sd["wte.weight"],
        "transformer.wpe.weight": sd["wpe.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for name in ("ln_f.weight", "ln_f.bias"):
        if name in sd:
            out[f"transformer.{name}"] = sd[name]
    head_dim = model.cfg.d_model // model.cfg.n_head
    for i in range(model.cfg.n_layer):
        p, q = f"h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            for part in ("weight", "bias"):
                if f"{p}{ln}.{part}" in sd:
                    out[f"{q}{ln}.{part}"] = sd[f"{p}{ln}.{part}"]
        # Ours is head-major (models/fused_qkv.py), GPT-2's q, k, v blocks one after another.
        for part in ("weight", "bias"):
            if f"{p}attn.c_attn.{part}" in sd:
                w = torch.cat(unfuse(sd[f"{p}attn.c_attn.{part}"], head_dim, 3))
                out[f"{q}attn.c_attn.{part}"] = w.t().contiguous() if part == "weight" else w
        for lin in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"{q}{lin}.weight"] = sd[f"{p}{lin}.weight"].t().contiguous()
            if f"{p}{lin}.bias" in sd:
                out[f"{q}{lin}.bias"] = sd[f"{p}{lin}.bias"]
    return out


def gpt2_to_gpt_state_dict(sd: dict[str, torch.Tensor], n_layer: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The inverse of ``gpt_to_gpt2_state_dict``: GPT-2 weights under our names and layouts."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
           "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"],
           "lm_head.weight": sd.get("lm_head.weight", sd["wte.weight"])}
    for i in range(n_layer):
        p = f"h.{i}."
        for part in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            out[p + part] = sd[p + part]
        for part, t in (("weight", sd[p + "attn.c_attn.weight"].t()), ("bias", sd[p + "attn.c_attn.bias"])):
            out[f"{p}attn.c_attn.{part}"] = fuse(t.chunk(3), head_dim).contiguous()
        for lin in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"{p}{lin}.weight"] = sd[f"{p}{lin}.weight"].t().contiguous()
            out[f"{p}{lin}.bias"] = sd[f"{p}{lin}.bias"]
    return out


def export_hf(ckpt_path: str | Path, out: str | Path) -> dict[str, float]:
    """Write a ``transformers`` GPT-2 model (config.json, model.safetensors) and a
    ``PreTrainedTokenizerFast`` to ``out``; reload it and return the logit difference."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    model, tok, _, cfg = load_for_inference(ckpt_path)
    c = cfg.model
    if c.family != "gpt":  # by name, on purpose: the GPT-2 format holds our GPT and nothing else
        raise SeqtrainError(
            f"{ckpt_path}: a {c.family} checkpoint; --format hf exports GPT models (see the README "
            "for the encoder-decoder); --format safetensors exports any family"
        )
    if not c.bias:
        raise SeqtrainError(f"{ckpt_path}: model.bias=false has no GPT-2 equivalent (GPT-2 has biases)")
    eos = tok.token_to_id(EOS)
    hf_cfg = GPT2Config(
        vocab_size=model.wte.weight.shape[0], n_positions=c.max_seq_len, n_embd=c.d_model,
        n_layer=c.n_layer, n_head=c.n_head, n_inner=c.ff_size,
        activation_function=HF_ACTIVATION[c.activation], layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
        attn_pdrop=c.dropout, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=tok.token_to_id(PAD), tie_word_embeddings=c.tie_embeddings,
    )
    from accelerate import init_empty_weights

    # Build the transformers model on the meta device and assign our tensors to it: no second
    # copy of the weights is ever allocated (it matters for a model that barely fits in memory).
    with init_empty_weights():
        hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(gpt_to_gpt2_state_dict(model), strict=False, assign=True)
    if c.tie_embeddings:
        hf.tie_weights()
    hf.eval()
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if c.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SeqtrainError(f"GPT-2 mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = Path(out)
    hf.save_pretrained(out, safe_serialization=True)
    specials = {"eos_token": EOS, "bos_token": EOS, "pad_token": PAD}
    if tok.token_to_id(UNK) is not None:
        specials["unk_token"] = UNK
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=c.max_seq_len, **specials).save_pretrained(out)

    # Proof, not hope: reload from disk and compare logits with ours.
    reloaded = GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    x = torch.randint(0, tok.get_vocab_size(), (2, min(32, c.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(x).logits - model(x)).abs().max().item()
    return {"max_abs_logit_diff": diff}


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    """Full fp32 weights of any family and layout (ZeRO-3 included) as one safetensors file."""
    from safetensors.torch import save_model

    model, _, _, _ = load_for_inference(ckpt_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))  # shared (tied) tensors stored once
    shutil.copyfile(checkpoint.resolve(ckpt_path) / "config.yaml", out / "config.yaml")
    return out / "model.safetensors"
