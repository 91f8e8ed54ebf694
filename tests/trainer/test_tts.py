"""Speech synthesis on the embedded espeak-ng task, through the real trainer: the synthesizer
learns, ``generate --text --wav`` writes the same sound for the same seed, ``eval --recognizer``
scores its sentences and espeak-ng's own readings of them with the recognizer (jiwer), logs its
sounds to MLflow, resume is exact, two data-parallel processes under ZeRO give one process's
losses, and bad input is one line."""

from __future__ import annotations

import json

import jiwer
import pytest

from tests.conftest import (
    REPO,
    assert_resume_is_exact,
    assert_two_processes_match_one,
    read_metrics,
    run_cli,
    sets,
)
from trainer.data import speech

SYNTH = str(REPO / "configs/speech/synthesizer-debug.yaml")
TINY = ["data.num_pairs=300", "model.d_embed=16", "model.d_encoder=16", "model.d_prenet=16", "model.d_decoder=32",
        "model.d_attn=16", "model.mixtures=2", "tracking.enabled=false", "train.log_every=1", "eval.every=0",
        "checkpoint.every=0", "train.micro_batch_size=4", "train.global_batch_size=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, speech_recognizer):
    """A small synthesizer trained a little (tracked), and the recognition tests' recognizer,
    trained on the same sentences (their test split is the same)."""
    root = tmp_path_factory.mktemp("tts")
    uri = f"sqlite:///{root}/mlflow.db"
    run_cli(["train", SYNTH, "--run-dir", str(root / "synth"), *sets(
        *TINY, "data.num_pairs=1500", "model.d_decoder=64", "model.d_encoder=32", "train.steps=120",
        "train.micro_batch_size=16",
        "train.global_batch_size=16", "train.warmup_steps=10", "eval.every=60",
        "checkpoint.every=120", "tracking.enabled=true", f"tracking.uri={uri}")], cache_dir)
    return root / "synth", speech_recognizer, uri


def test_the_synthesizer_learns_and_generate_writes_the_same_sound_for_the_same_seed(runs, cache_dir, tmp_path):
    synth, _, _ = runs
    train, evals = read_metrics(synth)
    assert evals[-1]["val_loss"] < min(0.6 * train[0]["loss"], evals[0]["val_loss"]), (train[0], evals)
    texts = ["the fifth of may, 1987", "june 3, 2002"]
    args = ["generate", str(synth), *(a for t in texts for a in ("--text", t))]
    p = run_cli([*args, "--wav", str(tmp_path / "a.wav")], cache_dir)
    assert [line.split("\t")[2] for line in p.stdout.splitlines()] == texts
    sounds = [speech.read_wav(tmp_path / f"a-{k}.wav", 8000) for k in (1, 2)]
    assert all(0.05 < len(s) / 8000 <= 6.05 for s in sounds)  # between one decoder step and max_seconds
    run_cli([*args, "--wav", str(tmp_path / "b.wav")], cache_dir)
    run_cli([*args, "--wav", str(tmp_path / "c.wav"), "--seed", "1"], cache_dir)
    assert (tmp_path / "a-1.wav").read_bytes() == (tmp_path / "b-1.wav").read_bytes()
    assert (tmp_path / "a-1.wav").read_bytes() != (tmp_path / "c-1.wav").read_bytes()


def test_eval_scores_the_synthesizer_and_espeak_with_the_recognizer(runs, cache_dir):
    synth, rec, uri = runs
    res = json.loads(run_cli(["eval", str(synth), "--recognizer", str(rec), "--split", "test", "--limit", "3",
                              "--json"], cache_dir).stdout)
    texts = [s["text"] for s in res["samples"]]
    assert res["sentences"] == 3 and len(res["audio_files"]) == 3 and res["seconds_ratio"] > 0
    assert res["cer"] == pytest.approx(jiwer.cer(texts, [s["heard"] for s in res["samples"]]))
    assert res["espeak_cer"] == pytest.approx(jiwer.cer(texts, [s["heard_espeak"] for s in res["samples"]]))
    # espeak-ng's side is the recognizer's own test evaluation of the same sentences.
    own = json.loads(run_cli(["eval", str(rec), "--split", "test", "--limit", "3", "--json"], cache_dir).stdout)
    assert [s["reference"] for s in own["samples"]] == texts
    assert (own["cer"], own["wer"]) == pytest.approx((res["espeak_cer"], res["espeak_wer"]))
    for f in res["audio_files"]:
        assert len(speech.read_wav(f, 8000)) > 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (synth / "mlflow_run_id").read_text().strip()
    names = [a.path for a in client.list_artifacts(run_id, "eval/audio")]
    assert len(names) == 3 and all(n.endswith(".wav") for n in names)
    assert client.get_metric_history(run_id, "eval/espeak_cer")


def test_bad_input_is_one_line(runs, cache_dir, tmp_path):
    synth, rec, _ = runs
    for args, says in (
        (["generate", str(synth), "--text", "  ", "--wav", str(tmp_path / "x.wav")], "text 1 ('  ') is empty"),
        (["generate", str(synth), "--text", "hello"], "needs both --text"),
        (["generate", str(synth)], 'is a tts model: give --text "what to say" --wav OUT.wav'),
        (["eval", str(synth / "checkpoints/step_00000120")], "give --recognizer REC_RUN"),
        (["eval", str(rec / "checkpoints/step_00000300"), "--recognizer", str(rec)], "--recognizer goes with"),
        (["eval", str(synth / "checkpoints/step_00000120"), "--recognizer", str(synth)],
         "is a tts model of token sources, not a speech recognizer"),
    ):
        p = run_cli(args, cache_dir, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert says in p.stderr, p.stderr
    assert not (tmp_path / "x.wav").exists()


def test_synthesizer_resumes_exactly(cache_dir, tmp_path):
    """The prenet's dropout draws on in synthesis too: the generator's state is in the checkpoint."""
    assert_resume_is_exact(SYNTH, [*TINY, "train.steps=6"], 3, 6, cache_dir, tmp_path)


@pytest.mark.distributed
def test_two_processes_under_zero_match_one(cache_dir, tmp_path):
    assert_two_processes_match_one(SYNTH, [*TINY, "train.steps=4", "parallel.zero_stage=1", "model.dropout=0.0",
                                           "model.prenet_dropout=0.0"], 4, cache_dir, tmp_path)
