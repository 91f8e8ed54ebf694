"""One process, fp32, no ZeRO, tensor or pipeline parallelism: the engine in plain PyTorch.

Such a run needs nothing DeepSpeed adds, yet importing DeepSpeed and ``deepspeed.initialize``
cost seconds before the first step: every restart, scaling point and array task pays them.
``LocalEngine`` has the part of DeepSpeed's engine interface that ``EngineModule`` and the
checkpoint code use, with DeepSpeed's semantics on this path (``DeepSpeedEngine.backward``,
``_take_model_step``): the loss divided by the accumulation steps before backward; at the
boundary the fp32 clipping hook, ``optimizer.step()``, gradients set to None, the scheduler
stepped, the counters advanced. Losses equal the DeepSpeed engine's bit for bit
(``tests/trainer/engine/test_local.py``).

It writes DeepSpeed's ZeRO-0 checkpoint file (``mp_rank_00_model_states.pt``, the same keys), so
a run can move between the two engines, and the resharding reader, evaluation and export read
it as any other ZeRO-0 checkpoint.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import safe_load

MODEL_FILE = "mp_rank_00_model_states.pt"
# Keys of DeepSpeed's own in the file; the rest is the caller's client state.
ENGINE_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
               "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
               "random_ltd", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
               "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version")


class TorchCheckpointEngine:
    """Writes one state dict to one file (DeepSpeed's checkpoint engine interface:
    ``checkpoint.async`` swaps in a snapshotting stand-in for the length of a save)."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        Path(path).mkdir(parents=True, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        torch.save(state_dict, path)

    def commit(self, tag: str) -> bool:
        return True


class LocalEngine:
    """``model`` trained by ``optimizer`` and ``scheduler`` in this process only."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 ds_config: dict[str, Any]) -> None:
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.config = ds_config
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0
        self.checkpoint_engine = TorchCheckpointEngine()
        self._global_grad_norm: torch.Tensor | None = None
        self._accum = int(ds_config["gradient_accumulation_steps"])
        self._micro_steps = 0

    # ------------------------------------------------------------------ training

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def gradient_clipping(self) -> float:
        return float(self.config["gradient_clipping"])

    def fp16_enabled(self) -> bool:
        return False

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self._global_grad_norm

    def clip_fp32_gradients(self) -> None:
        """Replaced by the train module's clipping (``deepspeed_private.replace_fp32_clipping``)."""
        self._global_grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping())

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self._accum if self._accum > 1 else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the coming ``step`` updates (DeepSpeed's name and meaning)."""
        return (self._micro_steps + 1) % self._accum == 0

    def step(self) -> None:
        """The optimizer at the accumulation boundary; nothing on the other micro-steps."""
        self._micro_steps += 1
        if self._micro_steps % self._accum:
            return
        if self.gradient_clipping() > 0:
            self.clip_fp32_gradients()
        self.optimizer.step()
        self.module.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.global_steps += 1
        self.global_samples += int(self.config["train_batch_size"])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = False) -> None:
        d = Path(save_dir) / tag
        self.checkpoint_engine.makedirs(str(d), exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "buffer_names": [n for n, _ in self.module.named_buffers()],
            "optimizer": self.optimizer.state_dict(),
            "param_shapes": None, "frozen_param_shapes": None, "shared_params": None,
            "frozen_param_fragments": None,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "data_sampler": None, "random_ltd": None,
            "skipped_steps": self.skipped_steps, "global_steps": self.global_steps,
            "global_samples": self.global_samples, "dp_world_size": 1, "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": self.config, "ds_version": _deepspeed_version(),
        }
        self.checkpoint_engine.save({**state, **client_state}, str(d / MODEL_FILE))

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        """Weights, optimizer, scheduler and counters from a ZeRO-0 file (ours or DeepSpeed's);
        returns (path, the client state)."""
        path = Path(load_dir) / tag / MODEL_FILE
        state = safe_load(path)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps = state["global_steps"]
        self.global_samples = state.get("global_samples", self.global_steps * self.config["train_batch_size"])
        self.skipped_steps = state["skipped_steps"]
        return str(path), {k: v for k, v in state.items() if k not in ENGINE_KEYS}


def _deepspeed_version() -> str | None:
    """The installed DeepSpeed's version, from its metadata (no import)."""
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None
