"""A shared checkpoint must not run code on the machine that opens it: every command that reads
one refuses a pickle that imports anything beyond tensors, numbers and the few classes
checkpoints hold, in one line, without running it."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import REPO, TINY, run_cli, sets
from trainer.checkpoint import write_manifest

PRESET = str(REPO / "configs/gpt/debug.yaml")


class _RunsACommand:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory, cache_dir):
    """A one-process ZeRO-1 run: model states, ZeRO optimizer shards and a manifest."""
    root = tmp_path_factory.mktemp("hostile")
    from tests.conftest import make_corpus

    corpus = make_corpus(root / "corpus")
    run = root / "run"
    run_cli(["train", PRESET, "--run-dir", str(run),
             *sets(*TINY, f"data.source={corpus}", "train.steps=2", "parallel.zero_stage=1")], cache_dir)
    return root, run


def _poison(ckpt, name: str, marker) -> None:
    torch.save({"module": _RunsACommand(marker)}, ckpt / name)
    write_manifest(ckpt, 2, {"tokenizer_sha256": None})  # intact by its manifest: only the pickle is bad


MODEL, OPTIM = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize("poisoned, readers", [
    # Our own loads (weights_only): weights for inference, evaluation, export and init_from.
    (MODEL, ["generate", "export", "init_from"]),
    # Files only DeepSpeed's loaders open: checked before they unpickle them.
    (OPTIM, ["resume", "eval"]),
])
def test_every_reader_refuses_a_pickle_that_would_run_code(zero1_run, cache_dir, tmp_path, poisoned, readers):
    import shutil

    root, clean = zero1_run
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    ckpt = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "code-ran"
    _poison(ckpt, poisoned, marker)
    data = [*TINY, f"data.source={root / 'corpus'}"]
    commands = {
        "resume": ["train", PRESET, "--run-dir", str(run), *sets(*data, "train.steps=3", "parallel.zero_stage=1")],
        "init_from": ["train", PRESET, "--run-dir", str(tmp_path / "new"),
                      *sets(*data, "train.steps=1", f"train.init_from={run}")],
        "generate": ["generate", str(run), "--max-new-tokens", "4"],
        "eval": ["eval", str(ckpt), "--max-tokens", "500"],
        "export": ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")],
    }
    for what in readers:
        p = run_cli(commands[what], cache_dir, check=False)
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        assert p.returncode == 2, f"{what}: exit {p.returncode}\n{p.stderr[-2000:]}"
        assert "refused: the file would import posix.system" in last and poisoned in last, f"{what}: {last}"
        assert not marker.exists(), f"{what} ran the pickle's command"
