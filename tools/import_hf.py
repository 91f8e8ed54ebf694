"""``seqtrain import-hf DIR --out OUT``: start GPT training from a local GPT-2 or Llama folder.

Writes ``OUT/model.safetensors`` (our layout), ``OUT/tokenizer.json`` and ``OUT/config.yaml``:
a preset whose model matches the checkpoint, whose tokenizer is that of the checkpoint and
whose ``train.init_from`` points at the weights, so ``seqtrain train OUT/config.yaml`` fine-tunes.
"""

from __future__ import annotations

from pathlib import Path

from models import GPTConfig, build
from tools.export_hf import gpt2_to_gpt_state_dict, gpt_config_of_llama, llama_to_gpt_state_dict
from trainer.config import Config
from trainer.errors import CheckpointError

# transformers' ``activation_function`` ► our ``model.activation``: both of transformers' tanh GELUs
# compute GPT-2's formula.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def import_hf(hf_dir: str | Path, out: str | Path, name: str | None = None) -> Path:
    from safetensors.torch import save_model
    from transformers import AutoConfig

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (not a transformers model folder)")
    hf_cfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    if hf_cfg.model_type not in ("gpt2", "llama"):
        raise CheckpointError(f"{hf_dir}: model_type {hf_cfg.model_type!r}; import-hf reads GPT-2 and Llama models")
    if not (hf_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{hf_dir}: no tokenizer.json (a fast tokenizer is needed)")
    model_cfg, sd = (_llama if hf_cfg.model_type == "llama" else _gpt2)(hf_dir, hf_cfg)
    model = build(model_cfg)
    model.load_state_dict(sd)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    cfg = Config.model_validate({
        "name": name or f"{hf_dir.name}-finetune",
        "model": model_cfg.model_dump(),
        "data": {"tokenizer": {"path": str((out / "tokenizer.json").resolve())},
                 "seq_len": min(256, model_cfg.max_seq_len)},
        "train": {"init_from": str((out / "model.safetensors").resolve()), "lr": 1e-4, "min_lr": 1e-5},
    })
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out / "config.yaml"


def _gpt2(hf_dir: Path, hf_cfg) -> tuple[GPTConfig, dict]:
    from transformers import GPT2LMHeadModel

    if hf_cfg.activation_function not in ACTIVATIONS:
        raise CheckpointError(f"{hf_dir}: activation {hf_cfg.activation_function!r} is not one our GPT has "
                              f"({', '.join(ACTIVATIONS)})")
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)
    model_cfg = GPTConfig(
        n_layer=hf_cfg.n_layer, n_head=hf_cfg.n_head, d_model=hf_cfg.n_embd, d_ff=hf_cfg.n_inner,
        max_seq_len=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size, dropout=hf_cfg.resid_pdrop,
        bias=True, tie_embeddings=hf_cfg.tie_word_embeddings, norm_eps=hf_cfg.layer_norm_epsilon,
        activation=ACTIVATIONS[hf_cfg.activation_function],
    )
    return model_cfg, gpt2_to_gpt_state_dict(hf.state_dict(), hf_cfg.n_layer, hf_cfg.n_embd // hf_cfg.n_head)


def _llama(hf_dir: Path, hf_cfg) -> tuple[GPTConfig, dict]:
    from transformers import LlamaForCausalLM

    model_cfg = gpt_config_of_llama(hf_cfg, str(hf_dir))  # refuses what our decoder cannot compute
    hf = LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    return model_cfg, llama_to_gpt_state_dict(hf.state_dict(), model_cfg)
