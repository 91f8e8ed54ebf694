"""A save that runs out of disk: nothing half-written stays, ``latest`` keeps the last good
checkpoint, one line says where, how much a checkpoint needs and how much is free; the run
stops with exit code 4, or trains on with ``checkpoint.on_error=continue``. On a real full
disk: a small tmpfs (the harness is root)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.checkpoint import verify

PRESET = str(REPO / "configs/gpt/debug.yaml")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    # Room for the run directory and two checkpoints of the tiny GPT (about 0.5 MB each), not three.
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {p.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _train(run, corpus, cache_dir, *extra):
    args = [*TINY, f"data.source={corpus}", "train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=null", *extra]
    return run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir, check=False)


def _last_good(run):
    ckpts = run / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert verify(ckpts / latest) is None
    assert not any((ckpts / ".tmp").iterdir())  # the failed save left nothing behind
    return int(latest.removeprefix("step_"))


def test_full_disk_stops_the_run_with_exit_code_4_and_the_last_good_checkpoint(small_disk, tiny_corpus, cache_dir):
    run = small_disk / "run"
    p = _train(run, tiny_corpus, cache_dir)
    assert p.returncode == 4, p.stderr[-3000:]
    good = _last_good(run)
    assert 1 <= good < 6
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"seqtrain: error: could not save step_{good + 1:08d} in {run / 'checkpoints'}")
    assert "a checkpoint needs about" in line and "MB are free there" in line
    assert line.endswith(f"latest stays step_{good:08d}")
    rows, _ = read_metrics(run)
    assert rows[-1]["step"] == good + 1  # stopped at the step whose save failed


def test_full_disk_with_on_error_continue_trains_to_the_end(small_disk, tiny_corpus, cache_dir):
    run = small_disk / "run"
    p = _train(run, tiny_corpus, cache_dir, "checkpoint.on_error=continue")
    assert p.returncode == 0, p.stderr[-3000:]
    good = _last_good(run)
    assert good < 6
    rows, _ = read_metrics(run)
    assert rows[-1]["step"] == 6
    # Every later save failed, and the end of the run tried the last step once more.
    assert p.stdout.count("training goes on (checkpoint.on_error=continue)") == 6 - good + 1


def test_full_disk_under_async_saves_stops_when_the_failed_write_is_waited_for(small_disk, tiny_corpus, cache_dir):
    """``checkpoint.async``: the write fails behind training; the next save (or the end) waits
    for it and stops the run the same way."""
    run = small_disk / "run"
    p = _train(run, tiny_corpus, cache_dir, "checkpoint.async=true")
    assert p.returncode == 4, p.stderr[-3000:]
    good = _last_good(run)
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"seqtrain: error: could not save step_{good + 1:08d} in {run / 'checkpoints'}")
    assert line.endswith(f"latest stays step_{good:08d}")
    rows, _ = read_metrics(run)
    assert rows[-1]["step"] == min(good + 2, 6)  # found when the next save was due
