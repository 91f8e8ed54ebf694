"""Analytic communication volume of a GPT training step, per process group and kind.

The formulas the measurement (``trainer/accounting/comm.py``) is checked against and the planner
(``trainer/accounting/planner.py``) times, for the most loaded rank's view (rank 0: the first pipeline
stage, which also holds the head and the loss when there is no pipeline). Payload bytes per
optimizer step, as ``comm.py`` counts them; ``wire`` turns them into the bytes a ring puts on
each link. With ``bsh`` = micro-batch × sequence × hidden × bytes per value and ``L`` this
stage's blocks, per micro-batch:

- **tensor parallel** (Shoeybi et al.): all-reduces of ``bsh``: the embedding's, two per block
  forward (attention and MLP outputs), two per block backward (their inputs' gradients), the
  head input's gradient; two more per block when activation checkpointing recomputes the
  forward. The vocabulary-parallel loss adds three all-reduces of one fp32 per token.
- **sequence parallel** (Korthikanti et al.): the same regions as reduce-scatters (``4L + 2``
  of ``bsh``) and all-gathers (``6L + 3``: ``2L + 1`` more than the reduce-scatters, the
  backward's re-gathers of the column-parallel inputs, Megatron's trade of bytes for
  activation memory), the positions' ``s·h`` gradient gathered, and the gradients of the
  parameters used on a sequence shard (norms, row-parallel biases) all-reduced.
- **context parallel** (Ulysses): four all-to-alls per block of ``3·bsh/cp`` (fewer with
  grouped-query attention: ``(n_head + 2·n_kv_head)/n_head · bsh/cp``) and ``bsh/cp``
  (q/k/v and the attention output, forward and backward), and one fp32 token count.
- **pipeline**: the first stage sends ``bsh`` forward and receives ``bsh`` of gradient per
  micro-batch, 1/tp of it under tensor parallelism, all-gathered over the tensor group on
  arrival; the tied embedding's gradient (``V·h/tp``) is all-reduced between first and last.
- **data parallel / ZeRO** over the data group (dp · cp ranks), once per step, as the ZeRO
  paper counts it for ``Ψ`` parameters held: ZeRO 0 an all-reduce of the gradients; ZeRO 1-2
  a reduce-scatter of the gradients and an all-gather of the updated parameters; ZeRO 3 the
  parameters all-gathered twice (forward, backward) and the gradients reduce-scattered.

What DeepSpeed moves beyond these (its own choices of collective, per-micro-batch reduction
under ZeRO-2, scalars) is measured and explained in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from trainer.accounting.comm import WIRE
from trainer.parallel.materialize import reference_model
from trainer.parallel.tensor import shard_dim


@dataclass(frozen=True)
class StepShape:
    """What the formulas need of a GPT run and its layout."""

    n_layer: int
    d_model: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    vocab: int
    bytes_per_value: int
    held_params: int
    """Parameters this rank holds before ZeRO partitions them (its tensor shard of its stage)."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    bias: bool = True
    tied_embeddings: bool = True
    qkv_width: float = 3.0
    """The fused q/k/v projection's width in hidden sizes: 3 for multi-head attention,
    ``(n_head + 2 · n_kv_head) / n_head`` with grouped-query attention."""
    learned_positions: bool = True
    """A learned position table (GPT-2); RoPE has none, so sequence parallelism gathers none."""


