"""``seqtrain train``: config ► process group ► data ► model ► engine ► loop.

Order matters and is the same on every rank: validate the config before any process group
exists; prepare data on one rank per node while the others wait; build the full model with
name-seeded weights; hand it to DeepSpeed last.
"""

from __future__ import annotations

from pathlib import Path

import torch

import models
from trainer import checkpoint, distributed
from trainer.callbacks import Checkpoint, Evaluate, MetricsFile, ProgressBar
from trainer.config import Config
from trainer.data import WindowDataset, prepare
from trainer.errors import DataError
from trainer.faults import FaultInjection
from trainer.flops import peak_flops
from trainer.loop import Trainer
from trainer.parallel import ParallelDims
from trainer.preemption import StopOnSignal


def _say(msg: str) -> None:
    if distributed.rank() == 0:
        print(msg, flush=True)


def train(cfg: Config, run_dir: Path) -> Trainer:
    distributed.setup_environment()
    cfg = cfg.resolve(distributed.world_size())  # raises ConfigError before any rendezvous
    distributed.init_process_group()
    distributed.quiet_deepspeed()
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, distributed.rank())
    device = distributed.device()

    # Data: local rank 0 tokenizes (or finds the cache); the rest then read the finished cache.
    if distributed.local_rank() == 0:
        data = prepare(cfg.data, log=_say)
    distributed.barrier()
    if distributed.local_rank() != 0:
        data = prepare(cfg.data, log=lambda _: None)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise DataError(
            f"tokenizer at {data.dir} has {data.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size or set it to null"
        )
    train_data = WindowDataset(data.split_path("train"), data.dtype, cfg.data.seq_len)
    val_data = WindowDataset(data.split_path("val"), data.dtype, cfg.data.seq_len)
    for split, ds in (("train", train_data), ("val", val_data)):
        if len(ds) < 1:
            raise DataError(
                f"{split} split of {cfg.data.source!r} has {len(ds.tokens)} tokens, fewer than one "
                f"window of data.seq_len={cfg.data.seq_len}; use more data or a shorter seq_len"
            )

    run_dir.mkdir(parents=True, exist_ok=True)
    if dims.rank == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "tokenizer.json").write_text((data.dir / "tokenizer.json").read_text())

    torch.manual_seed(cfg.train.seed)  # dropout streams; weights are seeded per parameter name
    model = models.build(cfg.model, seed=cfg.train.seed).to(device)
    flops_per_token, _ = model.flops_per_token(cfg.data.seq_len)

    from trainer import engine as engine_mod

    engine, scheduler = engine_mod.initialize(model, cfg)
    ckpt_root = run_dir / "checkpoints"
    # Order matters: the signal check may stop the run at this step, then Checkpoint saves it.
    callbacks = [MetricsFile(run_dir / "metrics.jsonl"), ProgressBar(), Evaluate(), StopOnSignal(),
                 Checkpoint(ckpt_root)]
    faults = FaultInjection.from_env(run_dir)
    if faults is not None:
        callbacks.insert(0, faults)  # before StopOnSignal, so a signal at step s stops at s
    if cfg.tracking.enabled:
        from trainer.tracking import MLflowTracker

        callbacks.append(MLflowTracker(run_dir))
    trainer = Trainer(
        cfg, engine, scheduler, dims, train_data, val_data, device,
        flops_per_token, peak_flops(device, cfg.train.precision, cfg.train.peak_tflops), callbacks,
    )

    resume_from = checkpoint.latest(ckpt_root)
    if resume_from is not None:
        _, client_state = engine.load_checkpoint(str(ckpt_root), tag=resume_from.name)
        trainer.load_client_state(client_state)
        _say(f"resumed from {resume_from} at step {trainer.step}")

    n = model.num_params()
    _say(
        f"{cfg.name}: {cfg.model.family} {n / 1e6:.2f}M params, world {dims.world_size} "
        f"(dp {dims.dp}, tp {dims.tp}, pp {dims.pp}, zero {cfg.parallel.zero_stage}), "
        f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, "
        f"{len(train_data):,} train windows, device {device}"
    )
    trainer.fit()
    if trainer.stop_reason:
        _say(f"stopped at step {trainer.step} ({trainer.stop_reason}); checkpoint saved, run the "
             "same command to resume")
    _say(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
    return trainer
