"""One collective timeout for every process group, above the hang watchdog's; TF32 on GPUs."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.conftest import REPO
from trainer import distributed
from trainer.config import load_config
from trainer.errors import ConfigError

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_the_default_timeout_outlasts_the_hang_watchdog():
    assert load_config(PRESET, []).collective_timeout_s() == 2400.0  # 1800 + 10 minutes
    assert load_config(PRESET, ["train.hang_timeout_s=60"]).collective_timeout_s() == 1800.0
    assert load_config(PRESET, ["parallel.collective_timeout_s=7200"]).collective_timeout_s() == 7200.0
    cfg = load_config(PRESET, ["parallel.collective_timeout_s=600"])
    with pytest.raises(ConfigError, match=r"parallel.collective_timeout_s=600 is not above train.hang_timeout_s=1800"):
        cfg.resolve(1)


def test_later_groups_inherit_the_timeout(monkeypatch):
    """torch's ``new_group`` would take the backend's default (NCCL: 10 minutes); DeepSpeed's
    groups and ours get the run's."""
    seen = []
    monkeypatch.setattr(dist, "new_group", lambda ranks=None, timeout=None, *a, **k: seen.append(timeout))
    distributed._subgroups_inherit(timedelta(seconds=2400))
    distributed._subgroups_inherit(timedelta(seconds=3000))  # a restart in the same process: rewraps once
    dist.new_group(ranks=[0, 1])
    dist.new_group([0], timedelta(seconds=5))
    assert seen == [timedelta(seconds=3000), timedelta(seconds=5)]


def test_tf32_is_set_for_gpus_only():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        distributed.configure_matmul(True, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before[0]
        distributed.configure_matmul(True, torch.device("cuda", 0))  # flags only: no GPU needed
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        distributed.configure_matmul(False, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
