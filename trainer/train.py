"""``seqtrain train``: setup ► data ► model ► train module ► loop with its callbacks.

Order matters and is the same on every rank (``trainer/build.py``): validate the config before
any process group exists; prepare data on one rank per node while the others wait; build the
model with name-seeded weights; hand it to DeepSpeed last. The checkpoint callback resumes
before the first step.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from trainer import distributed, host_memory
from trainer.accounting.planner import check_fits, predicted_step_s
from trainer.build import build_data, build_model, build_module, setup, whole_model
from trainer.callbacks import memory
from trainer.callbacks.checkpointing import Checkpoint, RunFinished
from trainer.callbacks.evaluation import Evaluate
from trainer.callbacks.faults import FaultInjection
from trainer.callbacks.health import LossSpikes
from trainer.callbacks.layer_stats import LayerStats
from trainer.callbacks.metrics_file import MetricsFile
from trainer.callbacks.preemption import StopOnSignal
from trainer.callbacks.progress_bar import ProgressBar
from trainer.callbacks.scheduled_sampling import ScheduledSampling
from trainer.callbacks.tracking import MLflowTracker
from trainer.callbacks.watchdog import HangWatchdog
from trainer.config import Config
from trainer.evaluation.decode import evaluators
from trainer.loop import Callback, Trainer
from trainer.startup import Stopwatch

FAMILY_CALLBACKS: dict[str, type[Callback]] = {"scheduled_sampling": ScheduledSampling}
"""The loop callbacks a family spec may name (``FamilySpec.callbacks``)."""

def _say(msg: str) -> None:
    if distributed.rank() == 0:
        print(msg, flush=True)


def callbacks(cfg: Config, run_dir: Path, tokenizer_sha256: str, extra: tuple[Callback, ...] = ()) -> list[Callback]:
    """The loop's callbacks, in the order their hooks run (``extra`` after the standard ones)."""
    cbs: list[Callback] = [FAMILY_CALLBACKS[name]() for name in cfg.family.callbacks]
    faults = FaultInjection.from_env(run_dir)
    if faults is not None:
        cbs.insert(0, faults)  # before StopOnSignal, so a signal at step s stops at s
    # The signal check may stop the run at this step; then Checkpoint saves it. A spike's rewind
    # comes before both, so a rewound step is neither stopped at nor saved.
    ckpt = Checkpoint(run_dir / "checkpoints", tokenizer_sha256)
    spikes = [LossSpikes(run_dir, ckpt)] if cfg.train.on_spike != "off" else []
    # LayerStats adds its keys to the logged row, so it comes before every callback that reads it.
    cbs += [*([LayerStats()] if cfg.train.layer_stats else []), MetricsFile(run_dir / "metrics.jsonl"), ProgressBar(), Evaluate(), *spikes, StopOnSignal(), ckpt,
            RunFinished(run_dir)]
    if cfg.tracking.enabled:
        cbs.append(MLflowTracker(run_dir))
    cbs += extra
    if cfg.train.hang_timeout_s:
        # Last: its step-start hook marks the start of the step's work, its step-end hook the
        # end of every other hook.
        cbs.append(HangWatchdog(run_dir, cfg.train.hang_timeout_s, distributed.rank(), distributed.world_size()))
    return cbs


def _write_run_dir(cfg: Config, run_dir: Path, tokenizer_files: list[Path], rank: int) -> str:
    """config.yaml and the tokenizers (rank 0); returns the tokenizers' sha256."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        for f in tokenizer_files:
            shutil.copyfile(f, run_dir / f.name)
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(tokenizer_files))).hexdigest()


def _check_memory(cfg: Config, device: torch.device) -> None:
    """Before the data and the model: the planner's prediction against what this host (all its
    ranks together) or this GPU can hold; one line and exit 2 when it cannot."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        check_fits(cfg, distributed.world_size(), per_node, props.total_memory, props.name)
    else:
        available, where = host_memory.available_bytes()
        check_fits(cfg, distributed.world_size(), per_node, available, None, host=where)


def _predicted(cfg: Config, module, device: torch.device) -> str:
    """The start-up line's prediction: the planner's step time on this device (the GPU table,
    or the measured peak of a CPU) and the run's ETA; a warning when one step would outlast the
    hang watchdog's timeout."""
    if not cfg.family.planned or not module.peak_flops:
        return ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    step_s = predicted_step_s(cfg, distributed.world_size(), module.peak_flops, gpu=gpu)
    eta = step_s * cfg.train.steps
    timeout = cfg.train.hang_timeout_s
    if timeout and step_s > timeout:
        _say(f"warning: one step is predicted to take {_duration(step_s)}, longer than "
             f"train.hang_timeout_s={timeout:g}; the watchdog beats inside steps, but check the "
             "layout (seqtrain plan) or raise the timeout")
    return f"; predicted {_duration(step_s)} per step, ETA {_duration(eta)} for {cfg.train.steps} steps (seqtrain plan)"


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def train(cfg: Config, run_dir: Path, clock: Stopwatch | None = None) -> Trainer:
    clock = clock or Stopwatch()
    cfg, dims, device = setup(cfg)
    if cfg.train.memory_check and cfg.family.planned:
        _check_memory(cfg, device)
    clock.lap("setup")  # the process group (and DeepSpeed's import where the run needs it)
    baseline_mb = memory.current_mb(device)  # imports and process group; no data, no model
    memory.reset_peak(device)
    data = build_data(cfg, dims)
    cfg = data.cfg
    tok_sha = _write_run_dir(cfg, run_dir, data.tokenizer_files, dims.rank)
    clock.lap("data")
    model = build_model(cfg, dims, device)
    n = whole_model(cfg, model, dims).num_params()
    clock.lap("model")
    peaks = memory.phase_peaks(device, "init")
    memory.reset_peak(device)
    module = build_module(cfg, model, dims, device)
    clock.lap("engine")
    report = memory.MemoryReport(run_dir, device, baseline_mb, {**peaks, **memory.phase_peaks(device, "engine")})
    trainer = Trainer(cfg, module, data, callbacks(cfg, run_dir, tok_sha, (report,)), clock,
                      evaluators(cfg, data))
    _say(
        f"{cfg.name}: {cfg.model.family} {n / 1e6:.2f}M params, world {dims.world_size} "
        f"(dp {dims.dp}, tp {dims.tp}, pp {dims.pp}, zero {cfg.parallel.zero_stage}), "
        f"global batch {cfg.train.global_batch_size} "
        f"{'examples' if cfg.family.examples else f'x {cfg.data.seq_len} tokens'}, device {device}"
        f"{_predicted(cfg, module, device)}"
    )
    trainer.fit()
    if trainer.diverged:
        _say(f"stopped at step {trainer.step}: {trainer.stop_reason}; checkpoint saved. Lower "
             "train.lr, raise train.warmup_steps or check the data, then resume or restart")
    elif trainer.stop_reason:
        _say(f"stopped at step {trainer.step} ({trainer.stop_reason}); checkpoint saved, run the "
             "same command to resume")
    _say(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, memory.json, checkpoints/); "
         f"peak memory {report.max_train_peak_mb:,.0f} MB per rank ({'device' if device.type == 'cuda' else 'host RSS'})")
    return trainer
