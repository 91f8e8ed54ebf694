"""Weight mapping between our GPT and Hugging Face ``GPT2LMHeadModel``.

GPT-2 stores linear weights as ``Conv1D`` (in, out) and fuses q, k, v into ``c_attn``; we keep
``nn.Linear`` (out, in) and separate q/k/v, so the mapping transposes and concatenates.
"""

from __future__ import annotations

import torch
from torch import nn


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
    for i in range(model.cfg.n_layer):
        p, q = f"h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            for part in ("weight", "bias"):
                if f"{p}{ln}.{part}" in sd:
                    out[f"{q}{ln}.{part}"] = sd[f"{p}{ln}.{part}"]
        out[f"{q}attn.c_attn.weight"] = torch.cat(
            [sd[f"{p}attn.{x}_proj.weight"] for x in "qkv"], dim=0).t().contiguous()
        if f"{p}attn.q_proj.bias" in sd:
            out[f"{q}attn.c_attn.bias"] = torch.cat([sd[f"{p}attn.{x}_proj.bias"] for x in "qkv"])
        for lin in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"{q}{lin}.weight"] = sd[f"{p}{lin}.weight"].t().contiguous()
            if f"{p}{lin}.bias" in sd:
                out[f"{q}{lin}.bias"] = sd[f"{p}{lin}.bias"]
    return out
