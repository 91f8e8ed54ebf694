"""What we hand DeepSpeed: fp32 gradient accumulation under bf16, bucket and overlap keys."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from trainer.config import load_config
from trainer.engine.initialize import deepspeed_config
from trainer.errors import ConfigError

PRESET = str(REPO / "configs/gpt/debug.yaml")
BATCH = ["train.micro_batch_size=2", "train.global_batch_size=8"]


def _ds(*sets: str, world: int = 1) -> dict:
    return deepspeed_config(load_config(PRESET, [*BATCH, *sets]).resolve(world))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bf16_accumulates_in_fp32_under_every_zero_stage(zero):
    ds = _ds("train.precision=bf16", f"parallel.zero_stage={zero}")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"] == {"enabled": True}
    assert _ds("train.precision=bf16", f"parallel.zero_stage={zero}",
               "train.grad_accum_dtype=bf16")["data_types"] == {"grad_accum_dtype": "bf16"}
    assert "data_types" not in _ds(f"parallel.zero_stage={zero}")  # fp32 runs: nothing to say


def test_bf16_without_zero_refuses_to_accumulate_in_bf16_unasked():
    """DeepSpeed refuses fp32 accumulation for bf16 weights without ZeRO ("unsupported mix"):
    four micro-batches there would silently accumulate in bf16."""
    cfg = load_config(PRESET, [*BATCH, "train.precision=bf16"])
    with pytest.raises(ConfigError, match=r"train.precision=bf16 with parallel.zero_stage=0 and 4 micro-batches "
                                          r"per step: .*set parallel.zero_stage=1 .* or train.grad_accum_dtype=bf16"):
        cfg.resolve(1)
    assert "data_types" not in _ds("train.precision=bf16", "train.global_batch_size=2")  # one micro-batch
    assert _ds("train.precision=bf16", "train.grad_accum_dtype=bf16")["data_types"]["grad_accum_dtype"] == "bf16"


def test_zero_buckets_and_overlap():
    z = _ds("parallel.zero_stage=2", "model.d_model=2048", "model.n_head=16")["zero_optimization"]
    assert z == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                 "reduce_bucket_size": 2048**2, "allgather_bucket_size": 2048**2}
    z3 = _ds("parallel.zero_stage=3", "parallel.zero_bucket_elements=1001", "parallel.zero_overlap_comm=false")
    assert z3["zero_optimization"] == {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                       "reduce_bucket_size": 1002, "stage3_prefetch_bucket_size": 901}
    assert _ds()["zero_optimization"] == {"stage": 0}
    assert _ds("parallel.zero_stage=1")["zero_optimization"]["reduce_bucket_size"] == 2**20  # tiny model: the floor
