"""Typed, validated run configuration: YAML preset + ``--set dotted.key=value`` overrides.

Every field carries a docstring (``seqtrain config --help`` style tooling and readers rely on
it). Validation happens before any process group starts; every problem becomes one line
naming the key, the bad value and what would be valid.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models import FAMILIES, GPTConfig, ModelConfig
from models.sources import SourceConfig
from trainer import families
from trainer.errors import ConfigError, DataError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class TokenizerConfig(_Section):
    kind: Literal["bpe", "char"] = "bpe"
    """``bpe``: byte-level BPE trained on the corpus; ``char``: one token per character (the most
    frequent ``vocab_size - 3`` characters, the rest map to an unknown token). Both HF
    ``tokenizers``."""
    vocab_size: int = Field(2048, ge=8, le=1_000_000)
    """Vocabulary size when training a tokenizer (byte-level BPE needs at least 258: 256 bytes
    and 2 special tokens)."""
    path: str | None = None
    """An existing ``tokenizer.json`` (or a folder holding one) instead of training one."""
    train_bytes: int = Field(1_000_000_000, ge=1)
    """Text a trained tokenizer learns from: the training documents in the corpus's order up
    to this many bytes (a mixture: each source's share by its weight). A bounded,
    deterministic sample, so preparing a corpus far larger than memory never holds it whole."""


class MixtureSource(_Section):
    source: str
    """Any ``data.source``: ``stdlib``, a file, folder or glob, ``hf:NAME``, or pre-tokenized
    ids. Each source is prepared and cached on its own."""
    weight: float = Field(ge=0.0)
    """Share of every global batch drawn from this source (weights are normalised)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Label in metrics (``tokens/NAME``, ``val_loss/NAME``): letters, digits, ``_ . -``;
    default the source string with every other character run replaced by ``_``."""
    text_field: str | None = None
    """This source's text field (default ``data.text_field``)."""
    hf_config: str | None = None
    """This source's ``datasets`` configuration (default ``data.hf_config``)."""
    hf_data_files: str | list[str] | None = None
    """This source's ``data_files`` (default ``data.hf_data_files``)."""
    max_bytes: int | None = Field(None, ge=1)
    """Use at most this many bytes of this source (default ``data.max_bytes``)."""
    tokenizer: str | None = None
    """Pre-tokenized sources: the tokenizer that made their ids; it must be the mixture's."""

    @property
    def label(self) -> str:
        return self.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", self.source).strip("_") or "source"


class DataConfig(_Section):
    source: str = "stdlib"
    """``stdlib``: the installed Python standard library's source (always present, no download);
    a file, folder or glob (``.txt``/text, ``.jsonl``, ``.parquet``); or ``hf:NAME`` for
    ``datasets.load_dataset(NAME)`` (``hf:json`` / ``hf:parquet`` with ``hf_data_files``).
    Already tokenized (with ``data.tokenizer.path``, the tokenizer that made the ids): a folder
    holding nanoGPT's ``train.bin`` (and ``val.bin``), or a Megatron-LM / GPT-NeoX indexed
    dataset named by its prefix (``PREFIX.bin`` + ``PREFIX.idx``). Classifier families:
    ``listops`` (generated) or a ListOps file (``EXPRESSION`` or ``LABEL<TAB>EXPRESSION`` per line)."""
    text_field: str = "text"
    """Field holding the text in ``.jsonl`` / ``.parquet`` files and ``datasets`` rows."""
    hf_config: str | None = None
    """``datasets`` configuration name (the second argument of ``load_dataset``)."""
    hf_split: str = "train"
    """``datasets`` split to read; it is then divided into train/validation by ``val_fraction``."""
    hf_data_files: str | list[str] | None = None
    """``data_files`` for ``load_dataset`` (local files for the ``json``/``parquet`` builders)."""
    streaming: bool = False
    """Stream a ``datasets`` source instead of downloading it whole (large corpora)."""
    target_source: str | None = None
    """Sequence-to-sequence only: a target file aligned line by line with ``source``."""
    val_source: str | None = None
    """Sequence-to-sequence: the official validation pairs (a ``.tsv``/``.jsonl`` file, or a
    source file with ``val_target_source``); then all of ``source`` trains. Unset: a hash slice
    of ``source`` of ``val_fraction`` validates. Classifiers: a ListOps file."""
    val_target_source: str | None = None
    """Sequence-to-sequence: the target file aligned line by line with ``val_source``."""
    test_source: str | None = None
    """Sequence-to-sequence: the official test pairs, for ``seqtrain eval RUN --split test``
    (never read in training). Classifiers: a ListOps file."""
    test_target_source: str | None = None
    """Sequence-to-sequence: the target file aligned line by line with ``test_source``."""
    source_field: str = "source"
    """Sequence-to-sequence JSONL: the field holding the source text."""
    target_field: str = "target"
    """Sequence-to-sequence JSONL: the field holding the target text."""
    num_pairs: int = Field(20_000, ge=10)
    """The embedded generated tasks: pairs of ``source: dates``, expressions of
    ``source: listops``."""
    shared_vocab: bool = True
    """Sequence-to-sequence: one tokenizer for both sides (else one per side)."""
    max_tokens: int | None = Field(None, ge=1)
    """Sequence-to-sequence: token budget of a micro-batch (padded sentences × longest side),
    like fairseq's max_tokens; ``null``: ``train.micro_batch_size`` sentences per micro-batch.
    Sentences are bucketed by length either way."""
    prefetch: bool = True
    """Read the next micro-batch in a background thread while the current one computes."""
    tbptt: bool = False
    """RNN language models: truncated BPTT over contiguous streams (each batch row reads one
    stream; the state is carried into the next window of ``seq_len`` tokens and detached)."""
    invalid_utf8: Literal["replace", "fail"] = "replace"
    """Bytes that are not UTF-8: ``replace`` with U+FFFD, or ``fail`` naming the file."""
    max_bytes: int | None = Field(None, ge=1)
    """Use at most this many bytes of the corpus (whole files, chosen deterministically)."""
    shard_bytes: int = Field(64 << 20, ge=1)
    """Input bytes per preparation shard (whole files; large JSONL files cut at line ends): the
    unit of work of ``seqtrain data prepare --workers/--part`` and what a killed preparation
    redoes at most. The prepared tokens do not depend on it."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of documents (files) held out for validation, chosen by a hash of their name."""
    seq_len: int = Field(128, ge=2)
    """Tokens per training window (the model sees ``seq_len`` inputs and predicts the next one)."""
    sampling: Literal["windows", "random"] = "windows"
    """Language-model training windows: ``windows``, the token stream cut into consecutive
    windows, shuffled, each read once per epoch; ``random``, windows starting at any token,
    drawn with replacement (nanoGPT's sampling: a text's context changes each time it comes
    round). Both are a pure function of the step: every layout reads the same sequences, and
    resume is exact. Evaluation always reads fixed windows."""
    document_mask: bool = False
    """Decoders (GPT): the documents packed into a window attend only within themselves and
    their positions restart at each one (learned or RoPE), so a window trains as its documents
    would one by one; a document ends with the tokenizer's end-of-text token, and the token
    after it (the next document's first) is not predicted. Attention then runs SDPA's masked
    kernels, not flash. Not with pipeline, context or sequence parallelism."""
    mixture: list[MixtureSource] | None = None
    """Language models: train on several sources in proportion to their weights (replaces
    ``source``), as Megatron's ``--data-path w1 p1 w2 p2``. Every global batch draws from each
    source its weight's share, exactly up to the rounding of one batch; a source that runs out
    starts a new epoch in a new order. One tokenizer for all (``data.tokenizer``; trained on a
    sample of every source by weight). Validation loss is reported per source and as the
    weighted mean (``val_loss``)."""
    allow_mixture_change: bool = False
    """On resume, accept mixture weights (or sources) different from the checkpoint's: the new
    ones apply from the resumed step on. Otherwise such a resume is refused."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """How text becomes tokens."""
    cache_dir: str | None = None
    """Where tokenizers and packed token shards are cached; default ``$SEQTRAIN_CACHE`` or
    ``~/.cache/seqtrain``."""

    @model_validator(mode="after")
    def _bpe_alphabet(self) -> DataConfig:
        if self.tokenizer.kind == "bpe" and self.tokenizer.path is None and self.tokenizer.vocab_size < 258:
            raise ValueError(
                f"data.tokenizer.vocab_size={self.tokenizer.vocab_size} is below 258, the byte-level "
                "BPE alphabet (256 bytes + 2 special tokens)"
            )
        if self.mixture is not None:
            self._check_mixture()
        return self

    def _check_mixture(self) -> None:
        labels = [m.label for m in self.mixture]
        if not labels:
            raise ValueError("data.mixture is empty: give at least one {source, weight}")
        if len(set(labels)) != len(labels):
            dup = next(x for x in labels if labels.count(x) > 1)
            raise ValueError(f"data.mixture names {dup!r} twice: give each source a distinct name")
        if sum(m.weight for m in self.mixture) <= 0:
            raise ValueError("data.mixture weights are all zero: at least one must be positive")

    def resolved_cache_dir(self) -> Path:
        d = self.cache_dir or os.environ.get("SEQTRAIN_CACHE") or "~/.cache/seqtrain"
        return Path(d).expanduser()


class ScheduledSamplingConfig(_Section):
    eps_start: float = Field(0.0, ge=0.0, le=1.0)
    """Probability ε of feeding the model's own previous output, at ``start_step``."""
    eps_end: float = Field(0.0, ge=0.0, le=1.0)
    """ε reached at ``start_step + span`` and kept after."""
    start_step: int = Field(0, ge=0)
    """Step where the linear rise begins (ε = eps_start before it)."""
    span: int = Field(1000, ge=1)
    """Steps over which ε rises linearly from eps_start to eps_end."""

    def eps(self, step: int) -> float:
        frac = min(1.0, max(0.0, (step - self.start_step) / self.span))
        return self.eps_start + (self.eps_end - self.eps_start) * frac


class TrainConfig(_Section):
    steps: int = Field(500, ge=1)
    """Optimizer steps to run."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one data-parallel rank."""
    grad_accum: int | None = Field(None, ge=1)
    """Micro-batches accumulated per step; ``null`` derives it from ``global_batch_size``."""
    global_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimizer step over all ranks; must equal micro × accumulation × dp."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (reached after warm-up)."""
    min_lr: float = Field(1e-4, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warm-up steps from 0 to ``lr``."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW decoupled weight decay on matrices (not on biases, norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = Field(1234, ge=0)
    """Seed for weights, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 uses dynamic loss scaling and needs a GPU."""
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs: the dtype gradients are accumulated in across micro-batches (DeepSpeed's
    ``data_types.grad_accum_dtype``). ``fp32`` under every ZeRO stage, so layouts with different
    accumulation counts agree (ZeRO 1 then runs DeepSpeed's ``BF16_Optimizer``, whose fp32
    gradient buffer the planner counts). DeepSpeed has no fp32 accumulation for bf16 weights
    without ZeRO: there a step of more than one micro-batch is refused unless this is ``bf16``
    (or ``parallel.zero_stage`` ≥ 1, which costs no memory)."""
    tf32: bool = True
    """On GPUs: fp32 matmuls and convolutions use TensorFloat-32 tensor cores
    (``torch.set_float32_matmul_precision("high")``, cuDNN's ``allow_tf32``): about 8× the fp32
    rate on A100/H100, a 10-bit mantissa in the products, fp32 accumulation. No effect on CPUs
    or on bf16/fp16 matmuls."""
    log_every: int = Field(10, ge=1)
    """Log metrics every this many steps: the host's only reads of the device in training (the
    loss and token counts, the non-finite guard's counts, the ranks' stop-signal flag), so a
    preemption signal is acted on at the next such step."""
    nonfinite_patience: int = Field(5, ge=0)
    """Skip any update whose gradients hold NaN/inf (the step still counts and is logged); stop
    the run, with a checkpoint of the last good weights, after this many skipped in a row
    (checked at the logging cadence). 0 turns the check off (it costs one scalar all-reduce per
    step; no host sync with fused AdamW)."""
    z_loss: float = Field(0.0, ge=0)
    """PaLM's z-loss coefficient (1e-4 in PaLM and OLMo-2): ``z_loss · log²Z`` per target token is
    added to the training loss (Z: the softmax normaliser of the output logits), keeping logits
    from drifting in long bf16 runs. The logged ``loss`` is the objective (cross-entropy + z);
    ``z_loss`` is logged beside it as its own metric; evaluation reports the plain cross-entropy.
    0 turns it off. Every family, every layout (the vocab-parallel and context-parallel losses
    compute the same term)."""
    loss_chunk: int | None = Field(None, ge=0)
    """GPT: compute the output layer and the cross-entropy this many tokens at a time, so the
    whole ``tokens × vocab`` logits never exist (in fp32 they are 3.3 GB for a micro-batch of
    16 × 1024 tokens of GPT-2's vocabulary); each chunk's gradients are computed in the forward,
    so nothing is recomputed (``models/loss.py``). ``null``: automatic, chunks of 2²⁶ / vocab
    tokens (256 MiB of fp32 logits) once a micro-batch holds more; ``0``: never. Applies
    without tensor, pipeline or context parallelism (they compute their own loss on logits
    already split) and below ZeRO 3 (which would gather the head's weight for every chunk);
    an explicit value there is refused."""
    peak_tflops: float | None = Field(None, gt=0)
    """Device peak for MFU; ``null``: a table of known GPUs, or a matmul probe on CPU."""
    memory_check: bool = True
    """Before the data and the model exist: refuse (one line, exit 2) a launch whose predicted
    memory (``seqtrain plan``'s model, ``trainer/accounting/planner.py``) exceeds what it may use,
    naming the fastest layout that fits: on GPUs each GPU's memory; on CPU hosts the prediction
    per rank times the ranks of this host against the cgroup's limit where one is set, else the
    available RAM. Families the planner models (``FamilySpec.planned``)."""
    engine: Literal["auto", "deepspeed"] = "auto"
    """``auto``: DeepSpeed's engine, except for one process in fp32 without ZeRO, tensor or
    pipeline parallelism, which trains in plain PyTorch with the same numbers and checkpoint
    files and never imports DeepSpeed (seconds sooner to the first step); ``deepspeed``:
    DeepSpeed's engine always."""
    compile: bool = False
    """``torch.compile`` the model (in place, parameter names unchanged) before the engine wraps
    it. Inductor's kernels are cached under ``data.cache_dir``/inductor (unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set): the first run compiles (tens of seconds on a CPU), later
    runs of the same model start in a few."""
    sdpa_backend: Literal["auto", "math", "flash", "efficient"] = "auto"
    """Kernel of ``scaled_dot_product_attention``: ``auto`` lets torch pick (flash attention where
    it applies); ``math`` forces the unfused reference kernel (for comparison)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    optimizer_impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    """AdamW kernel: ``fused`` (one kernel per parameter group, CUDA and CPU), ``foreach``
    (multi-tensor), ``loop`` (per parameter); ``auto`` = fused on CUDA and CPU, else foreach."""
    host_allocator: Literal["retain", "system"] = "retain"
    """CPU training only: ``retain`` sets glibc's malloc to keep freed memory for the next
    step instead of returning it to the kernel (no page faults per step,
    ``trainer/host_memory.py``); ``system`` leaves the allocator as it is."""
    hang_timeout_s: float = Field(1800.0, ge=0)
    """Seconds a rank may go without finishing a step (or its hooks) before the hang watchdog
    writes every rank's Python stacks to ``run_dir/hang/``, names the stuck rank and ends the
    job with exit code 5 (``trainer/callbacks/watchdog.py``); 0 turns it off. Keep it above the longest
    step, evaluation or checkpoint save."""
    init_from: str | None = None
    """Start from these weights instead of a fresh init: a ``model.safetensors`` in our layout
    (``seqtrain import-hf``, ``seqtrain export --format safetensors``), or a checkpoint or run
    directory saved under any parallel layout (consolidated, then sharded the new way; the
    optimizer starts afresh)."""
    scheduled_sampling: ScheduledSamplingConfig = ScheduledSamplingConfig()
    """RNN sequence-to-sequence: feed the model's own predictions with a rising probability."""
    layer_stats: bool = True
    """Per-layer-group gradient norms (``grad_norm/h.3``) and update/weight ratios
    (``update_ratio/h.3``) in each logged row and MLflow (``trainer/callbacks/layer_stats.py``):
    a copy of the weights and a read of the gradients at logging steps only."""
    on_spike: Literal["off", "log", "rewind"] = "log"
    """Loss spikes (``trainer/callbacks/health.py``): a step's loss counts as high above the
    median of the previous ``spike_window`` normal steps by ``spike_factor`` times their spread;
    ``spike_steps`` high steps in a row are a spike. ``log``: print it and write it to
    ``run_dir/spikes.jsonl`` and the metrics; ``rewind``: also restore the newest checkpoint from
    before the spike and skip the data steps of its high steps (PaLM's remedy), recorded in
    ``spikes.jsonl`` so a resumed run skips them too; ``off``. Losses are read at the logging
    cadence, so a spike is seen up to ``log_every`` steps after it."""
    spike_window: int = Field(50, ge=5)
    """Normal steps whose median and spread a step's loss is compared with; no step is judged
    before the window is full."""
    spike_factor: float = Field(6.0, gt=0)
    """How many spreads (1.4826 × the median absolute deviation, at least 0.1 % of the median)
    above the median a high loss is."""
    spike_steps: int = Field(3, ge=1)
    """High steps in a row that make a spike."""
    spike_max_rewinds: int = Field(5, ge=1)
    """``rewind``: a run that spikes again after this many rewinds stops (as diverged, with a
    checkpoint): spikes that follow whatever data comes are the model or the learning rate,
    not the batches."""
    skip_data_steps: list[tuple[int, int]] = []
    """Data steps never trained on, as inclusive ranges ``[first, last]`` counted from 1 (the
    batches step n would read without skips): the run reads on after each range. A rewind adds
    its own ranges in ``spikes.jsonl``; this replays them (or PaLM's skipped batches) in a fresh
    run."""

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is larger than train.lr={self.lr}")
        return self


class ParallelConfig(_Section):
    dp: int | None = Field(None, ge=1)
    """Data-parallel degree; ``null`` derives it: world size / (tp × pp)."""
    tp: int = Field(1, ge=1)
    """Tensor-parallel degree."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel degree (stages)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters."""
    cp: int = Field(1, ge=1)
    """Context-parallel degree: each sequence is split across ``cp`` ranks, attention sees it
    whole through two all-to-alls per block (DeepSpeed-Ulysses: sequence ► heads and back,
    ``trainer/parallel/context.py``). GPT, with dp and ZeRO; ``model.n_head`` and
    ``data.seq_len`` must divide by it. Training only; evaluation runs each sequence whole."""
    sequence_parallel: bool = False
    """With ``tp`` ≥ 2: LayerNorms, dropouts and residuals hold 1/tp of the sequence, and each
    block's all-reduces become reduce-scatters and all-gathers of the same volume
    (``trainer/parallel/sequence.py``). Training only; evaluation runs plain tensor parallelism.
    Checkpoints are the same with or without it."""
    collective_timeout_s: float | None = Field(None, gt=0)
    """How long a collective may wait for its peers before the process group aborts it (NCCL's
    watchdog, gloo's timeout): also the wait of the other ranks while rank 0 prepares the data.
    ``null``: ``train.hang_timeout_s`` plus 10 minutes, at least 30 minutes, on the first start
    and after a torchrun restart alike, so the hang watchdog names a stuck rank and dumps its
    stacks before the group gives up. Set above it, and above the longest data preparation."""
    zero_bucket_elements: int | None = Field(None, ge=1)
    """ZeRO 1/2: elements in each gradient reduce bucket and all-gather bucket (DeepSpeed's
    ``reduce_bucket_size``, ``allgather_bucket_size``); ZeRO-3: its reduce bucket, with 0.9 of
    it the parameter prefetch. DeepSpeed allocates a reduce bucket whole (two with
    ``zero_overlap_comm``). ``null``: ``d_model²`` as Hugging Face's ``auto``, at least 2²⁰ (a tiny
    model would otherwise reduce in hundreds of buckets); 5e8 for families without ``d_model``."""
    zero_overlap_comm: bool = True
    """ZeRO 1-3: reduce gradients while the backward pass goes on (DeepSpeed's
    ``overlap_comm``; a second reduce bucket under ZeRO 1/2)."""
    zero_contiguous_gradients: bool = True
    """ZeRO 1-3: copy gradients into one contiguous buffer as they are produced (DeepSpeed's
    ``contiguous_gradients``): no fragmentation of the gradient memory."""
    vocab_multiple: int = Field(1, ge=1)
    """Round vocabulary sizes taken from the tokenizer (``model.*vocab_size: null``) up to a
    multiple of this, so tensor parallelism can split them (Megatron pads to 128 · tp). The
    padded rows are never produced by the tokenizer. Keep it fixed across layouts to compare
    or reshard runs."""


class CheckpointConfig(_Section):
    model_config = ConfigDict(**_Section.model_config, populate_by_name=True, serialize_by_alias=True)

    every: int = Field(0, ge=0)
    """Save every this many steps (0: only at the end)."""
    keep_last: int | None = Field(None, ge=1)
    """Keep only this many newest checkpoints (``null``: keep all)."""
    on_error: Literal["stop", "continue"] = "stop"
    """A save that fails (a full disk): ``stop`` the run with exit code 4, or ``continue``
    training and try again at the next save. Either way the failed save leaves nothing behind
    and ``latest`` keeps naming the last good checkpoint."""
    async_: bool = Field(False, alias="async")
    """Save asynchronously (``checkpoint.async``): the state is snapshotted on the training path
    (a copy in host memory: pinned on GPU) and written, published and pruned by a background
    thread while training goes on. A save still in flight when the next is due, or at the end,
    is waited for; a crash mid-write leaves the previous checkpoint as ``latest``. Costs one
    more copy of the checkpoint in host memory while it is written."""


class EvalConfig(_Section):
    every: int = Field(100, ge=0)
    """Evaluate on the validation split every this many steps (0: only at the end)."""
    batches: int = Field(8, ge=1)
    """Validation micro-batches in one evaluation, over all data-parallel ranks (a fixed,
    unshuffled slice of validation, the same for every layout); each rank evaluates its share."""
    at_start: bool = False
    """Also evaluate before the first step (the starting point of a fine-tune or of weights
    resharded from another layout through ``train.init_from``)."""
    decode_samples: int = Field(200, ge=0)
    """Sequence-to-sequence: validation pairs decoded at each evaluation for exact match, BLEU
    and chrF (sacrebleu); 0 turns decoding off."""
    beam: int = Field(1, ge=1)
    """Beam size for those decodes (1: greedy)."""
    length_penalty: float = Field(1.0, ge=0.0)
    """Beam search score = log p / length^length_penalty."""
    bleu_tokenize: str = "13a"
    """sacrebleu tokenizer for BLEU (``13a``, ``char``, ``intl``, ...)."""


class TrackingConfig(_Section):
    enabled: bool = True
    """Log parameters, metrics and the config to MLflow."""
    uri: str | None = None
    """MLflow tracking URI; ``null`` is MLflow's local default (``mlflow.db`` in the working
    directory, opened with ``mlflow ui``); a server URL on a cluster."""
    experiment: str = "seqtrain"
    """MLflow experiment name."""
    tags: dict[str, str] = {}
    """MLflow tags of the run (a scaling ladder tags budget, N, D and family)."""


class Config(_Section):
    """A complete training run."""

    name: str = "run"
    """Run name: the default run directory is ``runs/<name>``."""
    model: ModelConfig = Field(default_factory=GPTConfig)
    """Model family (``gpt``, ``encdec``, ``rnn_lm``, ``rnn_seq2seq``) and shape."""
    data: DataConfig = DataConfig()
    """Corpus, tokenizer and windows."""
    train: TrainConfig = TrainConfig()
    """Optimisation."""
    parallel: ParallelConfig = ParallelConfig()
    """Parallel layout."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint cadence and retention."""
    eval: EvalConfig = EvalConfig()
    """Periodic evaluation."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracking."""

    @property
    def family(self) -> families.FamilySpec:
        """What the trainer knows about this model family (``trainer/families.py``)."""
        return families.spec(self.model.family)

    @property
    def is_seq2seq(self) -> bool:
        return self.family.pairs

    @property
    def source(self) -> SourceConfig | None:
        """``model.source`` of a sequence-to-sequence model reading images or sound; None for
        token sources and for the families without the option."""
        return getattr(self.model, "source", None)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        fam, spec = self.model.family, self.family
        max_len = getattr(self.model, "max_seq_len", None)
        if max_len is not None and self.data.seq_len > max_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={max_len}")
        if self.data.tbptt and not spec.carries_state:
            raise ValueError(f"data.tbptt is for model.family={_one_of('carries_state')}, not {fam}")
        if self.data.mixture is not None and (spec.pairs or self.data.tbptt or self.data.sampling == "random"):
            raise ValueError("data.mixture is for language models with data.sampling=windows and without "
                             f"data.tbptt (here model.family={fam}, sampling {self.data.sampling}, tbptt "
                             f"{str(self.data.tbptt).lower()})")
        if self.data.sampling == "random" and (spec.pairs or self.data.tbptt):
            raise ValueError("data.sampling=random is for language models without data.tbptt (streams "
                             "and sentence pairs are read in order); use data.sampling=windows")
        ss = self.train.scheduled_sampling
        if (ss.eps_start or ss.eps_end) and not spec.scheduled_sampling:
            raise ValueError(f"train.scheduled_sampling is for model.family="
                             f"{_one_of('scheduled_sampling')}, not {fam}")
        for key in ("target_source", "val_source", "val_target_source", "test_source", "test_target_source"):
            if getattr(self.data, key) and not (spec.pairs or (spec.task == "listops" and "target" not in key)):
                raise ValueError(f"data.{key} is for sequence-to-sequence families, not {fam}")
        if spec.examples and (self.data.tbptt or self.data.mixture is not None or self.data.sampling == "random"):
            raise ValueError(f"model.family={fam} reads labelled examples: data.tbptt, data.mixture and "
                             "data.sampling=random are for language models")
        if spec.examples and self.data.source != spec.task and not self.data.source.endswith((".txt", ".tsv")):
            raise ValueError(f"model.family={fam} learns labelled examples: set data.source to {spec.task!r} "
                             f"(the embedded task) or a .txt/.tsv file of them, not {self.data.source!r}")
        for split in ("val", "test"):
            if getattr(self.data, f"{split}_target_source") and not getattr(self.data, f"{split}_source"):
                raise ValueError(f"data.{split}_target_source needs data.{split}_source (the source side)")
        if spec.pairs and self.data.source == "stdlib":
            raise ValueError(
                f"model.family={fam} needs (source, target) pairs: set data.source to 'dates' or "
                "'system-messages' (the embedded tasks), a .tsv or .jsonl file, or a source file with data.target_source"
            )
        if getattr(self.model, "share_embeddings", False) and not self.data.shared_vocab:
            raise ValueError("model.share_embeddings needs data.shared_vocab=true")
        self._check_spikes()
        return self

    def _check_spikes(self) -> None:
        """Spike settings that could never act, and skips a stream cannot take."""
        t, c = self.train, self.checkpoint
        if any(a < 1 or b < a for a, b in t.skip_data_steps):
            raise ValueError(f"train.skip_data_steps={[list(r) for r in t.skip_data_steps]}: each range is "
                             "[first, last] with 1 ≤ first ≤ last")
        if (t.skip_data_steps or t.on_spike == "rewind") and self.data.tbptt:
            raise ValueError("train.skip_data_steps and train.on_spike=rewind need batches that do not carry "
                             "state from step to step; data.tbptt streams do")
        # Refused where someone chose spike settings (the defaults just never fire in a short run);
        # compared with the defaults, since a saved config.yaml sets every field.
        chosen = t.on_spike == "rewind" or any(getattr(t, k) != TrainConfig.model_fields[k].default
                                               for k in ("spike_window", "spike_factor", "spike_steps"))
        if t.on_spike != "off" and chosen and t.spike_window + t.spike_steps > t.steps:
            raise ValueError(f"train.spike_window={t.spike_window} + train.spike_steps={t.spike_steps} > "
                             f"train.steps={t.steps}: no spike could ever be seen; shorten the window")
        if t.on_spike == "rewind":
            if not c.every:
                raise ValueError("train.on_spike=rewind needs checkpoints to rewind to: set checkpoint.every")
            saves = -(-(t.spike_steps + t.log_every) // c.every)  # saves between a spike's start and its sight
            if c.keep_last is not None and c.keep_last <= saves:
                raise ValueError(f"train.on_spike=rewind: checkpoint.keep_last={c.keep_last} may prune the last "
                                 f"checkpoint from before a spike ({saves} saves can come between its start "
                                 f"and its detection); keep at least {saves + 1}")

    def resolve(self, world_size: int) -> Config:
        """Fill in dp, grad_accum and global batch from the world size; check their arithmetic."""
        p, t = self.parallel, self.train
        self._check_layout()
        model_ranks = p.tp * p.pp * p.cp
        cp = " × parallel.cp" if p.cp > 1 else ""
        if world_size % model_ranks:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp × parallel.pp{cp} = {model_ranks}"
            )
        dp = world_size // model_ranks
        if p.dp is not None and p.dp != dp:
            raise ConfigError(
                f"parallel.dp={p.dp} but world size {world_size} / (tp {p.tp} × pp {p.pp}"
                f"{f' × cp {p.cp}' if p.cp > 1 else ''}) = {dp}; "
                "drop parallel.dp to derive it or launch a matching number of processes"
            )
        per_step = t.micro_batch_size * dp
        accum, gbs = t.grad_accum, t.global_batch_size
        if gbs is None:
            accum = accum or 1
            gbs = per_step * accum
        elif accum is None:
            if gbs % per_step:
                raise ConfigError(
                    f"train.global_batch_size={gbs} is not a multiple of train.micro_batch_size "
                    f"({t.micro_batch_size}) × dp ({dp}) = {per_step}"
                )
            accum = gbs // per_step
        elif gbs != per_step * accum:
            raise ConfigError(
                f"train.global_batch_size={gbs} != train.micro_batch_size ({t.micro_batch_size}) × "
                f"train.grad_accum ({accum}) × dp ({dp}) = {per_step * accum}"
            )
        if (t.precision == "bf16" and p.zero_stage == 0 and t.grad_accum_dtype == "fp32"
                and accum > 1):
            raise ConfigError(
                f"train.precision=bf16 with parallel.zero_stage=0 and {accum} micro-batches per step: "
                "DeepSpeed accumulates bf16 gradients in fp32 only under ZeRO; set parallel.zero_stage=1 "
                "(the same memory) or train.grad_accum_dtype=bf16"
            )
        if p.collective_timeout_s is not None and p.collective_timeout_s <= t.hang_timeout_s:
            raise ConfigError(
                f"parallel.collective_timeout_s={p.collective_timeout_s:g} is not above "
                f"train.hang_timeout_s={t.hang_timeout_s:g}: the process group would abort a stuck "
                "collective before the hang watchdog names the rank; raise it or leave it null"
            )
        if p.pp > 1 and self.eval.batches % dp:
            raise ConfigError(
                f"eval.batches={self.eval.batches} is not a multiple of dp={dp}: the pipeline "
                "engine evaluates equal shares on every data-parallel rank"
            )
        out = self.model_copy(deep=True)
        out.parallel.dp = dp
        out.train.grad_accum = accum
        out.train.global_batch_size = gbs
        return out

    def collective_timeout_s(self) -> float:
        """``parallel.collective_timeout_s``, or the default it documents."""
        given = self.parallel.collective_timeout_s
        return given if given is not None else max(1800.0, self.train.hang_timeout_s + 600.0)

    def loss_chunk_tokens(self) -> int:
        """Tokens per chunk of the GPT head's loss (``train.loss_chunk``; 0: whole logits)."""
        if self.train.loss_chunk is not None:
            return self.train.loss_chunk
        p, vocab = self.parallel, getattr(self.model, "vocab_size", None)
        if self.model.family != "gpt" or vocab is None or p.tp * p.pp * p.cp > 1 or p.zero_stage == 3:
            return 0
        return max(1, 2**26 // vocab)

    def zero_bucket_elements(self) -> int:
        """``parallel.zero_bucket_elements``, or ``d_model²`` and at least 2²⁰ (5e8 without a
        ``d_model``); even, as DeepSpeed's all-gather alignment needs."""
        d = getattr(self.model, "d_model", None)
        n = self.parallel.zero_bucket_elements or (max(d * d, 2**20) if d else 500_000_000)
        return n + n % 2

    def _check_layout(self) -> None:
        """Refuse, in one line, parallel combinations the model or DeepSpeed cannot run."""
        p, m, spec = self.parallel, self.model, self.family
        if p.tp > 1 and spec.tp_plan is None:
            raise ConfigError(
                f"parallel.tp={p.tp}: tensor parallelism is available for model.family "
                f"{_one_of('tp_plan', ' and ')}, not {m.family}; use data parallelism (and ZeRO) "
                "for this family"
            )
        if p.pp > 1:
            self._check_pipeline()
        if self.data.document_mask and (m.family != "gpt" or p.pp > 1 or p.cp > 1 or p.sequence_parallel):
            raise ConfigError(
                f"data.document_mask=true applies to model.family gpt without pipeline, context or sequence "
                f"parallelism (here {m.family}, pp {p.pp}, cp {p.cp}, sequence_parallel "
                f"{str(p.sequence_parallel).lower()}); set it false or change the layout"
            )
        if self.train.loss_chunk and (m.family != "gpt" or p.tp * p.pp * p.cp > 1 or p.zero_stage == 3):
            raise ConfigError(
                f"train.loss_chunk={self.train.loss_chunk} applies to model.family gpt without tensor, "
                f"pipeline or context parallelism and below ZeRO 3 (here {m.family}, tp {p.tp}, pp {p.pp}, "
                f"cp {p.cp}, zero {p.zero_stage}); leave it null (automatic) or 0"
            )
        if p.sequence_parallel:
            self._check_sequence_parallel()
        if p.cp > 1:
            self._check_context_parallel()
        if p.tp > 1:
            # Grouped-query attention: each tensor rank takes whole key/value groups.
            heads = {"model.n_head": m.n_head, "model.d_ff": m.ff_size,
                     "model.n_kv_head": getattr(m, "kv_heads", m.n_head)}
            for key, n in heads.items():
                if n % p.tp:
                    raise ConfigError(f"{key}={n} is not divisible by parallel.tp={p.tp} (tensor "
                                      f"parallelism cuts it into equal parts); use a tp that divides {n}")
            if getattr(m, "qk_norm", False):
                raise ConfigError(f"model.qk_norm with parallel.tp={p.tp} is not supported yet (the per-head "
                                  "norms' gradients would need a tensor-parallel sum); use dp/ZeRO or tp=1")

    def _check_sequence_parallel(self) -> None:
        p, spec = self.parallel, self.family
        if spec.sp_plan is None:
            raise ConfigError(f"parallel.sequence_parallel: available for model.family {_one_of('sp_plan')} "
                              f"only, not {self.model.family}")
        if p.tp < 2:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp ≥ 2 (it cuts the "
                              f"sequence across the tensor-parallel ranks); parallel.tp={p.tp}")
        if p.pp > 1:
            raise ConfigError(f"parallel.sequence_parallel with parallel.pp={p.pp} is not supported "
                              "yet; use tp with dp/ZeRO, or pipeline without sequence parallelism")
        if self.data.seq_len % p.tp:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is not divisible by parallel.tp={p.tp}, "
                              "as parallel.sequence_parallel needs")

    def _check_context_parallel(self) -> None:
        p, m = self.parallel, self.model
        if not self.family.context_parallel:
            raise ConfigError(f"parallel.cp={p.cp}: context parallelism is available for model.family "
                              f"{_one_of('context_parallel')} only, not {m.family}")
        if p.tp > 1 or p.pp > 1:
            raise ConfigError(f"parallel.cp={p.cp} with parallel.tp={p.tp}, parallel.pp={p.pp}: context "
                              "parallelism composes with data parallelism and ZeRO only (tp = pp = 1)")
        need = {"model.n_head": m.n_head, "model.n_kv_head": getattr(m, "kv_heads", m.n_head),
                "data.seq_len": self.data.seq_len}
        for key, n in need.items():  # Ulysses hands each rank whole key/value groups
            if n % p.cp:
                raise ConfigError(f"{key}={n} is not divisible by parallel.cp={p.cp}")

    def _check_pipeline(self) -> None:
        p, m = self.parallel, self.model
        if not self.family.pipeline:
            raise ConfigError(
                f"parallel.pp={p.pp}: pipeline parallelism is available for model.family "
                f"{_one_of('pipeline')} only, not {m.family}; use parallel.tp or data parallelism"
            )
        if p.zero_stage > 1:
            raise ConfigError(
                f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: DeepSpeed's "
                "pipeline engine supports ZeRO stage 0 or 1 only"
            )
        if m.n_layer < p.pp:
            raise ConfigError(f"parallel.pp={p.pp} exceeds model.n_layer={m.n_layer}: every "
                              "stage needs at least one block")
        if self.train.compile:
            raise ConfigError(f"parallel.pp={p.pp} does not combine with train.compile yet; "
                              "compile without pipeline parallelism")

    def with_vocab(self, sizes: dict[str, int], where: Path | str, pad_id: int | None = None) -> Config:
        """A copy finished from the prepared data: ``null`` vocabulary sizes filled from the
        tokenizers (``sizes``: side ► size, rounded up to ``parallel.vocab_multiple``), every
        size checked against them and against the tensor-parallel degree, and the padding id of
        pair families. The one place a config changes after validation."""
        out = self.model_copy(deep=True)
        if pad_id is not None:
            out.model.pad_id = pad_id
        mult = self.parallel.vocab_multiple
        for key, side in self.family.vocab.items():
            if side not in sizes:  # a side the data has no tokens on (an image source)
                continue
            have, need = getattr(out.model, key), sizes[side]
            if have is None:
                setattr(out.model, key, -(-need // mult) * mult)
            elif have < need and side in ("src", "tgt"):
                raise DataError(
                    f"tokenizer at {where} has {need} tokens but model.{key}={have}; "
                    f"raise model.{key} or set it to null"
                )
            elif have != need and side not in ("src", "tgt"):  # a task's fixed alphabet
                raise DataError(f"{where} has {need} {side} but model.{key}={have}; set it to {need} or null")
        out.check_vocab()
        return out

    def check_vocab(self) -> None:
        """Vocabulary sizes (resolved from the tokenizer) against the tensor-parallel degree."""
        tp = self.parallel.tp
        for key in self.family.vocab if tp > 1 else ():
            n = getattr(self.model, key)
            if n is not None and n % tp:
                raise ConfigError(
                    f"model.{key}={n} is not divisible by parallel.tp={tp}; set "
                    f"parallel.vocab_multiple={64 * tp} to pad the tokenizer's vocabulary"
                )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _one_of(attr: str, sep: str = " or ") -> str:
    return sep.join(families.having(attr))


# --------------------------------------------------------------------------- loading


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (``1e-3``, ``true``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. train.lr=3e-4")
    node = tree
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _fields_at(loc: tuple) -> list[str]:
    """Valid key names of the section at ``loc`` (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc:
        if part in FAMILIES:  # the model union's member, selected by its tag
            model = FAMILIES[part][0]
            continue
        if model is Config and part == "model":
            continue  # a union: the family tag that follows picks the member
        ann = model.model_fields.get(str(part))
        if ann is None or not isinstance(ann.annotation, type) or not issubclass(ann.annotation, BaseModel):
            return []
        model = ann.annotation
    return list(model.model_fields)


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    if len(loc) > 1 and loc[0] == "model" and loc[1] in FAMILIES:
        valid = _fields_at(loc[:-1]) if err["type"] == "extra_forbidden" else []
        loc = (loc[0], *loc[2:])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean 'model.{close[0]}'?" if close else ""
            return f"unknown key '{'.'.join(map(str, loc))}'{hint} (valid: {', '.join(valid)})"
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "union_tag_invalid":
        return f"model.family = {err['ctx']['tag']!r}: expected one of {', '.join(FAMILIES)}"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
        return f"unknown key '{dotted}'{hint} (valid: {', '.join(valid)})"
    if err["type"] in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return msg if not dotted or dotted in msg else f"{dotted}: {msg}"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a section"
    return f"{dotted} = {shown}: {err['msg']}"


def _check_mup_family(model: dict[str, Any], where: str) -> None:
    fam = model["family"]
    if "mup" in model and fam in FAMILIES and "mup" not in FAMILIES[fam][0].model_fields:
        with_widths = [f for f, (c, _) in FAMILIES.items() if "mup" in c.model_fields]
        raise ConfigError(f"{where}: model.mup: μP is defined for the Transformer families "
                          f"({', '.join(with_widths)}), not model.family={fam}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (or defaults when ``path`` is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {where} not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{where}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for o in overrides:
        apply_override(tree, o)
    if isinstance(tree.get("model"), dict):
        tree["model"].setdefault("family", "gpt")
        _check_mup_family(tree["model"], where)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        errs = e.errors()
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ConfigError(f"{where}: {_describe(errs[0])}{more}") from None
