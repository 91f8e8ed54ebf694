"""Resume in another layout, optimizer included: 4 steps in layout A, then 4 in layout B, equal
8 steps straight in one process (fp32, dropout 0) within 2e-5 per step; and the moments each
rank of the new layout holds equal the checkpoint's consolidated ones exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, make_corpus, read_metrics, run_cli, sets
from tests.trainer.parallel.test_layouts import GPT, GPT_ARGS
from trainer.launch import torchrun

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=16", "checkpoint.every=4"]
LAYOUTS = {
    "one": (1, []),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}
DESCRIBED = {"one": "dp 1, tp 1, pp 1, zero 0", "dp2-zero1": "dp 2, tp 1, pp 1, zero 1",
             "dp2-zero2": "dp 2, tp 1, pp 1, zero 2", "dp2-zero3": "dp 2, tp 1, pp 1, zero 3",
             "tp2": "dp 1, tp 2, pp 1, zero 0", "tp2xpp2": "dp 1, tp 2, pp 2, zero 0"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """16 steps in one process: what every chain of layouts must reproduce."""
    root = tmp_path_factory.mktemp("reshard")
    corpus = make_corpus(root / "corpus")
    args = [*GPT_ARGS, f"data.source={corpus}", *STEPS]
    run_cli(["train", GPT, "--run-dir", str(root / "straight"), *sets(*args)], cache_dir)
    rows, _ = read_metrics(root / "straight")
    return args, {r["step"]: r for r in rows}, root / "straight"


def _chain(layouts: list[str], args: list[str], run_dir, cache_dir) -> dict[int, dict]:
    """Segments of 4 steps, each in the next layout, in one run directory."""
    for i, name in enumerate(layouts):
        nproc, extra = LAYOUTS[name]
        stop = {"SEQTRAIN_FAULT": f"usr1@{4 * (i + 1)}"} if i + 1 < len(layouts) else {}
        p = run_cli(["train", GPT, "--run-dir", str(run_dir), *sets(*args, *extra)], cache_dir,
                    nproc=nproc, env=stop)
        if i:
            said = f"resharded step_{4 * i:08d} from {DESCRIBED[layouts[i - 1]]} to {DESCRIBED[name]}"
            assert said in p.stdout, p.stdout[-2000:]
    rows, _ = read_metrics(run_dir)
    return {r["step"]: r for r in rows}


def _assert_same_losses(ref: dict[int, dict], got: dict[int, dict], steps: int) -> float:
    assert sorted(got) == list(range(1, steps + 1))
    worst = 0.0
    for s in range(1, steps + 1):
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
        worst = max(worst, abs(got[s]["loss"] - ref[s]["loss"]))
        assert abs(got[s]["loss"] - ref[s]["loss"]) < 2e-5, (s, ref[s], got[s])
    segments = [max(abs(got[s]["loss"] - ref[s]["loss"]) for s in range(a, min(a + 4, steps + 1)))
                for a in range(1, steps + 1, 4)]
    print(f"max loss difference {worst:.2e}; per 4-step segment: "  # for the record (pytest -s)
          + ", ".join(f"{d:.1e}" for d in segments))
    return worst


def test_one_to_zero2_to_tp2xpp2_to_one(straight, cache_dir, tmp_path):
    args, ref, _ = straight
    got = _chain(["one", "dp2-zero2", "tp2xpp2", "one"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)


def test_zero3_to_tp2_to_zero1(straight, cache_dir, tmp_path):
    args, ref, _ = straight
    got = _chain(["dp2-zero3", "tp2", "dp2-zero1"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)
    # Every rank's resharded master weights and moments equal the consolidated originals.
    ckpt = tmp_path / "run/checkpoints/step_00000016"  # saved under ZeRO-1
    for target in ("dp2-zero3", "dp2-zero2", "tp2xpp2"):
        nproc, extra = LAYOUTS[target]
        launcher = [*torchrun(nproc)] if nproc > 1 else [sys.executable]
        p = subprocess.run([*launcher, str(REPO / "tests/trainer/parallel/reshard_worker.py"), str(ckpt), GPT,
                            *args, *extra], cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("moments and step 16 equal") == nproc, p.stdout


def test_old_checkpoints_without_parameter_names_are_refused_in_one_line(straight, tmp_path):
    """A ZeRO-0 checkpoint saved before its optimizer's parameter names were recorded cannot
    be resharded (its state is by index); it still resumes in its own layout."""
    import shutil

    import torch

    from trainer.checkpoint import saved_config
    from trainer.errors import CheckpointError
    from trainer.parallel import reshard

    src = straight[2] / "checkpoints/step_00000016"
    old = tmp_path / "old"
    shutil.copytree(src, old)
    f = old / "mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=False)
    assert states.pop(reshard.NAMES_KEY) is not None
    torch.save(states, f)
    with pytest.raises(CheckpointError, match="saved before checkpoints named their optimizer's parameters"):
        reshard.read(old, saved_config(old))
