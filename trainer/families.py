"""What the trainer knows about each model family, in one registry.

A ``FamilySpec`` gathers everything that differs between families outside the model code:
which vocabulary fields the tokenizers fill, what data it trains on, the tensor-parallel plan
and its random-number regions, the blocks activation checkpointing wraps, which parallelism it
supports and the callbacks it adds to the loop. The rest of the trainer asks the spec instead of
testing ``model.family``; adding a family means adding a spec here and a model in ``models/``.

Model code stays single-device (``models/`` imports no ``torch.distributed``): the plans below
are data, applied from outside by ``trainer/parallel/tensor.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from torch import nn

import models


@dataclass(frozen=True)
class FamilySpec:
    name: str
    """``model.family`` value."""
    config: type[BaseModel]
    """The model's config class (a member of ``models.ModelConfig``)."""
    model: type[nn.Module]
    """The single-device model class."""
    vocab: dict[str, str]
    """Model config field ► tokenizer side (``src``/``tgt``) whose size fills it when null."""
    pairs: bool = False
    """Trains on (source, target) pairs (``trainer/data/seq2seq.py``), else on a token stream."""
    examples: str | None = None
    """Learns labelled examples of a task rather than text: ``trees`` (node tensors) or
    ``sequences`` (padded token ids) of ListOps, ``images`` of text lines, ``sounds`` of
    sentences (spoken from their text); None: text."""
    task: str | None = None
    """The embedded task of an example family (``data.source``), which also reads a file."""
    units: Callable[[dict[str, Any], Any], Any] | None = None
    """The work units of a batch, given the model config ("tokens" in throughput, per which
    ``flops_per_token`` counts): None: its labels other than -100."""
    carries_state: bool = False
    """Recurrent language model: returns ``(loss or logits, state)``, may train with truncated
    BPTT (``data.tbptt``) and is evaluated over contiguous streams."""
    scheduled_sampling: bool = False
    """Decoder that can feed its own predictions (``train.scheduled_sampling``)."""
    tp_plan: dict[str, str] | None = None
    """Tensor parallelism: submodule name pattern (``fnmatch``) ► style; ``None``: unsupported."""
    tp_rng_regions: tuple[tuple[str, str], ...] = ()
    """Where activations are sharded under tensor parallelism, from a module's entry to its
    row-parallel child (start pattern, child name): dropout there draws per tensor rank."""
    sp_plan: dict[str, str] | None = None
    """Sequence parallelism: modules run on a sequence shard with whole parameters (``norm``,
    ``positions``), added to ``tp_plan``; ``None``: unsupported."""
    context_parallel: bool = False
    """Sequences can be split across ranks (``trainer/parallel/context.py``: the ``wte``,
    ``wpe``, ``*.attn.c_attn``/``c_proj`` and ``loss_fn`` names of a GPT)."""
    head_vocab: str = "vocab_size"
    """Vocabulary field of the output head (the full size for the vocab-parallel loss)."""
    blocks: tuple[str, ...] = ()
    """Attributes holding ``nn.ModuleList`` s of repeated blocks (activation checkpointing)."""
    pipeline: bool = False
    """Can be split into DeepSpeed pipeline stages (``trainer/parallel/pipeline.py``)."""
    planned: bool = False
    """The layout planner (``trainer/accounting/planner.py``) models it: its parameter,
    activation and communication formulas are this family's. ``seqtrain plan`` and the
    launch-time memory check take only such families."""
    callbacks: tuple[str, ...] = ()
    """Names of family-specific loop callbacks (``trainer/train.py``'s ``FAMILY_CALLBACKS``):
    named, not imported, so the registry stays below the loop."""


