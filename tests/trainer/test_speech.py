"""Speech recognition on the embedded espeak-ng task, through the real trainer: the readings are
espeak-ng's own (deterministic, the test voice held out, speed and rate where they should be),
the recognizer's transcripts from ``generate --audio`` are what ``eval`` scores with jiwer,
resume is exact, two data-parallel processes under ZeRO give one process's losses, and bad
sound files are one line."""

from __future__ import annotations

import json
import re
import wave

import jiwer
import numpy as np
import pytest

from tests.conftest import (
    REPO,
    assert_resume_is_exact,
    assert_two_processes_match_one,
    read_metrics,
    run_cli,
)
from trainer.config import DataConfig
from trainer.data import speech
from trainer.errors import DataError
from trainer.evaluation.metrics import error_rates

TRANSFORMER = str(REPO / "configs/speech/recognizer-debug.yaml")
GRU = str(REPO / "configs/speech/gru-attn-recognizer-debug.yaml")
TINY = ["data.num_pairs=300", "model.source.conv_channels=[16,16]", "model.source.n_mels=16",
        "tracking.enabled=false", "train.log_every=1", "eval.every=0", "checkpoint.every=0",
        "train.micro_batch_size=4", "train.global_batch_size=8", "eval.decode_samples=8"]
TINY_TRANSFORMER = [*TINY, "model.d_model=32", "model.n_enc_layers=1", "model.n_dec_layers=1"]
TINY_GRU = [*TINY, "model.d_hidden=24", "model.d_embed=16", "model.d_attn=16", "model.n_layers=1"]


def test_readings_are_espeaks_own_with_the_test_voice_held_out(tmp_path):
    cfg = DataConfig(source="speech", num_pairs=300, cache_dir=str(tmp_path))
    splits = speech.read_splits(cfg, seed=4, sample_rate=8000, log=lambda _: None)
    voices = {k: {speech.reading(4, k, i).voice for i in range(len(v))} for k, v in splits.items()}
    assert voices["test"] == {speech.TEST_VOICE} and speech.TEST_VOICE not in voices["train"] | voices["val"]
    assert len(voices["train"]) > 30
    assert not set(splits["train"].texts) & set(splits["test"].texts)
    # The cache holds what espeak-ng says now (int16 of the resampled reading).
    r = speech.reading(4, "val", 2)
    fresh = speech.speak(splits["val"].texts[2], r.voice, r.speed, r.pitch, 8000)
    np.testing.assert_allclose(splits["val"].sound(2), np.round(np.clip(fresh, -1, 1) * 32767) / 32768, atol=1e-4)
    # Resampling keeps the duration; speaking slower takes longer.
    native = speech.speak("the fifth of may", "en-us", 150, 50, speech.ESPEAK_RATE)
    at_8k = speech.speak("the fifth of may", "en-us", 150, 50, 8000)
    assert len(at_8k) == pytest.approx(len(native) * 8000 / speech.ESPEAK_RATE, abs=2)
    slow = speech.speak("the fifth of may", "en-us", 100, 50, 8000)
    assert 1.3 < len(slow) / len(at_8k) < 1.9  # 150 / 100 words per minute


def test_error_rates_count_edits_over_the_reference():
    m = error_rates(["the fifth of mai", "april 1st"], ["the fifth of may", "april 1st, 2038"])
    # Characters: one substitution, six deletions over 16 + 15 reference characters.
    assert m["cer"] == pytest.approx(7 / 31)
    # Words: one substitution, one deletion (and "1st" against "1st,") over 4 + 3 words.
    assert m["wer"] == pytest.approx(3 / 7) and m["exact_match"] == 0.0


def test_the_recognizer_learns_and_generate_reads_a_wav_as_eval_does(speech_recognizer, cache_dir, tmp_path):
    _, evals = read_metrics(speech_recognizer)
    # The loss falls; transcripts good enough to score need more steps than a test affords
    # (docs/benchmarks.md has the recognizer's error rates).
    assert evals[-1]["val_loss"] < 0.8 * evals[0]["val_loss"], evals
    assert evals[-1]["val_cer"] >= 0 and evals[-1]["val_wer"] >= 0
    res = json.loads(run_cli(["eval", str(speech_recognizer / "checkpoints/step_00000300"), "--split", "test", "--json",
                              "--limit", "3"], cache_dir).stdout)
    refs, hyps = [s["reference"] for s in res["samples"]], [s["output"] for s in res["samples"]]
    assert res["sounds"] == 3 and res["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert res["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    test = speech.read_splits(DataConfig(source="speech", num_pairs=1500, cache_dir=str(tmp_path / "c")),
                              seed=1234, sample_rate=8000, log=lambda _: None)["test"]
    files = [speech.write_wav(tmp_path / f"s{i}.wav", test.sound(i), 8000) for i in range(3)]
    p = run_cli(["generate", str(speech_recognizer), *(a for f in files for a in ("--audio", str(f)))], cache_dir)
    got = [line.split("\t")[1] for line in p.stdout.splitlines()]
    assert got == [s["output"] for s in res["samples"]]


def test_bad_sound_files_are_one_line_naming_the_file(speech_recognizer, cache_dir, tmp_path):
    (tmp_path / "text.wav").write_text("not a sound")
    for name, channels, rate in (("stereo.wav", 2, 8000), ("fast.wav", 1, 16000), ("empty.wav", 1, 8000)):
        with wave.open(str(tmp_path / name), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(b"" if name == "empty.wav" else b"\0\0" * 800 * channels)
    for name, says in (("text.wav", "not a WAV file"), ("stereo.wav", "2 channels; the model reads mono"),
                       ("fast.wav", "16000 Hz; the model reads 8000 Hz"), ("empty.wav", "no samples"),
                       ("none.wav", "no such file")):
        with pytest.raises(DataError, match=re.escape(says)) as e:
            speech.read_wav(tmp_path / name, 8000)
        assert name in str(e.value)
    # Through the CLI: one line, exit code 2.
    p = run_cli(["generate", str(speech_recognizer), "--audio", str(tmp_path / "fast.wav")], cache_dir, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "fast.wav: 16000 Hz; the model reads 8000 Hz" in p.stderr, p.stderr


def test_recognizer_resumes_exactly(cache_dir, tmp_path):
    assert_resume_is_exact(TRANSFORMER, [*TINY_TRANSFORMER, "train.steps=6"], 3, 6, cache_dir, tmp_path)


@pytest.mark.distributed
def test_two_processes_under_zero_match_one(cache_dir, tmp_path):
    """The recurrent recognizer (packed sequences of the convolutions' lengths) under ZeRO-1."""
    assert_two_processes_match_one(GRU, [*TINY_GRU, "train.steps=4", "parallel.zero_stage=1", "model.dropout=0.0"],
                                   4, cache_dir, tmp_path)
