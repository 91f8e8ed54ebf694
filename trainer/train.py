"""``seqtrain train``: config ► process group ► data ► model ► engine ► loop.

Order matters and is the same on every rank: validate the config before any process group
exists; prepare data on one rank per node while the others wait; build the full model with
name-seeded weights; hand it to DeepSpeed last.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import models
from trainer import checkpoint, distributed, host_memory
from trainer.callbacks import Checkpoint, Evaluate, MetricsFile, ProgressBar, ScheduledSampling
from trainer.config import Config
from trainer.data import WindowDataset, prepare
from trainer.data.sampler import LMBatches, StreamBatches
from trainer.errors import DataError
from trainer.faults import FaultInjection
from trainer.flops import peak_flops
from trainer.loop import Trainer
from trainer.parallel import ParallelDims
from trainer.preemption import StopOnSignal


def _say(msg: str) -> None:
    if distributed.rank() == 0:
        print(msg, flush=True)


def _on_local_rank0_first(fn):
    """Run ``fn`` on local rank 0 (which builds caches), then on the others (cache hits)."""
    if distributed.local_rank() == 0:
        out = fn(_say)
    distributed.barrier()
    if distributed.local_rank() != 0:
        out = fn(lambda _: None)
    return out


def set_vocab(cfg: Config, sizes: dict[str, int], where: Path) -> None:
    """Fill ``null`` vocabulary sizes from the tokenizers (rounded up to
    ``parallel.vocab_multiple``); refuse ones too small for them."""
    keys = {"vocab_size": "src"} if not cfg.is_seq2seq else {"src_vocab_size": "src", "tgt_vocab_size": "tgt"}
    mult = cfg.parallel.vocab_multiple
    for key, side in keys.items():
        have, need = getattr(cfg.model, key), sizes[side]
        if have is None:
            setattr(cfg.model, key, -(-need // mult) * mult)
        elif have < need:
            raise DataError(
                f"tokenizer at {where} has {need} tokens but model.{key}={have}; "
                f"raise model.{key} or set it to null"
            )


def _lm_data(cfg: Config, dims: ParallelDims):
    data = _on_local_rank0_first(lambda log: prepare(cfg.data, log=log))
    set_vocab(cfg, {"src": data.vocab_size}, data.dir)
    seq = cfg.data.seq_len
    train = WindowDataset(data.split_path("train"), data.dtype, seq)
    val = WindowDataset(data.split_path("val"), data.dtype, seq)
    t = cfg.train
    rows = t.micro_batch_size * (t.grad_accum if cfg.data.tbptt else 1) * dims.dp
    for split, ds, need in (("train", train, (seq + 1) * rows), ("val", val, (seq + 1) * t.micro_batch_size * dims.dp)):
        if len(ds.tokens) < (need if cfg.data.tbptt else seq + 1):
            raise DataError(
                f"{split} split of {cfg.data.source!r} has {len(ds.tokens)} tokens, fewer than one "
                f"window of data.seq_len={seq}{' per stream' if cfg.data.tbptt else ''}; use more "
                "data or a shorter seq_len"
            )
    if cfg.data.tbptt:
        b = StreamBatches(train, val, t.micro_batch_size, t.grad_accum, dims.dp)
        return b, b, [data.dir / "tokenizer.json"]
    return (LMBatches(train, t.micro_batch_size, t.grad_accum, dims.dp, t.seed),
            LMBatches(val, t.micro_batch_size, 1, dims.dp, t.seed), [data.dir / "tokenizer.json"])


def _seq2seq_data(cfg: Config, dims: ParallelDims, trainer_hooks: list):
    from trainer.data.seq2seq import PairBatches, make_buckets, prepare_pairs

    t = cfg.train
    prep = _on_local_rank0_first(lambda log: prepare_pairs(cfg.data, t.seed, log=log))
    set_vocab(cfg, prep.meta["vocab_size"], prep.dir)
    cfg.model.pad_id = prep.meta["pad_id"]
    eos = prep.meta["eos_id"]
    train_split, val_split = prep.split("train"), prep.split("val")
    buckets, dropped = make_buckets(train_split, cfg.data.seq_len, t.micro_batch_size, cfg.data.max_tokens, t.seed)
    if dropped:
        _say(f"skipped {dropped} training pairs longer than data.seq_len={cfg.data.seq_len}")
    val_buckets, _ = make_buckets(val_split, cfg.data.seq_len, t.micro_batch_size, cfg.data.max_tokens, t.seed)
    # BOS of the decoder is the EOS token (as GPT-2 does): no extra symbol to learn.
    train_b = PairBatches(train_split, buckets, t.grad_accum, dims.dp, cfg.model.pad_id, eos, eos, t.seed)
    val_b = PairBatches(val_split, val_buckets, 1, dims.dp, cfg.model.pad_id, eos, eos, t.seed, shuffle=False)
    if cfg.eval.decode_samples:
        trainer_hooks.append(_decode_eval(cfg, prep, val_split, eos))
    return train_b, val_b, prep.tokenizer_files()


def _decode_eval(cfg: Config, prep, val_split, eos: int):
    """Greedy/beam decoding of the first ``eval.decode_samples`` validation pairs."""
    from trainer.metrics import text_metrics

    tgt_tok = prep.tokenizer("tgt")
    n = min(cfg.eval.decode_samples, len(val_split))
    refs = [tgt_tok.decode(val_split.tgt(i).tolist()) for i in range(n)]

    def run(trainer: Trainer) -> dict[str, float]:
        if cfg.parallel.zero_stage == 3:
            return {}  # parameters are sharded; decode the checkpoint with `seqtrain generate`
        dims, model = trainer.dims, trainer.engine.module
        mine = list(range(dims.dp_rank, n, dims.dp))
        hyps: dict[int, str] = {}
        for k in range(0, len(mine), 64):
            idx = mine[k: k + 64]
            src = [torch.from_numpy(val_split.src(i).astype("int64")) for i in idx]
            batch = torch.nn.utils.rnn.pad_sequence(src, batch_first=True, padding_value=cfg.model.pad_id)
            outs = model.translate(batch.to(trainer.device), eos, eos, max_len=cfg.data.seq_len,
                                   beam=cfg.eval.beam, length_penalty=cfg.eval.length_penalty)
            hyps.update({i: tgt_tok.decode(o) for i, o in zip(idx, outs, strict=True)})
        if dist.is_initialized() and dims.dp > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, hyps)  # collective: every rank decodes its share
            hyps = {k: v for p in parts for k, v in p.items()}
        return {f"val_{k}": v for k, v in text_metrics([hyps[i] for i in range(n)], refs,
                                                        cfg.eval.bleu_tokenize).items()}

    return run


def _load_init(model: torch.nn.Module, path: str, rename=None) -> None:
    """Initial weights for fine-tuning; a resumed run then overrides them from its checkpoint.

    ``rename`` maps this module's parameter names to the file's (single-device) names.
    """
    from safetensors import safe_open

    if Path(path).is_dir():
        # A checkpoint (or run directory) of any layout, consolidated to whole weights: this
        # run then shards them its own way. The optimizer state starts afresh.
        stored = checkpoint.load_model_state(checkpoint.resolve(path))
    elif not Path(path).is_file():
        raise DataError(f"train.init_from={path!r}: no such file or checkpoint directory")
    else:
        try:
            with safe_open(path, "pt") as f:
                stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except Exception as e:  # safetensors raises plain errors on corrupt files
            raise DataError(f"train.init_from={path!r}: cannot load ({str(e).splitlines()[0]})") from None
    # A tied weight is one parameter under several names; a file may hold it under any of them.
    params: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        v = rename(n) if rename else n
        if v is not None:
            params.setdefault(id(p), (p, []))[1].append(v)
    missing, bad_shape, used, sources = [], [], set(), []
    for p, names in params.values():
        src = next((v for v in names if v in stored), None)
        if src is None:
            missing.append(names[0])
        elif stored[src].shape != p.shape:
            bad_shape.append(f"{src} {tuple(stored[src].shape)} vs {tuple(p.shape)}")
        sources.append((p, src))
        used.update(names)
    unexpected = sorted(stored.keys() - used)
    if missing or unexpected or bad_shape:
        raise DataError(f"train.init_from={path!r}: weights do not fit model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, other shapes {bad_shape[:2]})")
    with torch.no_grad():
        for p, src in sources:
            p.copy_(stored[src])
    _say(f"initialised from {path}")


def reference_model(cfg: Config) -> torch.nn.Module:
    """The whole single-device model on the meta device (no memory, no init): for parameter
    counts and FLOPs when this rank holds only a shard or a stage of it, and for the scaling
    planner.

    Built under ``torch.device("meta")``, not accelerate's ``init_empty_weights``: that one
    re-registers every parameter as it is assigned, which unties tied weights (the GPT's head
    and embedding), so tied models counted their embedding twice, as non-embedding parameters
    and FLOPs too.
    """
    with torch.device("meta"):
        return models.build(cfg.model, seed=cfg.train.seed)


def build_model(cfg: Config, device: torch.device, dims: ParallelDims | None = None) -> torch.nn.Module:
    """The model with its initial weights, then what is applied from outside (tensor
    parallelism, activation checkpointing, compile), in that order; DeepSpeed wraps it afterwards.

    Every rank builds the whole model (or its pipeline stage's layers) from the same
    name-seeded weights on the CPU, then keeps its tensor-parallel slice: every layout starts
    from the numbers of the single-device model.
    """
    torch.manual_seed(cfg.train.seed)  # dropout streams; weights are seeded per parameter name
    tp, pp = (dims.tp, dims.pp) if dims is not None else (1, 1)
    if pp > 1:
        from trainer.parallel.pipeline import gpt_pipeline, single_device_name

        model = gpt_pipeline(cfg.model, dims.topology, cfg.train.seed, cfg.train.activation_checkpointing)
        if cfg.train.init_from:
            _load_init(model, cfg.train.init_from, lambda n: single_device_name(n, cfg.model))
    else:
        model = models.build(cfg.model, seed=cfg.train.seed)
        if cfg.train.init_from:
            _load_init(model, cfg.train.init_from)
    if tp > 1:
        from trainer.parallel.tensor import PARALLEL_RNG_REGIONS, PLANS, apply_tensor_parallel

        fam = cfg.model.family
        vocab = cfg.model.vocab_size if fam == "gpt" else cfg.model.tgt_vocab_size
        apply_tensor_parallel(model, PLANS[fam], dims.tp_group, PARALLEL_RNG_REGIONS[fam], vocab)
    model = model.to(device)
    if cfg.train.activation_checkpointing and pp == 1:  # the pipeline checkpoints its own layers
        from trainer.parallel.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if cfg.train.compile:
        model.compile()  # in place: parameter names (and so checkpoints) unchanged
    return model


def train(cfg: Config, run_dir: Path) -> Trainer:
    distributed.setup_environment()
    cfg = cfg.resolve(distributed.world_size())  # raises ConfigError before any rendezvous
    distributed.init_process_group()
    distributed.quiet_deepspeed()
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, distributed.rank())
    if dims.tp * dims.pp > 1:
        dims.grid  # noqa: B018 (creates the process groups: a collective, same point on every rank)
    device = distributed.device()
    host_memory.configure(cfg.train.host_allocator, device)

    extra_eval: list = []
    if cfg.is_seq2seq:
        train_b, val_b, tok_files = _seq2seq_data(cfg, dims, extra_eval)
    else:
        train_b, val_b, tok_files = _lm_data(cfg, dims)

    cfg.check_vocab()
    run_dir.mkdir(parents=True, exist_ok=True)
    if dims.rank == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        for f in tok_files:
            shutil.copyfile(f, run_dir / f.name)

    model = build_model(cfg, device, dims)
    whole = reference_model(cfg) if dims.tp * dims.pp > 1 else model
    flops_per_token, _ = whole.flops_per_token(cfg.data.seq_len)

    from trainer import engine as engine_mod

    engine, scheduler = engine_mod.initialize(model, cfg, dims)
    ckpt_root = run_dir / "checkpoints"
    # Order matters: the signal check may stop the run at this step, then Checkpoint saves it.
    tok_sha = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(tok_files))).hexdigest()
    callbacks = [MetricsFile(run_dir / "metrics.jsonl"), ProgressBar(), Evaluate(), StopOnSignal(),
                 Checkpoint(ckpt_root, {"tokenizer_sha256": tok_sha})]
    if cfg.model.family == "rnn_seq2seq":
        callbacks.insert(0, ScheduledSampling())
    faults = FaultInjection.from_env(run_dir)
    if faults is not None:
        callbacks.insert(0, faults)  # before StopOnSignal, so a signal at step s stops at s
    if cfg.tracking.enabled:
        from trainer.tracking import MLflowTracker

        callbacks.append(MLflowTracker(run_dir))
    trainer = Trainer(
        cfg, engine, scheduler, dims, train_b, val_b, device,
        flops_per_token, peak_flops(device, cfg.train.precision, cfg.train.peak_tflops), callbacks,
    )
    trainer.extra_eval = extra_eval

    resume_from = checkpoint.latest_valid(ckpt_root, warn=_say)
    if resume_from is not None:
        p = cfg.parallel
        # DeepSpeed reloads its own shards only into the layout that wrote them.
        layout = {"tp": p.tp, "pp": p.pp, "zero_stage": p.zero_stage,
                  **({"dp": p.dp} if p.zero_stage else {})}
        checkpoint.check_compatible(resume_from, cfg.model.model_dump(mode="json"), tok_sha, layout)
        t0 = time.perf_counter()
        _, client_state = engine.load_checkpoint(str(ckpt_root), tag=resume_from.name)
        trainer.load_client_state(client_state)
        rank_file = checkpoint.rank_state_file(resume_from, dims.rank)
        if rank_file.is_file():
            trainer.load_rank_state(torch.load(rank_file, weights_only=False))
        _say(f"resumed from {resume_from} at step {trainer.step} (loaded in {time.perf_counter() - t0:.2f} s)")

    n = whole.num_params()
    _say(
        f"{cfg.name}: {cfg.model.family} {n / 1e6:.2f}M params, world {dims.world_size} "
        f"(dp {dims.dp}, tp {dims.tp}, pp {dims.pp}, zero {cfg.parallel.zero_stage}), "
        f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, device {device}"
    )
    trainer.fit()
    if trainer.diverged:
        _say(f"stopped at step {trainer.step}: {trainer.stop_reason}; checkpoint saved. Lower "
             "train.lr, raise train.warmup_steps or check the data, then resume or restart")
    elif trainer.stop_reason:
        _say(f"stopped at step {trainer.step} ({trainer.stop_reason}); checkpoint saved, run the "
             "same command to resume")
    _say(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
    return trainer
