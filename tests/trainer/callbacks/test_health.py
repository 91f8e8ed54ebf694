"""Loss spikes: the detector's rule by hand, and a bad batch undone by a rewind that skips it,
ending with the loss of a run that never read it (with a crash after the rewind, too)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.callbacks.health import SpikeDetector

PRESET = str(REPO / "configs/gpt/debug.yaml")
SPIKES = ["train.steps=40", "train.log_every=5", "checkpoint.every=5", "train.spike_window=10",
          "train.spike_factor=6", "train.spike_steps=3", "checkpoint.keep_last=3"]


def test_a_run_of_high_losses_is_a_spike_once_and_a_shorter_one_is_not():
    """Window 5 of losses 1.0 ± 0.01: median 1.0, MAD 0.01, threshold 1 + 4 × 1.4826 × 0.01.
    Steps 7-8 are high but only two in a row; steps 11-14 are a spike."""
    losses = [1.0, 1.01, 0.99, 1.0, 1.01, 0.99] + [1.2, 1.3, 1.01, 0.99] + [1.2, 1.3, 1.25, 1.4] + [1.0]
    pairs = list(enumerate(losses, start=1))
    spikes = SpikeDetector(window=5, factor=4.0, steps=3).feed(pairs)
    assert [(s.first, s.last, s.peak) for s in spikes] == [(11, 14, 1.4)]
    assert spikes[0].median == 1.0 and spikes[0].threshold == pytest.approx(1.0 + 4 * 1.4826 * 0.01)
    # Read in two pieces (a logging cadence): reported as far as read, once.
    d = SpikeDetector(window=5, factor=4.0, steps=3)
    assert [(s.first, s.last) for s in d.feed(pairs[:13])] == [(11, 13)] and d.feed(pairs[13:]) == []
    # A flat loss: the spread's floor (0.1 % of the median) keeps a wobble from being a spike.
    flat = SpikeDetector(window=5, factor=6.0, steps=1)
    assert flat.feed(list(enumerate([2.0] * 6 + [2.01, 2.011], start=1))) == []
    assert [s.first for s in flat.feed([(9, 2.1)])] == [9]


def _final(run_dir) -> dict:
    rows, _ = read_metrics(run_dir)
    return rows[-1]


def test_a_bad_batch_is_rewound_and_skipped_and_the_run_ends_as_if_it_never_read_it(tiny_corpus, cache_dir, tmp_path):
    args = [*TINY, f"data.source={tiny_corpus}", *SPIKES]
    bad = {"SEQTRAIN_FAULT": "spike@19-21"}
    logged, rewound, crashed, clean = (tmp_path / n for n in ("logged", "rewound", "crashed", "clean"))

    p = run_cli(["train", PRESET, "--run-dir", str(logged), *sets(*args)], cache_dir, env=bad)
    assert "loss spike at steps 19-21" in p.stdout and "rewinding" not in p.stdout
    p = run_cli(["train", PRESET, "--run-dir", str(rewound), *sets(*args, "train.on_spike=rewind")], cache_dir, env=bad)
    assert "loss spike at steps 19-21" in p.stdout and "rewinding to step 15" in p.stdout
    (record,) = [json.loads(line) for line in (rewound / "spikes.jsonl").read_text().splitlines()]
    assert record["rewound_to"] == 15 and record["skipped_data_steps"] == [[19, 21]]
    assert (rewound / "checkpoints/set_aside/step_00000020").is_dir()  # the spiked weights are kept aside
    rows = [json.loads(line) for line in (rewound / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["spike_rewound_to"]) for r in rows if "spike_first_step" in r] == [(25, 15)]

    # The run that never read data steps 19-21.
    run_cli(["train", PRESET, "--run-dir", str(clean), *sets(*args, "train.skip_data_steps=[[19,21]]")], cache_dir)
    # A crash after the rewind: the resumed run replays the skip from spikes.jsonl.
    run_cli(["train", PRESET, "--run-dir", str(crashed), *sets(*args, "train.on_spike=rewind")], cache_dir,
            env={"SEQTRAIN_FAULT": "spike@19-21,kill@32"}, check=False)
    p = run_cli(["train", PRESET, "--run-dir", str(crashed), *sets(*args, "train.on_spike=rewind")], cache_dir,
                env=bad)
    assert "resumed from" in p.stdout and "at step 30" in p.stdout and "loss spike" not in p.stdout

    end = {name: _final(d) for name, d in (("logged", logged), ("rewound", rewound), ("crashed", crashed),
                                           ("clean", clean))}
    assert all(r["step"] == 40 for r in end.values())
    assert end["rewound"]["loss"] == end["clean"]["loss"] == end["crashed"]["loss"]  # bitwise on CPU fp32
    assert end["logged"]["loss"] != end["clean"]["loss"]


def test_a_resumed_run_sees_the_spike_the_uninterrupted_one_sees(tiny_corpus, cache_dir, tmp_path):
    """Killed at step 17 and resumed from step 15: with a window of 10 normal losses, a detector
    that started afresh could not judge steps 19-21. The checkpoint carries its window and the
    losses of steps 13-15 not yet read (rows every 4 steps, saves every 5): the resumed run
    reports the same spike, with the same median and threshold."""
    args = [*TINY, f"data.source={tiny_corpus}", *SPIKES, "train.log_every=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    bad = {"SEQTRAIN_FAULT": "spike@19-21"}
    run_cli(["train", PRESET, "--run-dir", str(straight), *sets(*args)], cache_dir, env=bad)
    run_cli(["train", PRESET, "--run-dir", str(resumed), *sets(*args)], cache_dir,
            env={"SEQTRAIN_FAULT": "spike@19-21,kill@17"}, check=False)
    p = run_cli(["train", PRESET, "--run-dir", str(resumed), *sets(*args)], cache_dir, env=bad)
    assert "at step 15" in p.stdout and "loss spike at steps 19-21" in p.stdout, p.stdout[-2000:]
    records = [(d / "spikes.jsonl").read_text().splitlines() for d in (straight, resumed)]
    assert records[0] == records[1] and len(records[0]) == 1


@pytest.mark.parametrize("settings,needle", [
    (["train.spike_window=40"], "no spike could ever be seen"),
    (["train.on_spike=rewind", "train.spike_window=10"], "needs checkpoints to rewind to"),
    (["train.skip_data_steps=[[5,3]]"], "1 ≤ first ≤ last"),
])
def test_spike_settings_that_cannot_act_are_one_line(settings, needle, tiny_corpus, cache_dir, tmp_path):
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=40", *settings]
    p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "r"), *sets(*args)], cache_dir, check=False)
    assert p.returncode == 2 and needle in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def test_rewind_refuses_a_keep_last_that_could_prune_its_checkpoint(tiny_corpus, cache_dir, tmp_path):
    args = [*TINY, f"data.source={tiny_corpus}", *SPIKES, "train.on_spike=rewind", "checkpoint.keep_last=2"]
    p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "r"), *sets(*args)], cache_dir, check=False)
    assert p.returncode == 2 and "keep at least 3" in p.stderr.strip().splitlines()[-1]


def test_a_run_that_spikes_after_its_last_allowed_rewind_stops_as_diverged(tiny_corpus, cache_dir, tmp_path):
    args = [*TINY, f"data.source={tiny_corpus}", *SPIKES, "train.on_spike=rewind", "train.spike_max_rewinds=1"]
    p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "r"), *sets(*args)], cache_dir, check=False,
                env={"SEQTRAIN_FAULT": "spike@19-21,spike@29-31"})
    assert p.returncode == 3 and "rewinding to step 15" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert "after 1 rewinds (train.spike_max_rewinds)" in p.stdout + p.stderr
    assert json.loads((tmp_path / "r/finished.json").read_text())["step"] == 30  # data steps 29-31 are loop steps 26-28 after skipping 19-21


@pytest.mark.distributed
def test_two_ranks_rewind_together_and_end_as_the_run_that_skipped(tiny_corpus, cache_dir, tmp_path):
    """dp2 under ZeRO 1 (DeepSpeed's engine and checkpoints): the bad batch is on rank 1 only; both
    ranks see the same reduced losses, rewind together and end with the loss of the run that
    skipped those data steps."""
    args = [*TINY, f"data.source={tiny_corpus}", *SPIKES, "train.steps=30", "parallel.zero_stage=1",
            "train.global_batch_size=8"]
    rewound, clean = tmp_path / "rewound", tmp_path / "clean"
    p = run_cli(["train", PRESET, "--run-dir", str(rewound), *sets(*args, "train.on_spike=rewind")], cache_dir,
                nproc=2, env={"SEQTRAIN_FAULT": "spike@19-21:r1"})
    assert "rewinding to step 15 and skipping data steps [(19, 21)]" in p.stdout
    run_cli(["train", PRESET, "--run-dir", str(clean), *sets(*args, "train.skip_data_steps=[[19,21]]")], cache_dir,
            nproc=2)
    assert _final(rewound)["step"] == 30 and _final(rewound)["loss"] == _final(clean)["loss"]