_GPT_PLAN = {
    # Leading wildcards: the same plan fits GPT (``h.3.attn.c_attn``) and its pipeline stages
    # (``5.attn.c_attn``, ``tied_modules.embed.wte``). Fused projections are head-major, so a
    # column cut gives each rank whole heads (models/fused_qkv.py).
    "*wte": "vocab_embedding",
    "*attn.c_attn": "colwise",
    # The separate projections of checkpoints from before the fusion: how their shards merge.
    "*attn.q_proj": "colwise", "*attn.k_proj": "colwise", "*attn.v_proj": "colwise",
    "*attn.c_proj": "rowwise",
    "*mlp.c_fc": "colwise", "*mlp.c_proj": "rowwise",  # SwiGLU's c_fc alternates gate and up units
    "*lm_head": "vocab_head", "loss_fn": "vocab_loss",
}
_GPT_SP_PLAN = {"*wpe": "positions", "*ln_1": "norm", "*ln_2": "norm", "*ln_f": "norm"}
_ENCDEC_PLAN = {
    "src_embed": "vocab_embedding", "tgt_embed": "vocab_embedding",
    "*.*.self_attn.qkv_proj": "colwise", "*.*.cross_attn.kv_proj": "colwise",
    # Cross-attention's q, and the separate projections of checkpoints from before the fusion.
    "*.*.*_attn.q_proj": "colwise", "*.*.*_attn.k_proj": "colwise", "*.*.*_attn.v_proj": "colwise",
    "*.*.*_attn.o_proj": "rowwise",
    "*.*.ff.fc1": "colwise", "*.*.ff.fc2": "rowwise",
    "out": "vocab_head", "loss_fn": "vocab_loss",
}



def _nodes(batch: dict[str, Any], model: Any) -> int:
    return batch["tokens"].numel()


def _sequence_tokens(batch: dict[str, Any], model: Any) -> int:
    return sum(batch["lengths"])  # host lengths: no read of the device


def _pixel_columns(batch: dict[str, Any], model: Any) -> int:
    return sum(batch["widths"])  # host widths, padding not counted


def _mel_frames(batch: dict[str, Any], model: Any) -> int:
    return sum(model.audio.frames(n) for n in batch["wave_lengths"])  # host lengths


FAMILIES: dict[str, FamilySpec] = {
    "gpt": FamilySpec(
        "gpt", *models.FAMILIES["gpt"], vocab={"vocab_size": "src"},
        tp_plan=_GPT_PLAN, tp_rng_regions=(("*.attn", "c_proj"),), sp_plan=_GPT_SP_PLAN, context_parallel=True, blocks=("h",), pipeline=True,
        planned=True,
    ),
    "encdec": FamilySpec(
        "encdec", *models.FAMILIES["encdec"], vocab={"src_vocab_size": "src", "tgt_vocab_size": "tgt"},
        pairs=True, tp_plan=_ENCDEC_PLAN, tp_rng_regions=(("*.*.*_attn", "o_proj"), ("*.*.ff", "fc2")),
        head_vocab="tgt_vocab_size", blocks=("encoder", "decoder"),
    ),
    "rnn_lm": FamilySpec(
        "rnn_lm", *models.FAMILIES["rnn_lm"], vocab={"vocab_size": "src"}, carries_state=True,
    ),
    "rnn_seq2seq": FamilySpec(
        "rnn_seq2seq", *models.FAMILIES["rnn_seq2seq"],
        vocab={"src_vocab_size": "src", "tgt_vocab_size": "tgt"}, pairs=True,
        scheduled_sampling=True, head_vocab="tgt_vocab_size", callbacks=("scheduled_sampling",),
    ),
    "tree_rnn": FamilySpec(
        "tree_rnn", *models.FAMILIES["tree_rnn"], vocab={"vocab_size": "nodes", "n_classes": "classes"},
        examples="trees", task="listops", units=_nodes,
    ),
    "seq_classifier": FamilySpec(
        "seq_classifier", *models.FAMILIES["seq_classifier"],
        vocab={"vocab_size": "tokens", "n_classes": "classes"}, examples="sequences", task="listops",
        units=_sequence_tokens,
    ),
    "mdrnn": FamilySpec(
        "mdrnn", *models.FAMILIES["mdrnn"], vocab={"n_labels": "labels"}, examples="images", task="textlines",
        units=_pixel_columns,
    ),
    "tts": FamilySpec(
        "tts", *models.FAMILIES["tts"], vocab={"vocab_size": "src"}, examples="sounds", task="speech",
        units=_mel_frames,
    ),
}
assert FAMILIES.keys() == models.FAMILIES.keys(), "every model family needs a spec"


def spec(family: str) -> FamilySpec:
    return FAMILIES[family]


def having(attr: str) -> list[str]:
    """Names of the families whose spec sets ``attr`` (for error messages)."""
    return [n for n, s in FAMILIES.items() if getattr(s, attr)]