def volumes(x: StepShape) -> dict[str, float]:
    """Payload bytes per optimizer step on rank 0, by ``"<group>.<kind>"``."""
    out: dict[str, float] = defaultdict(float)
    layers = -(-x.n_layer // x.pp)  # the most loaded stage's (the parity matrix's divide evenly)
    bsh = x.micro_batch * x.seq_len * x.d_model * x.bytes_per_value
    tokens = x.micro_batch * x.seq_len
    head = x.pp == 1  # rank 0 holds the head and the loss
    m = x.grad_accum
    if x.tp > 1 and not x.sequence_parallel:
        n = 1 + 4 * layers + (2 * layers if x.activation_checkpointing else 0) + head
        out["tp.all_reduce"] += m * (n * bsh + head * 3 * tokens * 4)
    if x.sequence_parallel:
        positions = x.seq_len * x.d_model * x.bytes_per_value if x.learned_positions else 0
        out["tp.all_gather"] += m * ((6 * layers + 3) * bsh + positions)
        out["tp.reduce_scatter"] += m * (4 * layers + 2) * bsh
        per_block = 6 if x.bias else 2  # two norms' weight (and bias), two row-parallel biases
        out["tp.all_reduce"] += m * (3 * tokens * 4 + (per_block * layers + (2 if x.bias else 1)) * x.d_model * x.bytes_per_value)
    if x.cp > 1:
        recompute = 1.5 if x.activation_checkpointing else 1.0
        # Per block, forward and backward: q/k/v tokens ► heads, the output heads ► tokens.
        out["cp.all_to_all"] += m * layers * 2 * (x.qkv_width + 1) * bsh / x.cp * recompute
        out["cp.all_reduce"] += m * 4
    if x.pp > 1:
        # Under tp each tensor rank sends its 1/tp of the boundary activation and the receiver
        # all-gathers it (Narayanan et al. 2021's scatter/gather): rank 0 gathers its gradients.
        out["pp.send"] += m * bsh / x.tp
        out["pp.recv"] += m * bsh / x.tp
        if x.tp > 1:
            out["tp.all_gather"] += m * bsh
        if x.tied_embeddings:  # the first and last stages' copies of the embedding
            out["pp.all_reduce"] += x.vocab * x.d_model * x.bytes_per_value / x.tp
    data = data_group(x)
    if data is not None:
        grads = x.held_params * x.bytes_per_value
        if x.zero_stage == 0:
            out[f"{data}.all_reduce"] += grads
        elif x.zero_stage in (1, 2):
            out[f"{data}.reduce_scatter"] += grads
            out[f"{data}.all_gather"] += grads
        else:
            out[f"{data}.all_gather"] += 2 * grads
            out[f"{data}.reduce_scatter"] += grads
    return dict(out)


def data_group(x: StepShape) -> str | None:
    """``comm.py``'s name of DeepSpeed's data group (dp · cp ranks), None when it is one rank."""
    axes = [a for a, n in (("dp", x.dp), ("cp", x.cp)) if n > 1]
    return "+".join(axes) or None


def group_size(x: StepShape, group: str) -> int:
    sizes = {"self": 1, "tp": x.tp, "pp": x.pp, "cp": x.cp, "dp": x.dp, "world": x.dp * x.tp * x.pp * x.cp}
    return math.prod(sizes[axis] for axis in group.split("+"))


def wire(x: StepShape, payloads: dict[str, float]) -> dict[str, float]:
    """Bytes rank 0 sends per step, by group: each payload times its ring factor."""
    out: dict[str, float] = defaultdict(float)
    for key, b in payloads.items():
        group, kind = key.split(".")
        out[group] += b * WIRE[kind](group_size(x, group) if kind not in ("send", "recv") else 2)
    return dict(out)


def step_shape(cfg) -> StepShape:
    """The shape of a resolved GPT config's step, with rank 0's parameters counted exactly on
    the meta-device model: its stage's layers, tensor-parallel ones cut by the family's plan."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    first_blocks = -(-m.n_layer // p.pp)
    held = 0
    for name, param in reference_model(cfg).named_parameters():  # tied weights once
        if name.startswith("h.") and int(name.split(".")[1]) >= first_blocks:
            continue
        if p.pp > 1 and not name.startswith(("h.", "wte.", "wpe.")):
            continue  # the final norm and an untied head live on the last stage
        cut = p.tp > 1 and shard_dim(name, m.family) is not None
        held += param.numel() // (p.tp if cut else 1)
    return StepShape(
        n_layer=m.n_layer, d_model=m.d_model, seq_len=cfg.data.seq_len, micro_batch=t.micro_batch_size,
        grad_accum=t.grad_accum, vocab=m.vocab_size, bytes_per_value=4 if t.precision == "fp32" else 2,
        held_params=held, dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, zero_stage=p.zero_stage,
        sequence_parallel=p.sequence_parallel, activation_checkpointing=t.activation_checkpointing, bias=m.bias,
        tied_embeddings=m.tie_embeddings, qkv_width=(m.n_head + 2 * m.kv_heads) / m.n_head,
        learned_positions=m.position == "learned")
