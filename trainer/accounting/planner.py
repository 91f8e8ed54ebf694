"""Layout planner: for a config and a cluster, the memory per GPU and the step time of every
layout (dp × tp × pp, ZeRO stage, micro-batch, activation checkpointing), which fit, ranked.
``seqtrain plan`` prints it; ``seqtrain train`` checks its own layout with it on GPUs.

``seqtrain plan CONFIG --gpus N [--nodes M] [--gpu NAME | --gpu-memory-gb G] [--json]``

The model (stated so that it can be checked, and measured against: ``docs/benchmarks.md``):

- **Parameters per GPU**: the exact count of the model built on the meta device, split the
  way the layout splits it: blocks over pipeline stages (the first stage also holds the
  embeddings, the worst case), matrices and the vocabulary over tensor ranks, everything over
  data ranks under ZeRO-3.
- **Bytes per parameter** (the ZeRO paper's accounting): weights in the training precision
  (2 or 4 bytes), gradients in the same, Adam 12 bytes in mixed precision (fp32 master, two
  moments) or under any ZeRO stage (DeepSpeed's ZeRO optimizers keep the fp32 copy in fp32
  training too), else 8 in fp32; ZeRO-1 shards the optimizer over dp, ZeRO-2 also gradients, ZeRO-3
  also weights.
- **Activations** per block and micro-batch (Korthikanti et al. 2022, with fused attention,
  which stores no s² scores): ``s·b·h·(4 + 12/tp)`` values in the training precision (their
  ``34·sbh`` bytes are 16-bit values and 1-byte masks: the two norms' inputs and outputs
  replicated; q, k, v, the attention output and the MLP's two 4h-wide tensors sharded; for the
  Llama shape, q/k/v at ``(n_head + 2·n_kv_head)/n_head`` and SwiGLU's four ``d_ff``-wide
  tensors: ``Shape.sharded_widths``), plus a
  1-byte mask per dropout site when dropout is on; with activation checkpointing a block keeps
  its input only and one block is recomputed at a time. The head's logits in the training
  precision and the loss's fp32 copy and gradient (``s·b·V/tp·(w + 8)`` bytes); chunked
  (``train.loss_chunk``), one chunk's, plus the head input's and weight's gradients kept
  instead (``c·V·(w + 8) + s·b·h·w + 4·V·h``). Under a
  pipeline (1F1B), the first stage holds ``min(pp, accumulation)`` micro-batches in flight.
- **Gradient accumulation in fp32** (bf16 with ``train.grad_accum_dtype=fp32``): 4 more bytes
  per parameter without ZeRO or at ZeRO 1 (``BF16_Optimizer``'s whole fp32 gradient buffer;
  without ZeRO the fp32 optimizer's gradient copies at the step), the partition's gradients
  in fp32 instead of 16 bits at ZeRO 2/3.
- **Buffers**: DeepSpeed's reduce buckets, allocated whole (``parallel.zero_bucket_elements``;
  two under ZeRO 1-2 with ``parallel.zero_overlap_comm``), ZeRO-3's live parameters (1e9
  elements, or the parameters if fewer) and its reduce bucket, and 1 GiB for the CUDA
  context and allocator slack.
- **Step time**: the exact training FLOPs (``flops_per_token``, a third more with activation
  checkpointing) at ``--efficiency`` of the GPU's dense peak, stretched by the pipeline bubble
  ``(m + pp - 1) / m``; plus communication, not overlapped (an upper bound): the analytic
  volumes of ``trainer/accounting/comm_volume.py`` (tensor-parallel all-reduces of ``s·b·h``, 4 per block
  and micro-batch, 6 with recomputation, plus the embedding's and the head's; data-parallel
  gradients, ZeRO 0-2: ``2(dp-1)/dp`` of the gradient bytes, ZeRO-3: ``3(dp-1)/dp``; pipeline
  sends of ``s·b·h/tp`` per micro-batch and boundary each way, the tied embedding's gradient),
  the volumes ``trainer/accounting/comm.py`` measures, as rings at the link's bandwidth, inside a node
  over NVLink, across nodes over the network. MFU is the model's FLOPs (without
  recomputation) over the step time and the peaks of every GPU.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from trainer.accounting.comm_volume import StepShape, data_group, volumes, wire
from trainer.accounting.flops import GPU_PEAKS_TFLOPS
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.families import having
from trainer.parallel.materialize import reference_model

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    memory_gb: float
    """Device memory, GiB (as ``torch.cuda.get_device_properties().total_memory`` reports it)."""
    bf16_tflops: float
    """Dense bf16/fp16 tensor-core peak (``trainer/accounting/flops.py``'s table, the vendor's data sheet)."""
    fp32_tflops: float
    intra_node_gbps: float
    """Bandwidth a ring collective reaches per GPU inside a node (NVLink, or PCIe), GB/s."""
    inter_node_gbps: float
    """The same across nodes (one NIC per GPU), GB/s."""

    def peak_flops(self, mixed_precision: bool) -> float:
        return (self.bf16_tflops if mixed_precision else self.fp32_tflops) * 1e12


HOST_LINK_GBPS = 5.0
"""What a gloo ring between processes of one CPU host moves per second (shared memory copies)."""

# Memory (GB) and links (GB/s inside a node, across nodes) of the GPUs whose peaks MFU knows:
# SXM parts of 8-GPU nodes with a 400 Gb/s (H100, H200) or 200 Gb/s NIC per GPU; PCIe cards
# (A10G, L40S) between themselves over PCIe 4.0 x16.
_MEMORY_AND_LINKS = {"H200": (141, 450.0, 50.0), "H100": (80, 450.0, 50.0), "A100": (80, 300.0, 25.0),
                     "A10G": (24, 25.0, 12.5), "L40S": (48, 25.0, 12.5), "V100": (32, 150.0, 12.5)}
GPUS: dict[str, Gpu] = {name: Gpu(gb * 1e9 / GIB, *GPU_PEAKS_TFLOPS[name], intra, inter)
                        for name, (gb, intra, inter) in _MEMORY_AND_LINKS.items()}

ZERO_BUCKET = 5e8  # DeepSpeed's default reduce and all-gather bucket sizes, elements
ZERO3_LIVE = 1e9  # ZeRO-3's default stage3_max_live_parameters
RUNTIME_BYTES = GIB  # CUDA context, kernels, allocator slack


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    zero_stage: int
    micro_batch_size: int
    activation_checkpointing: bool


@dataclass(frozen=True)
class Shape:
    """What the formulas need of the model and the run."""

    params: int
    block_params: int
    embedding_params: int
    n_layer: int
    d_model: int
    vocab: int
    seq_len: int
    global_batch: int
    flops_per_token: float
    bytes_per_value: int
    mixed_precision: bool
    dropout: bool
    fp32_grad_accum: bool = False
    """bf16 gradients accumulated in fp32 (``train.grad_accum_dtype``): a whole fp32 gradient
    buffer beside the 16-bit gradients without ZeRO or at ZeRO 1 (DeepSpeed's ``BF16_Optimizer``;
    without ZeRO its fp32 optimizer's gradient copies at the step), an fp32 partition at ZeRO 2/3."""
    loss_chunk: int | None = 0
    """``train.loss_chunk``: tokens per chunk of the head and loss (None: automatic, 0: whole)."""
    bucket_elements: float = ZERO_BUCKET
    """ZeRO's reduce bucket (``Config.zero_bucket_elements``), allocated whole."""
    overlap_comm: bool = False
    """``parallel.zero_overlap_comm``: ZeRO 1/2 keep a second reduce bucket."""
    sharded_widths: float = 12.0
    """Activation values a block saves per token on its tensor-parallel side, in hidden sizes:
    q/k/v (3, less with grouped-query attention), the attention output (1) and the MLP's inner
    tensors (2 of ``d_ff`` for GELU: 8 at 4·h; 4 of ``d_ff`` for SwiGLU: gate, its SiLU, up and
    their product)."""


def shape_of(cfg: Config) -> Shape:
    """The exact parameter count of the model on the meta device, and the run's sizes."""
    cfg = with_planned_vocab(cfg)
    model = reference_model(cfg)
    if not cfg.family.planned:
        raise ConfigError(f"seqtrain plan covers model.family in {having('planned')}; "
                          f"{cfg.model.family} is not modelled yet")
    m = cfg.model
    emb = model.wte.weight.numel() + (model.wpe.weight.numel() if m.position == "learned" else 0)
    mlp = (4 if m.activation == "swiglu" else 2) * m.ff_size / m.d_model
    block = sum(p.numel() for p in model.h[0].parameters())
    return Shape(params=model.num_params(), block_params=block, embedding_params=emb, n_layer=m.n_layer,
                 d_model=m.d_model, vocab=model.wte.weight.shape[0], seq_len=cfg.data.seq_len,
                 global_batch=cfg.train.global_batch_size or cfg.train.micro_batch_size,
                 flops_per_token=model.flops_per_token(cfg.data.seq_len)[0],
                 bytes_per_value=4 if cfg.train.precision == "fp32" else 2,
                 mixed_precision=cfg.train.precision != "fp32", dropout=m.dropout > 0,
                 fp32_grad_accum=cfg.train.precision == "bf16" and cfg.train.grad_accum_dtype == "fp32",
                 loss_chunk=cfg.train.loss_chunk,
                 bucket_elements=cfg.zero_bucket_elements(), overlap_comm=cfg.parallel.zero_overlap_comm,
                 sharded_widths=(m.n_head + 2 * m.kv_heads) / m.n_head + 1 + mlp)


def with_planned_vocab(cfg: Config) -> Config:
    """The vocabulary the run will have: ``model.vocab_size``, or the tokenizer's size (the
    ``data.tokenizer.path`` file's, else ``data.tokenizer.vocab_size``) rounded up to
    ``parallel.vocab_multiple``, as the data step fills it in. The data step checks the sizes."""
    size = cfg.data.tokenizer.vocab_size
    if cfg.data.tokenizer.path and Path(cfg.data.tokenizer.path).expanduser().is_file():
        size = Tokenizer.from_file(str(Path(cfg.data.tokenizer.path).expanduser())).get_vocab_size()
    out = cfg.model_copy(deep=True)
    mult = cfg.parallel.vocab_multiple
    for key in cfg.family.vocab:
        if getattr(out.model, key) is None:
            setattr(out.model, key, -(-size // mult) * mult)
    return out


def _head_bytes(s: Shape, lay: Layout) -> float:
    """The logits and the loss's fp32 copy and gradient, whole or one chunk's at a time
    (``Config.loss_chunk_tokens``' rule: chunks without tp and below ZeRO 3)."""
    tokens, w = s.seq_len * lay.micro_batch_size, s.bytes_per_value
    chunk = s.loss_chunk if s.loss_chunk is not None else 2**26 // s.vocab
    if lay.tp > 1 or lay.zero_stage == 3 or not chunk or tokens <= chunk:
        return tokens * s.vocab / lay.tp * (w + 8)
    return chunk * s.vocab * (w + 8) + tokens * s.d_model * w + 4 * s.vocab * s.d_model


def memory_bytes(s: Shape, lay: Layout) -> dict[str, float]:
    """Bytes per GPU of the most loaded rank (the first pipeline stage)."""
    w = s.bytes_per_value
    layers = -(-s.n_layer // lay.pp)
    held = (layers * s.block_params + s.embedding_params) / lay.tp
    params = held * w / (lay.dp if lay.zero_stage >= 3 else 1)
    grads = held * w / (lay.dp if lay.zero_stage >= 2 else 1)
    if s.fp32_grad_accum:
        grads += held * 4 if lay.zero_stage <= 1 else held * (4 - w) / lay.dp
    # DeepSpeed's ZeRO optimizers keep an fp32 copy of their partition even when training in fp32.
    optimizer = held * (12 if s.mixed_precision or lay.zero_stage else 8) / (lay.dp if lay.zero_stage >= 1 else 1)
    m = s.global_batch // (lay.dp * lay.micro_batch_size)
    sbh = s.seq_len * lay.micro_batch_size * s.d_model
    block = sbh * (4 + s.sharded_widths / lay.tp) * w + (2 * sbh if s.dropout else 0)
    stored = layers * (sbh * w if lay.activation_checkpointing else block)
    recompute = block if lay.activation_checkpointing else 0
    logits = _head_bytes(s, lay) if lay.pp == 1 else 0
    activations = stored * min(lay.pp, m) + recompute + logits
    buffers = RUNTIME_BYTES
    # DeepSpeed allocates its reduce buckets whole, whatever the model's size.
    if lay.zero_stage in (1, 2):
        buffers += (2 if s.overlap_comm else 1) * s.bucket_elements * w
    elif lay.zero_stage == 3:
        # Live gathered parameters, and the gradient reduce bucket.
        buffers += min(ZERO3_LIVE, held) * w + s.bucket_elements * w
    total = params + grads + optimizer + activations + buffers
    return {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations,
            "buffers": buffers, "total": total}


def step_time_s(s: Shape, lay: Layout, gpu: Gpu, nodes: int, efficiency: float) -> float:
    world = lay.dp * lay.tp * lay.pp
    peak = gpu.peak_flops(s.mixed_precision)
    m = s.global_batch // (lay.dp * lay.micro_batch_size)
    flops = s.flops_per_token * s.global_batch * s.seq_len * (4 / 3 if lay.activation_checkpointing else 1)
    compute = flops / world / (peak * efficiency) * (m + lay.pp - 1) / m
    return compute + comm_time_s(s, lay, gpu, nodes)


def comm_time_s(s: Shape, lay: Layout, gpu: Gpu, nodes: int) -> float:
    """The step's communication, not overlapped: ``trainer/accounting/comm_volume.py``'s volumes (what
    ``trainer/accounting/comm.py`` measures) as rings at the link's bandwidth."""
    layers = -(-s.n_layer // lay.pp)
    x = StepShape(n_layer=s.n_layer, d_model=s.d_model, seq_len=s.seq_len, micro_batch=lay.micro_batch_size,
                  grad_accum=s.global_batch // (lay.dp * lay.micro_batch_size), vocab=s.vocab,
                  bytes_per_value=s.bytes_per_value,
                  held_params=(layers * s.block_params + s.embedding_params) // lay.tp,
                  dp=lay.dp, tp=lay.tp, pp=lay.pp, zero_stage=lay.zero_stage,
                  activation_checkpointing=lay.activation_checkpointing)
    payload = volumes(x)
    sent = wire(x, payload)
    intra, inter = gpu.intra_node_gbps * 1e9, gpu.inter_node_gbps * 1e9
    world = lay.dp * lay.tp * lay.pp
    # Tensor ranks are adjacent (inside a node); data ranks cross nodes when there are several;
    # stages share a node when a whole model replica fits in one. A boundary's transfers are
    # on the critical path both ways: the activations forward, their gradients backward.
    pp_link = intra if lay.tp * lay.pp <= world // nodes else inter
    p2p = payload.get("pp.send", 0.0) + payload.get("pp.recv", 0.0)
    tied = sent.get("pp", 0.0) - payload.get("pp.send", 0.0)  # the tied embedding's all-reduce
    data = data_group(x)
    dp = sent.get(data, 0.0) / (inter if nodes > 1 else intra) if data else 0.0
    return sent.get("tp", 0.0) / intra + dp + (p2p + tied) / pp_link


def candidates(cfg: Config, world: int, gpus_per_node: int) -> list[Layout]:
    """Every layout the trainer accepts on ``world`` GPUs: tensor ranks inside a node and
    dividing the heads, stages dividing the blocks, ZeRO 0-1 only under a pipeline, micro-batch
    sizes that divide the global batch per data rank, ZeRO wherever bf16 accumulates in fp32."""
    m, gb = cfg.model, cfg.train.global_batch_size or cfg.train.micro_batch_size
    bf16_fp32 = cfg.train.precision == "bf16" and cfg.train.grad_accum_dtype == "fp32"
    out = []
    for tp, pp in itertools.product(_divisors(gpus_per_node), _divisors(m.n_layer)):
        if world % (tp * pp) or m.n_head % tp or m.kv_heads % tp or m.ff_size % tp:
            continue
        dp = world // (tp * pp)
        if gb % dp:
            continue
        for zero, mb, ac in itertools.product(range(4), (1, 2, 4, 8, 16, 32, 64), (False, True)):
            if (pp > 1 and zero > 1) or (gb // dp) % mb:
                continue
            # bf16 accumulating in fp32 over micro-batches needs ZeRO (``Config.resolve``),
            # ZeRO 1 then even on one data rank; otherwise ZeRO on one rank buys nothing.
            needs_zero = bf16_fp32 and gb // dp // mb > 1
            if (needs_zero and zero == 0) or (zero and dp == 1 and not (needs_zero and zero == 1)):
                continue
            out.append(Layout(dp, tp, pp, zero, mb, ac))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(cfg: Config, gpus_per_node: int, nodes: int = 1, gpu: str | None = None,
         memory_gb: float | None = None, efficiency: float = 0.5) -> dict:
    """Every candidate layout with its memory and step time; fitting ones first, fastest first."""
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError(f"--gpus {gpus_per_node} --nodes {nodes}: both must be at least 1")
    kind = _gpu(gpu)
    capacity = (memory_gb if memory_gb is not None else kind.memory_gb) * GIB
    s = shape_of(cfg)
    world = gpus_per_node * nodes
    rows = []
    for lay in candidates(cfg, world, gpus_per_node):
        mem = memory_bytes(s, lay)
        t = step_time_s(s, lay, kind, nodes, efficiency)
        peak = kind.peak_flops(s.mixed_precision)
        rows.append({**asdict(lay), "memory_gb": {k: v / GIB for k, v in mem.items()},
                     "fits": mem["total"] <= capacity, "step_time_s": t,
                     "mfu": s.flops_per_token * s.global_batch * s.seq_len / t / (world * peak)})
    rows.sort(key=lambda r: (not r["fits"], r["step_time_s"], r["memory_gb"]["total"]))
    own = config_layout(cfg, world)
    mine = memory_bytes(s, own)
    return {"params": s.params, "gpus": world, "nodes": nodes, "gpu": gpu or "H100",
            "gpu_memory_gb": capacity / GIB, "efficiency": efficiency, "layouts": rows,
            "config": {**asdict(own), "memory_gb": {k: v / GIB for k, v in mine.items()},
                       "fits": mine["total"] <= capacity}}


def config_layout(cfg: Config, world: int) -> Layout:
    """The config's own layout on ``world`` GPUs (dp derived, as ``Config.resolve`` does)."""
    p = cfg.parallel
    if world % (p.tp * p.pp):
        raise ConfigError(f"parallel.tp={p.tp} × parallel.pp={p.pp} does not divide {world} GPUs; "
                          "choose degrees whose product divides the GPU count")
    r = cfg.resolve(world)
    return Layout(world // (p.tp * p.pp), p.tp, p.pp, p.zero_stage, r.train.micro_batch_size,
                  cfg.train.activation_checkpointing)


def check_fits(cfg: Config, world: int, per_node: int, capacity_bytes: float, gpu: str | None,
               host: str | None = None) -> None:
    """Refuse, in one line, a launch whose predicted memory per GPU exceeds ``capacity_bytes``,
    naming the fastest layout that fits (``train.memory_check``). ``host``: a CPU host, whose
    ``capacity_bytes`` (where that figure comes from: ``host``) all ``per_node`` ranks share."""
    s = shape_of(cfg)
    need = memory_bytes(s, config_layout(cfg, world))["total"]
    share = capacity_bytes / per_node if host else capacity_bytes
    if need <= share:
        return
    try:
        kind = gpu if gpu and any(k.lower() in gpu.lower() for k in GPUS) else None
        best = next((r for r in plan(cfg, per_node, world // per_node, kind, share / GIB)["layouts"]
                     if r["fits"]), None)
    except ConfigError:
        best = None
    where = "ranks of this host" if host else "GPUs"
    hint = (f"no layout of these {where} fits it: add {'hosts' if host else 'GPUs'}" if best is None else
            f"the fastest that fits: parallel.tp={best['tp']} parallel.pp={best['pp']} "
            f"parallel.zero_stage={best['zero_stage']} train.micro_batch_size={best['micro_batch_size']} "
            f"train.activation_checkpointing={str(best['activation_checkpointing']).lower()}")
    if host:
        raise ConfigError(
            f"this launch needs about {need * per_node / GIB:.1f} GiB of host memory ({per_node} rank(s) × "
            f"{need / GIB:.1f} GiB, seqtrain plan), {capacity_bytes / GIB:.1f} GiB are available ({host}); "
            f"{hint}; train.memory_check=false skips this check")
    raise ConfigError(f"this layout needs about {need / GIB:.1f} GiB per GPU, the GPU has {capacity_bytes / GIB:.1f} "
                      f"GiB (seqtrain plan); {hint}; train.memory_check=false skips this check")


def predicted_step_s(cfg: Config, world: int, peak_flops: float, efficiency: float = 0.5,
                     gpu: str | None = None) -> float:
    """The planner's step time of the config's own layout: a known GPU's table, or a device
    measured at ``peak_flops`` (a CPU host: its matmul probe, with gloo's links of the host)."""
    s = shape_of(cfg)
    lay = config_layout(cfg, world)
    kind = next((g for k, g in GPUS.items() if gpu and k.lower() in gpu.lower()), None)
    if kind is None:
        tflops = peak_flops / 1e12
        kind = Gpu(memory_gb=0.0, bf16_tflops=tflops, fp32_tflops=tflops,
                   intra_node_gbps=HOST_LINK_GBPS, inter_node_gbps=HOST_LINK_GBPS)
    return step_time_s(s, lay, kind, 1, efficiency)


def _gpu(name: str | None) -> Gpu:
    if name is None:
        return GPUS["H100"]
    for key, g in GPUS.items():
        if key.lower() in name.lower():
            return g
    raise ConfigError(f"--gpu {name!r} is not a GPU the planner knows ({', '.join(GPUS)}); name one of "
                      "them, or give --gpu-memory-gb (speeds are then an H100's)")


def table(result: dict, top: int = 10) -> str:
    fits = [r for r in result["layouts"] if r["fits"]]
    head = (f"{result['params'] / 1e9:.3g} B parameters on {result['gpus']} × {result['gpu']} "
            f"({result['gpu_memory_gb']:.0f} GiB each, {result['nodes']} node(s)): "
            f"{len(fits)} of {len(result['layouts'])} layouts fit; the fastest {min(top, len(fits))}:")
    lines = [head, "| dp | tp | pp | ZeRO | micro | act. ckpt | params | grads | optimizer | activations | "
             "buffers | total GiB | step s | MFU |", "|" + " --- |" * 14]
    for r in fits[:top]:
        g = r["memory_gb"]
        lines.append(f"| {r['dp']} | {r['tp']} | {r['pp']} | {r['zero_stage']} | {r['micro_batch_size']} | "
                     f"{'yes' if r['activation_checkpointing'] else 'no'} | {g['params']:.1f} | {g['grads']:.1f} | "
                     f"{g['optimizer']:.1f} | {g['activations']:.1f} | {g['buffers']:.1f} | {g['total']:.1f} | "
                     f"{r['step_time_s']:.3g} | {100 * r['mfu']:.0f}% |")
    c = result["config"]
    lines.append(f"the config's own layout (dp {c['dp']}, tp {c['tp']}, pp {c['pp']}, ZeRO {c['zero_stage']}, "
                 f"micro-batch {c['micro_batch_size']}, activation checkpointing "
                 f"{'on' if c['activation_checkpointing'] else 'off'}): {c['memory_gb']['total']:.1f} GiB per GPU, "
                 f"{'fits' if c['fits'] else 'does not fit'}")
    if not fits:
        best = min(result["layouts"], key=lambda r: r["memory_gb"]["total"], default=None)
        lines.append("none fits" + (f"; the smallest needs {best['memory_gb']['total']:.1f} GiB per GPU" if best else ""))
    return "\n".join(lines)
