"""The GPT as a DeepSpeed ``PipelineModule``: token embedding, positions, blocks, final norm, head.

Layers are built from the model's own classes (``models/gpt.py``) and initialised with the names
they have in ``GPT`` (``h.3.attn.c_attn.weight`` ...), so a stage that builds only its own layers
starts from exactly the numbers the whole single-device model would have. The input embedding
and the output head are one ``TiedLayerSpec``: the first and last stages each hold a copy, and
DeepSpeed all-reduces the two gradients before every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.gpt import Block, GPTConfig, init_param_, make_norm
from models.loss import TokenCrossEntropy
from models.mup import readout

Shard = Callable[[nn.Module], None] | None
"""Applied to each layer as soon as it is built (tensor parallelism): a rank then holds its
slices of the layers before it and one whole layer, never its whole stage."""


def _init(module: nn.Module, prefix: str, cfg: GPTConfig, seed: int, shard: Shard = None) -> None:
    for name, p in module.named_parameters():
        init_param_(prefix + name, p, cfg, seed)
    if shard is not None:
        shard(module)


class TokenEmbedding(nn.Module):
    """``wte``; with tied embeddings also the output head (``lm_head`` shares the weight)."""

    def __init__(self, cfg: GPTConfig, seed: int, with_head: bool, shard: Shard = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if with_head:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight
        _init(self, "", cfg, seed, shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)


def head_logits(embed: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied head's forward on the last stage."""
    return embed.lm_head(x)


class Positions(nn.Module):
    """The learned position table and the embeddings' dropout (with RoPE the dropout alone:
    rotary positions are applied inside attention)."""

    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        if cfg.position == "learned":
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        _init(self, "", cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wpe"):
            x = x + self.wpe(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)


class BlockPipe(Block):
    """One Transformer block; between stages only the hidden states travel (no KV cache)."""

    def __init__(self, cfg: GPTConfig, prefix: str, seed: int, shard: Shard = None) -> None:
        super().__init__(cfg)
        _init(self, prefix, cfg, seed, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class FinalNorm(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln_f = make_norm(cfg)
        _init(self, "", cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return readout(self.cfg, self.ln_f(x))


class Head(nn.Module):
    """The output projection when it is not tied to the embedding."""

    def __init__(self, cfg: GPTConfig, seed: int, shard: Shard = None) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _init(self, "", cfg, seed, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def gpt_pipeline(cfg: GPTConfig, topology, seed: int, activation_checkpointing: bool = False,
                 shard: Shard = None):
    """A ``PipelineModule`` computing what ``GPT(cfg, seed)`` computes, split into balanced stages;
    ``shard`` is applied to each layer with weights as it is built.

    Batches are ``(input_ids, labels)``; stages are balanced by block count. Names of its
    parameters (``tied_modules.embed.wte.weight``, ``3.attn.c_attn.weight`` ...) map back to the
    single-device names through ``single_device_name``.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", TokenEmbedding, cfg, seed, True, shard, tied_weight_attr="wte.weight")
        last = TiedLayerSpec("embed", TokenEmbedding, cfg, seed, True, shard, forward_fn=head_logits,
                             tied_weight_attr="wte.weight")
    else:
        first = LayerSpec(TokenEmbedding, cfg, seed, False, shard)
        last = LayerSpec(Head, cfg, seed, shard)
    blocks = layer_prefixes(cfg)[2:-2]
    layers = [first, LayerSpec(Positions, cfg, seed), *(LayerSpec(BlockPipe, cfg, p, seed, shard) for p in blocks),
              LayerSpec(FinalNorm, cfg, seed), last]
    return PipelineModule(
        layers=layers, topology=topology, loss_fn=TokenCrossEntropy(),
        partition_method="type:BlockPipe",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        # Only blocks: the first layer's input is token ids, which carry no gradient, and a
        # (reentrant) checkpoint over it would cut the graph.
        checkpointable_layers=["BlockPipe"],
    )


def layer_prefixes(cfg: GPTConfig) -> list[str]:
    """The ``GPT`` name prefix of each pipeline layer's parameters, by layer index: embedding,
    positions, the blocks, final norm, head (the one list both initialisation and
    ``single_device_name`` follow)."""
    return ["", "", *(f"h.{i}." for i in range(cfg.n_layer)), "", ""]


def single_device_name(name: str, cfg: GPTConfig) -> str | None:
    """``GPT`` parameter name of a pipeline parameter name (``None``: a duplicate tied copy)."""
    parts = name.split(".")
    if parts[0] == "tied_modules":  # tied_modules.embed.wte.weight / .lm_head.weight
        return None if parts[2] == "lm_head" else ".".join(parts[2:])
    return layer_prefixes(cfg)[int(parts[0])] + ".".join(parts[1:])
