"""``seqtrain generate``: load a checkpoint on one device (any layout it was trained in) and sample."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer

import models
from trainer import checkpoint
from trainer.config import Config
from trainer.data.tokenizer import EOS
from trainer.errors import CheckpointError


def load_for_inference(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Tokenizer, Config]:
    ckpt = checkpoint.resolve(path)
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    tok_file = ckpt.parent.parent / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json in its run directory {ckpt.parent.parent}")
    model = models.build(cfg.model)
    missing, unexpected = model.load_state_dict(checkpoint.load_model_state(ckpt), strict=False)
    # Tied weights may be saved under one name only.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), Tokenizer.from_file(str(tok_file)), cfg


def generate_text(
    path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 50, top_p: float | None = None, seed: int = 0, num_samples: int = 1,
) -> list[str]:
    model, tok, _ = load_for_inference(path)
    eos = tok.token_to_id(EOS)
    # An empty prompt starts at a document boundary, as training documents do.
    ids = [eos] + tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids] * num_samples)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(x, max_new_tokens, temperature, top_k, top_p, stop_tokens=(eos,), generator=g)
    # Decode prompt and continuation together: BPE merges may span the boundary.
    return [tok.decode([i for i in row.tolist()[1:] if i != eos]) for row in out]
