"""``seqtrain generate``: load a checkpoint on one device (any layout it was trained in) and
sample from a language model or translate with a sequence-to-sequence model."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer

import models
from trainer import checkpoint
from trainer.config import Config
from trainer.data.tokenizer import EOS
from trainer.errors import CheckpointError, SeqtrainError


def _tokenizer(run_dir: Path, side: str) -> Tokenizer:
    for name in ("tokenizer.json", f"{side}_tokenizer.json"):
        if (run_dir / name).is_file():
            return Tokenizer.from_file(str(run_dir / name))
    raise CheckpointError(f"no tokenizer.json in the run directory {run_dir}")


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model in eval mode, source tokenizer, target tokenizer, config) of a checkpoint."""
    ckpt = checkpoint.resolve(path)
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    run_dir = ckpt.parent.parent
    model = models.build(cfg.model)
    missing, unexpected = model.load_state_dict(checkpoint.load_model_state(ckpt), strict=False)
    # Tied weights may be saved under one name only.
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), _tokenizer(run_dir, "src"), _tokenizer(run_dir, "tgt"), cfg


def generate_text(
    path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 50, top_p: float | None = None, seed: int = 0, num_samples: int = 1,
) -> list[str]:
    """Samples from a language model (GPT or RNN), prompt included."""
    model, tok, _, cfg = load_for_inference(path)
    if cfg.is_seq2seq:
        raise SeqtrainError(f"{path} is a {cfg.model.family} model: give --source text to translate")
    eos = tok.token_to_id(EOS)
    # An empty prompt starts at a document boundary, as training documents do.
    ids = [eos] + tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids] * num_samples)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(x, max_new_tokens, temperature, top_k, top_p, stop_tokens=(eos,), generator=g)
    # Decode prompt and continuation together: BPE merges may span the boundary.
    return [tok.decode([i for i in row.tolist()[1:] if i != eos]) for row in out]


def translate(path: str | Path, sources: list[str], beam: int = 1, length_penalty: float = 1.0,
              max_len: int = 128) -> list[str]:
    """Greedy (beam 1) or beam-search outputs of a sequence-to-sequence model."""
    model, src_tok, tgt_tok, cfg = load_for_inference(path)
    if not cfg.is_seq2seq:
        raise SeqtrainError(f"{path} is a {cfg.model.family} language model: give --prompt instead")
    eos = tgt_tok.token_to_id(EOS)
    ids = [torch.tensor(src_tok.encode(s, add_special_tokens=False).ids or [eos]) for s in sources]
    batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=cfg.model.pad_id)
    outs = model.translate(batch, eos, eos, max_len=max_len, beam=beam, length_penalty=length_penalty)
    return [tgt_tok.decode(o) for o in outs]
