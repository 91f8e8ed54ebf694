"""Export to Hugging Face ``transformers`` (and plain safetensors); the GPT ⇄ GPT-2 and
GPT ⇄ Llama weight maps and configs.

Our GPT in its GPT-2 shape is a ``GPT2LMHeadModel``, in its Llama shape (RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases) a ``LlamaForCausalLM``; ``hf_class`` says which, or why
neither computes a configuration. GPT-2 stores linear weights as ``Conv1D`` (in, out) and keeps
q, k, v in three blocks of ``c_attn``; Llama keeps ``nn.Linear`` (out, in) and separate
q/k/v projections. Ours is ``nn.Linear`` with q/k/v fused by key/value group
(``models/fused_qkv.py``), so the maps transpose, split and concatenate: permutations, exact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from models import GPTConfig
from models.fused_qkv import fuse, fuse_groups, unfuse, unfuse_groups
from models.gpt import RopeScaling
from trainer import checkpoint
from trainer.data.tokenizer import EOS, PAD, UNK
from trainer.errors import CheckpointError, SeqtrainError
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


# Our Llama-shape name ► transformers' Llama name, per block (``h.{i}.`` ► ``model.layers.{i}.``).
LLAMA_BLOCK = {
    "ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight",
}
LLAMA_SHAPE = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False, "qk_norm": False}
GPT2_SHAPE = {"position": "learned", "norm": "layernorm", "bias": True, "qk_norm": False}


def hf_class(c: GPTConfig) -> str:
    """``gpt2`` or ``llama``: the transformers model that computes what ``c`` computes; raises a
    one-line ``SeqtrainError`` naming the key when none does."""
    def off(shape: dict) -> list[str]:
        return [f"model.{k}={getattr(c, k)!r}" for k, v in shape.items() if getattr(c, k) != v]

    if c.mup is not None:  # its logit multiplier and 1/head_dim attention are in no HF config
        raise SeqtrainError(f"--format hf: no transformers class computes a μP model (model.mup.base_width="
                            f"{c.mup.base_width} of d_model {c.d_model}); --format safetensors exports it")
    if not off(GPT2_SHAPE) and c.activation != "swiglu" and c.kv_heads == c.n_head:
        return "gpt2"
    if not off(LLAMA_SHAPE):
        return "llama"
    llama, gpt2 = off(LLAMA_SHAPE), off(GPT2_SHAPE)
    why = "LlamaForCausalLM has no query/key norm" if c.qk_norm else \
        f"LlamaForCausalLM needs {', '.join(llama)} changed, GPT2LMHeadModel {', '.join(gpt2) or 'multi-head GELU'}"
    raise SeqtrainError(f"--format hf: no transformers class computes this model ({why}); "
                        "--format safetensors exports it")


def gpt_to_llama_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our Llama-shaped GPT's weights under ``LlamaForCausalLM``'s names."""
    c, sd = model.cfg, {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.n_layer):
        p, q = f"h.{i}.", f"model.layers.{i}."
        for ours, theirs in LLAMA_BLOCK.items():
            out[q + theirs] = sd[p + ours]
        qw, kw, vw = unfuse_groups(sd[p + "attn.c_attn.weight"], c.head_dim, c.n_head // c.kv_heads)
        out |= {q + "self_attn.q_proj.weight": qw, q + "self_attn.k_proj.weight": kw, q + "self_attn.v_proj.weight": vw}
        # Our c_fc alternates gate and up units (models/gpt.py's MLP).
        out[q + "mlp.gate_proj.weight"] = sd[p + "mlp.c_fc.weight"][0::2].contiguous()
        out[q + "mlp.up_proj.weight"] = sd[p + "mlp.c_fc.weight"][1::2].contiguous()
    return out


def llama_to_gpt_state_dict(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``gpt_to_llama_state_dict``."""
    out = {"wte.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(c.n_layer):
        p, q = f"h.{i}.", f"model.layers.{i}.self_attn."
        for ours, theirs in LLAMA_BLOCK.items():
            out[p + ours] = sd[f"model.layers.{i}.{theirs}"]
        out[p + "attn.c_attn.weight"] = fuse_groups(
            sd[q + "q_proj.weight"], sd[q + "k_proj.weight"], sd[q + "v_proj.weight"], c.head_dim)
        mlp = f"model.layers.{i}.mlp."
        out[p + "mlp.c_fc.weight"] = torch.stack([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]], 1).flatten(0, 1)
    return out


def llama_config(c: GPTConfig, vocab_size: int, **tokens):
    """The ``LlamaConfig`` of our Llama-shaped model config."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=c.d_model, intermediate_size=c.ff_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters=rope, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
        mlp_bias=False, attention_dropout=c.dropout, hidden_act="silu", **tokens,
    )


def gpt_config_of_llama(hf_cfg, where: str) -> GPTConfig:
    """Our model config of a ``LlamaConfig``; one line naming the field we cannot compute."""
    rope = dict(getattr(hf_cfg, "rope_parameters", None) or
                {"rope_theta": getattr(hf_cfg, "rope_theta", 10000.0), **(getattr(hf_cfg, "rope_scaling", None) or {})})
    kind = rope.get("rope_type", rope.get("type", "default"))
    refuse = {"hidden_act": (hf_cfg.hidden_act, "silu"), "attention_bias": (hf_cfg.attention_bias, False),
              "mlp_bias": (getattr(hf_cfg, "mlp_bias", False), False),
              "rope_type": (kind, "default or llama3")}
    for key, (have, want) in refuse.items():
        if have != want and not (key == "rope_type" and kind in ("default", "llama3")):
            raise CheckpointError(f"{where}: {key}={have!r}; import-hf reads Llama models with {key} {want}")
    hd = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    if hd * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
        raise CheckpointError(f"{where}: head_dim={hd} × {hf_cfg.num_attention_heads} heads is not "
                              f"hidden_size={hf_cfg.hidden_size}; our decoder needs them equal")
    scaling = None if kind == "default" else RopeScaling(
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
        original_max_seq_len=rope["original_max_position_embeddings"])
    return GPTConfig(
        n_layer=hf_cfg.num_hidden_layers, n_head=hf_cfg.num_attention_heads,
        n_kv_head=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads, d_model=hf_cfg.hidden_size,
        d_ff=hf_cfg.intermediate_size, max_seq_len=hf_cfg.max_position_embeddings, vocab_size=hf_cfg.vocab_size,
        dropout=float(hf_cfg.attention_dropout or 0.0), tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        norm_eps=hf_cfg.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling=scaling,
        **LLAMA_SHAPE,
    )


def export_hf(ckpt_path: str | Path, out: str | Path) -> dict[str, float]:
    """Write a ``transformers`` model (GPT-2 or Llama, by the model's shape: ``hf_class``;
    config.json, model.safetensors) and a ``PreTrainedTokenizerFast`` to ``out``; reload it and
    return the logit difference."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

    model, tok, _, cfg = load_for_inference(ckpt_path)
    c = cfg.model
    if c.family != "gpt":  # by name, on purpose: these formats hold our GPT and nothing else
        raise SeqtrainError(
            f"{ckpt_path}: a {c.family} checkpoint; --format hf exports GPT models (see the README "
            "for the encoder-decoder); --format safetensors exports any family"
        )
    kind = hf_class(c)
    eos = tok.token_to_id(EOS)
    tokens = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tok.token_to_id(PAD)}
    if kind == "llama":
        hf_cfg, cls, sd = llama_config(c, model.wte.weight.shape[0], **tokens), LlamaForCausalLM, gpt_to_llama_state_dict(model)
    else:
        hf_cfg = GPT2Config(
            vocab_size=model.wte.weight.shape[0], n_positions=c.max_seq_len, n_embd=c.d_model,
            n_layer=c.n_layer, n_head=c.n_head, n_inner=c.ff_size,
            activation_function=HF_ACTIVATION[c.activation], layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout,
            embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_embeddings, **tokens,
        )
        cls, sd = GPT2LMHeadModel, gpt_to_gpt2_state_dict(model)
    from accelerate import init_empty_weights

    # Build the transformers model on the meta device and assign our tensors to it: no second
    # copy of the weights is ever allocated (it matters for a model that barely fits in memory).
    with init_empty_weights():
        hf = cls(hf_cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if c.tie_embeddings:
        hf.tie_weights()
    hf.eval()
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if c.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SeqtrainError(f"{cls.__name__} mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = Path(out)
    hf.save_pretrained(out, safe_serialization=True)
    specials = {"eos_token": EOS, "bos_token": EOS, "pad_token": PAD}
    if tok.token_to_id(UNK) is not None:
        specials["unk_token"] = UNK
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=c.max_seq_len, **specials).save_pretrained(out)

    # Proof, not hope: reload from disk and compare logits with ours.
    reloaded = cls.from_pretrained(out, local_files_only=True).eval()
    x = torch.randint(0, tok.get_vocab_size(), (2, min(32, c.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(x).logits - model(x)).abs().max().item()
    return {"max_abs_logit_diff": diff, "class": cls.__name__}


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    """Full fp32 weights of any family and layout (ZeRO-3 included) as one safetensors file."""
    from safetensors.torch import save_model

    model, _, _, _ = load_for_inference(ckpt_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))  # shared (tied) tensors stored once
    shutil.copyfile(checkpoint.resolve(ckpt_path) / "config.yaml", out / "config.yaml")
    return out / "model.safetensors"
