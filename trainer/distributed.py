"""Process-group setup: accelerator and backend chosen from the machine, one place for it.

``setup_environment`` must run before the first ``import deepspeed``: DeepSpeed picks its
accelerator at import time from ``DS_ACCELERATOR``.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from datetime import timedelta

import torch

from trainer.accounting import comm


class _NoMlflowForDeepSpeed:
    """DeepSpeed's autotuner imports mlflow at import time when it is installed, for its own
    tracking, which seqtrain never runs: seconds more for every process that imports DeepSpeed.
    This import hook makes that one import fail (the autotuner then runs without mlflow);
    every other ``import mlflow``, seqtrain's tracking included, finds it as usual."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlflow":
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__") == "deepspeed.autotuning.autotuner":
                    raise ModuleNotFoundError("mlflow: not for DeepSpeed's autotuner", name=name)
                frame = frame.f_back
        return None


def setup_environment() -> None:
    """CPU accelerator on a machine without CUDA; single-process rendezvous defaults; DeepSpeed's
    import without mlflow."""
    if not any(isinstance(f, _NoMlflowForDeepSpeed) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoMlflowForDeepSpeed())
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "WORLD_SIZE" not in os.environ:
        # Launched as a plain process: a world of one, rendezvous on a free local port.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_process_group(timeout_s: float = 1800.0) -> None:
    """NCCL on GPUs, gloo on CPUs (DeepSpeed's CPU accelerator would otherwise ask for oneCCL).
    A world of one gets torch's group directly: importing DeepSpeed costs seconds, and its
    engine, when the run needs it, adopts the group. ``timeout_s`` bounds every collective's
    wait, on the first start and after a restart alike (``Config.collective_timeout_s``)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    _subgroups_inherit(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt != "0" and not torch.distributed.is_initialized():
        _init_restarted(backend, attempt, timeout)
    if world_size() == 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend, rank=0, world_size=1, timeout=timeout)
        return

    comm.install()  # before DeepSpeed's backend binds torch.distributed's functions
    import deepspeed

    # Adopts an existing process group, or creates one from the environment (env://).
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)


def _subgroups_inherit(timeout: timedelta) -> None:
    """Give every process group created later (ours in ``ParallelDims``, DeepSpeed's data and
    pipeline groups) this timeout: torch's ``new_group`` otherwise takes the backend's default
    (10 minutes for NCCL), not the default group's, so a data-parallel all-reduce could abort
    before the hang watchdog dumps its stacks."""
    import torch.distributed as dist

    inner = dist.new_group
    if getattr(inner, "_seqtrain_timeout", None) is not None:
        inner = inner.__wrapped__

    default = timeout

    @functools.wraps(inner)
    def new_group(ranks=None, timeout=None, *args, **kwargs):
        return inner(ranks, timeout or default, *args, **kwargs)

    new_group._seqtrain_timeout = default
    dist.new_group = new_group


def configure_matmul(tf32: bool, device: torch.device) -> None:
    """TensorFloat-32 for fp32 matmuls and convolutions on GPUs (``train.tf32``); CPUs keep
    torch's default (there "high" may pick reduced-precision oneDNN kernels)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32


def _init_restarted(backend: str, attempt: str, timeout: timedelta) -> None:
    """The process group of workers that torchrun restarted (``--max-restarts``).

    The agent's store outlives the workers and still holds the addresses the dead attempt's
    ranks published; with env:// a restarted rank can read a dead peer's address and fail to
    connect ("Connection refused"). Keys under a per-attempt prefix cannot be stale.
    """
    import torch.distributed as dist

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                          is_master=not agent_store and rank() == 0, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"seqtrain/attempt_{attempt}", store),
                            rank=rank(), world_size=world_size(), timeout=timeout)


def any_rank(flag: bool) -> bool:
    """Collective: whether ``flag`` is true on any rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO on every rank; keep warnings only (and not the
    deprecation notices of torch APIs it calls, which users cannot act on)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def shutdown() -> None:
    """Leave the process group cleanly: every rank waits for the others, then destroys it.

    Exiting with a live gloo group lets its threads be torn down during interpreter exit,
    which can abort a rank ("terminate called without an active exception") after training
    has finished, and turn a finished job into a failed one; ``leave`` is the way out.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def leave(code: int) -> int:
    """Shut the process group down, then end a multi-process rank at once with ``code``.

    Everything is saved and logged by now. Native threads of the distributed stack can still
    abort a rank during interpreter teardown, even after ``shutdown`` ("terminate called
    without an active exception", SIGABRT), which would turn a finished job into a failed one
    for torchrun and Slurm: so a rank of several leaves without teardown. One process returns
    ``code`` and exits normally, with its atexit handlers.
    """
    many = world_size() > 1
    shutdown()
    if many:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
