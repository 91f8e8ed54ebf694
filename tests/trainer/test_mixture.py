"""Weighted mixtures (``data.mixture``): the apportionment against its one-sample-at-a-time
definition, proportions over 1,000 steps, the same sequences in every layout, each source's
epochs, resume with kept and with changed weights, per-source metrics, and bad input."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, TINY, make_corpus, read_metrics, run_cli, sets
from trainer.config import ConfigError, DataConfig, load_config
from trainer.data.mixture import MixtureBatches, apportion, exact_weights, prepare_mixture
from trainer.data.sampler import WindowDataset
from trainer.errors import DataError

GPT = str(REPO / "configs/gpt/debug.yaml")
SEQ = 4
SIZES = {"a": 4001, "b": 1201, "c": 2401}  # tokens: 1000, 300 and 600 windows of 4


def sainte_lague(weights: list[Fraction], total: int) -> list[int]:
    """The definition: give samples one at a time to the largest w_k / (2 n_k + 1)."""
    c = [0] * len(weights)
    for _ in range(total):
        k = max(range(len(c)), key=lambda k: (weights[k] / (2 * c[k] + 1), -k))
        c[k] += 1
    return c


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.3], [0.5, 0.3, 0.2], [1, 2, 3, 4, 0],
                                     [0.01, 0.99], [1 / 3, 1 / 3, 1 / 3],
                                     [round(random.Random(3).random(), 3) for _ in range(7)]])
def test_apportionment_is_the_sequential_definition_and_never_takes_back(weights):
    w = exact_weights(weights)
    ref = [0] * len(w)
    for total in range(0, 300):
        got = apportion(w, total)
        assert got == sainte_lague(w, total)
        assert all(g >= r for g, r in zip(got, ref, strict=True))  # nested: a batch never negative
        ref = got


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, WindowDataset]:
    """Three sources whose tokens say where they come from and which window they are in:
    10000 × source + window (a: 0.., b: 10000.., c: 20000..)."""
    root = tmp_path_factory.mktemp("mixture")
    out = {}
    for i, (name, n) in enumerate(SIZES.items()):
        path = root / f"{name}.bin"
        (10000 * i + np.arange(n) // SEQ).astype(np.uint16).tofile(path)
        out[name] = WindowDataset(path, np.dtype(np.uint16), SEQ)
    return out


def _batches(sources, weights, micro=3, accum=2, dp=2, seed=7, say=lambda _: None) -> MixtureBatches:
    return MixtureBatches({n: (w, sources[n]) for n, w in weights.items()}, micro, accum, dp, seed, say=say)


def _step_rows(b: MixtureBatches, step: int, accum: int, dp: int) -> np.ndarray:
    """Every row of a step, in slot order ((micro-step × dp + rank) × micro + i)."""
    return np.concatenate([b.micro_batch(step, m, r)["input_ids"].numpy() for m in range(accum) for r in range(dp)])


def test_every_batch_draws_the_weights_share_and_1000_steps_match_the_weights(sources):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    said: list[str] = []
    b = _batches(sources, weights, say=said.append)
    G, steps = 12, 1000
    seen = {n: [] for n in weights}
    per_step = []
    for s in range(steps):
        rows = _step_rows(b, s, 2, 2)
        assert rows.shape == (G, SEQ)
        names = [("a", "b", "c")[v // 10000] for v in rows[:, 0]]
        per_step.append([names.count(n) for n in weights])
        for n, first in zip(names, rows[:, 0], strict=True):
            seen[n].append(first % 10000)
    per_step = np.array(per_step)
    quota = np.array(list(weights.values())) * G
    # Each batch: the quota rounded down or up (6; 3 or 4; 2 or 3 of 12).
    assert (np.abs(per_step - quota) < 1).all(), per_step[np.abs(per_step - quota) >= 1]
    # Cumulatively: within one sample of the weights at every step.
    drift = np.abs(np.cumsum(per_step, axis=0) - np.outer(np.arange(1, steps + 1), quota))
    assert drift.max() < 1
    measured = per_step.sum(0) / (G * steps)
    print("proportions over 1000 steps:", dict(zip(weights, measured.round(5), strict=True)))
    np.testing.assert_allclose(measured, list(weights.values()), atol=1 / (G * steps))
    # Each source's first epoch visits each of its windows once (a step's slots are shuffled, so
    # the step where it runs out also holds a few windows of the second epoch, in a new order).
    for n, ws in seen.items():
        n_windows, per_source = len(sources[n]), per_step[:, list(weights).index(n)]
        boundary = int(np.searchsorted(np.cumsum(per_source), n_windows))  # the step it runs out
        before, upto = int(per_source[:boundary].sum()), int(per_source[: boundary + 1].sum())
        assert len(set(ws[:before])) == before, n
        assert set(ws[:upto]) == set(range(n_windows)) and len(ws[:upto]) - n_windows == upto - n_windows, n
        assert ws[:before] != ws[upto: upto + before]
    assert b.metrics(steps)["epoch/b"] == pytest.approx(seen_b := len(seen["b"]) / 300) and seen_b > 11
    assert f"data.mixture source 'b' ran out by step {steps}: epoch 13 reads its windows again, in a new order" in said


@pytest.mark.parametrize("layout", [(3, 4, 1), (3, 1, 4), (6, 2, 1), (1, 6, 2)])
def test_every_layout_with_the_same_global_batch_reads_the_same_sequences(sources, layout):
    micro, accum, dp = layout
    weights = {"a": 0.6, "c": 0.4}
    ref, got = _batches(sources, weights, 3, 2, 2), _batches(sources, weights, micro, accum, dp)
    for s in (0, 1, 57, 400):
        np.testing.assert_array_equal(_step_rows(got, s, accum, dp), _step_rows(ref, s, 2, 2))


def test_resume_keeps_the_segments_and_a_change_of_weights_applies_from_its_step(sources):
    old, new = {"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.3, "c": 0.5}
    first = _batches(sources, old)
    state = first.schedule_state()
    kept = _batches(sources, old)
    kept.load_schedule_state(state, 50, allow_change=False)
    assert all(kept.slots(s) == first.slots(s) for s in (0, 49, 50, 300))

    changed = _batches(sources, new)
    with pytest.raises(DataError, match="data.allow_mixture_change=true"):
        changed.load_schedule_state(state, 50, allow_change=False)
    changed.load_schedule_state(state, 50, allow_change=True)
    at = first.counts(50)
    assert changed.counts(50) == {**at, "c": 0}
    assert [s for s in (0, 10, 49) if changed.slots(s) != first.slots(s)] == []
    for t in (1, 7, 100):
        grown = changed.counts(50 + t)
        drawn = [grown[n] - at.get(n, 0) for n in new]
        assert drawn == sainte_lague(exact_weights(list(new.values())), 12 * t)

    # A later resume repeats the decision without being asked again; a new global batch
    # (another layout's) continues from the counts where it resumes.
    again = _batches(sources, new)
    again.load_schedule_state(changed.schedule_state(), 80, allow_change=False)
    assert all(again.slots(s) == changed.slots(s) for s in (20, 60, 80, 200))
    wider = _batches(sources, new, micro=3, accum=2, dp=4)
    wider.load_schedule_state(changed.schedule_state(), 80, allow_change=False)
    assert wider.counts(80) == changed.counts(80)
    assert sum(wider.counts(81).values()) - sum(changed.counts(80).values()) == 24


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    a = make_corpus(root / "a", 40, seed=0)
    b, rng = root / "b", random.Random(1)
    b.mkdir()
    for d in range(30):
        lines = (" ".join(rng.choice(["one", "two", "three", "four"]) for _ in range(8)) for _ in range(30))
        (b / f"b{d}.txt").write_text("\n".join(lines) + "\n")
    return a, b


def _mixture(a, b, wa=0.7, wb=0.3) -> str:
    return f"data.mixture=[{{source: {a}, weight: {wa}, name: a}}, {{source: {b}, weight: {wb}, name: b}}]"


def test_a_mixture_run_logs_tokens_and_validation_per_source_and_refuses_new_weights_on_resume(
        two_corpora, cache_dir, tmp_path):
    a, b = two_corpora
    run = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*TINY, _mixture(a, b), "train.steps=6", "train.global_batch_size=4", "eval.every=3",
            "checkpoint.every=3", "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=mix"]
    run_cli(["train", GPT, "--run-dir", str(run), *sets(*args)], cache_dir)
    rows, evals = read_metrics(run)
    import mlflow

    client = mlflow.MlflowClient(uri)
    run_id = (run / "mlflow_run_id").read_text()
    for key, logged in (("tokens/a", rows), ("val_loss/b", evals)):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert history == [(r["step"], pytest.approx(r[key])) for r in logged], key
    for r in rows:  # global batch 4: the 0.7/0.3 Sainte-Laguë split of 4 samples per step
        assert r["tokens/a"] + r["tokens/b"] == r["step"] * 4 * 32
        assert abs(r["tokens/a"] / 32 - 0.7 * 4 * r["step"]) < 1
    for e in evals:
        assert e["val_loss"] == pytest.approx(0.7 * e["val_loss/a"] + 0.3 * e["val_loss/b"], rel=1e-12)
        assert e["val_loss/a"] != e["val_loss/b"]

    longer = [*args, "train.steps=8"]
    p = run_cli(["train", GPT, "--run-dir", str(run), *sets(*longer, _mixture(a, b, 0.5, 0.5))], cache_dir,
                check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("seqtrain: error: resuming at data step 7 with data.mixture "
                                                        "weights {'a': 0.5, 'b': 0.5} where the checkpoint has")
    p = run_cli(["train", GPT, "--run-dir", str(run),
                 *sets(*longer, _mixture(a, b, 0.5, 0.5), "data.allow_mixture_change=true")], cache_dir)
    assert "data.mixture changes from data step 7" in p.stdout
    rows, _ = read_metrics(run)
    last = rows[-1]
    assert last["step"] == 8 and last["tokens/a"] == rows[5]["tokens/a"] + 4 * 32  # 2 of 4 per step


def test_new_weights_on_resume_start_at_the_data_step_after_skipped_ones(two_corpora, cache_dir, tmp_path):
    """Data steps 2-3 skipped: loop step 6 has read data steps up to 8, so new weights apply from
    data step 9 on; each source goes on from its own count (the sources' tokens grow by the new
    split, no window read twice)."""
    a, b = two_corpora
    run = tmp_path / "run"
    args = [*TINY, "train.steps=6", "train.global_batch_size=4", "checkpoint.every=3", "train.skip_data_steps=[[2,3]]"]
    run_cli(["train", GPT, "--run-dir", str(run), *sets(*args, _mixture(a, b))], cache_dir)
    p = run_cli(["train", GPT, "--run-dir", str(run), *sets(*args, "train.steps=8", _mixture(a, b, 0.5, 0.5),
                                                             "data.allow_mixture_change=true")], cache_dir)
    assert "data.mixture changes from data step 9" in p.stdout, p.stdout[-2000:]
    rows, _ = read_metrics(run)
    assert [r["step"] for r in rows][-3:] == [6, 7, 8]
    assert rows[-3]["tokens/a"] + rows[-3]["tokens/b"] == 8 * 4 * 32  # counted by data step: skipped ones too
    for before, after in zip(rows[-3:-1], rows[-2:], strict=True):  # 2 of 4 samples per step from each source
        assert after["tokens/a"] - before["tokens/a"] == after["tokens/b"] - before["tokens/b"] == 2 * 32


def test_eval_and_prepare_report_each_source(two_corpora, cache_dir, tmp_path):
    a, b = two_corpora
    run = tmp_path / "run"
    args = [*TINY, _mixture(a, b), "train.steps=2", "checkpoint.every=2"]
    run_cli(["train", GPT, "--run-dir", str(run), *sets(*args)], cache_dir)
    p = run_cli(["data", "prepare", GPT, *sets(*args)], cache_dir)
    assert "a (weight 0.7): " in p.stdout and "b (weight 0.3): " in p.stdout
    run_cli(["eval", str(run)], cache_dir)
    row = yaml.safe_load((run / "eval/results.jsonl").read_text().splitlines()[-1])
    assert row["loss"] == pytest.approx(0.7 * row["loss/a"] + 0.3 * row["loss/b"], rel=1e-12)


def test_mixture_bad_input_is_one_line(two_corpora, cache_dir, tmp_path):
    a, b = two_corpora
    bad = {
        f"data.mixture=[{{source: {a}, weight: -1}}]": "data.mixture.0.weight = -1",
        f"data.mixture=[{{source: {a}, weight: 0}}, {{source: {b}, weight: 0}}]": "weights are all zero",
        f"data.mixture=[{{source: {a}, weight: 1, name: x}}, {{source: {b}, weight: 1, name: x}}]": "names 'x' twice",
        "data.mixture=[]": "data.mixture is empty",
    }
    for setting, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(GPT, [setting])
    with pytest.raises(ConfigError, match="data.mixture is for language models"):
        load_config(GPT, [f"data.mixture=[{{source: {a}, weight: 1}}]", "data.sampling=random"])

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.txt").write_text("")
    cfg = DataConfig(mixture=[{"source": str(a), "weight": 1}, {"source": str(empty), "weight": 1, "name": "e"}],
                     cache_dir=str(cache_dir), tokenizer={"vocab_size": 300})
    with pytest.raises(DataError, match=r"^data.mixture source 'e': .*corpus is empty"):
        prepare_mixture(cfg, log=lambda _: None)

    # Two pre-tokenized sources made by different tokenizers cannot share an embedding.
    toks = []
    for corpus in (a, b):
        prep = prepare_mixture(DataConfig(mixture=[{"source": str(corpus), "weight": 1}], cache_dir=str(cache_dir),
                                          tokenizer={"vocab_size": 300}), log=lambda _: None)[0][1]
        toks.append(prep.dir / "tokenizer.json")
    cfg = DataConfig(mixture=[{"source": str(a), "weight": 1, "tokenizer": str(toks[0])},
                              {"source": str(b), "weight": 1, "name": "b", "tokenizer": str(toks[1])}],
                     cache_dir=str(cache_dir))
    with pytest.raises(DataError, match="data.mixture source 'b' .* differs from data.mixture source"):
        prepare_mixture(cfg, log=lambda _: None)
    p = run_cli(["train", GPT, "--run-dir", str(tmp_path / "r"),
                 *sets(*TINY, f"data.mixture=[{{source: {a}, weight: 1}}, {{source: {tmp_path}/nope, weight: 1}}]")],
                cache_dir, check=False)
    slug = str(tmp_path / "nope").strip("/").replace("/", "_")  # the default name: metric-safe
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"seqtrain: error: data.mixture source '{slug}': data.source='{tmp_path}/nope': no such file, "
        "folder or glob match (use 'stdlib' for the embedded corpus, or 'hf:NAME' for a datasets name)"]
