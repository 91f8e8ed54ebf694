"""Text-line recognition (the ``mdrnn`` family: MD-LSTM, 1D BiLSTM baseline) through the real
trainer on rendered lines: it learns, ``eval`` and ``generate`` read images as the recognizer
does, resume is exact, two data-parallel processes give the single-process losses under ZeRO,
and bad input (images, alphabet, height) is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    REPO,
    assert_resume_is_exact,
    assert_two_processes_match_one,
    read_metrics,
    run_cli,
    sets,
)
from trainer.config import DataConfig
from trainer.data import textlines

MD = str(REPO / "configs/textlines/mdlstm-debug.yaml")
BI = str(REPO / "configs/textlines/bilstm-debug.yaml")
SMALL = ["data.num_pairs=400", "tracking.enabled=false", "train.log_every=1", "eval.every=0",
         "checkpoint.every=0", "train.micro_batch_size=4", "train.global_batch_size=4"]


def test_rendered_lines_are_deterministic_and_the_test_font_is_held_out():
    a = textlines.read_splits(DataConfig(source="textlines", num_pairs=300), seed=5)
    b = textlines.read_splits(DataConfig(source="textlines", num_pairs=300), seed=5)
    assert np.array_equal(a["val"].image(3), b["val"].image(3))
    assert not np.array_equal(a["val"].image(3), a["val"].image(4))
    assert textlines.TEST_FONT not in a["train"].fonts + a["val"].fonts and a["test"].fonts == (textlines.TEST_FONT,)
    assert not set(a["train"].texts) & (set(a["val"].texts) | set(a["test"].texts))
    img = a["train"].image(0)
    assert img.shape[0] == textlines.HEIGHT and img.min() >= 0.0 and img.max() <= 1.0
    assert textlines.decode(a["train"].labels[0]) == a["train"].texts[0]


@pytest.fixture(scope="module")
def trained_bilstm(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("lines") / "run"
    args = ["data.num_pairs=3000", "model.d_hidden=64", "model.n_layers=2", "train.steps=300", "train.log_every=50", "eval.every=150",
            "eval.batches=4", "checkpoint.every=300", "tracking.enabled=false"]
    run_cli(["train", BI, "--run-dir", str(run), *sets(*args)], cache_dir)
    return run


def test_the_recognizer_learns_and_generate_reads_an_image_file_as_eval_does(trained_bilstm, cache_dir, tmp_path):
    run = trained_bilstm
    _, evals = read_metrics(run)
    assert evals[-1]["val_cer"] < min(0.75, evals[0]["val_cer"] - 0.2), evals  # untrained: about 1
    res = json.loads(run_cli(["eval", str(run / "checkpoints/step_00000300"), "--split", "test", "--json",
                              "--limit", "40"], cache_dir).stdout)
    assert res["lines"] == 40 and 0.0 <= res["cer"] < 0.9
    # The same test lines as grey PNG files, dark ink on light paper, through generate.
    from trainer.config import load_config
    from trainer.evaluation.inference import load_classifier, read_lines

    cfg = load_config(run / "config.yaml")
    lines = textlines.read_splits(cfg.data, cfg.train.seed)["test"]
    files = []
    for i in range(3):
        files.append(tmp_path / f"line{i}.png")
        Image.fromarray((255 * (1 - lines.image(i))).round().astype("uint8")).save(files[i])
    out = run_cli(["generate", str(run), *[a for f in files for a in ("--image", str(f))]], cache_dir).stdout
    model, _ = load_classifier(run, ("images",))
    want = read_lines(model, [np.round(lines.image(i) * 255) / 255 for i in range(3)])
    assert [line.split("\t")[1] if "\t" in line else "" for line in out.splitlines()] == want
    assert [s["output"] for s in res["samples"]] == read_lines(model, [lines.image(i) for i in range(3)])


def test_a_resumed_run_equals_an_uninterrupted_one(cache_dir, tmp_path):
    args = [*SMALL, "train.steps=6", "checkpoint.every=3", "model.dropout=0.1"]
    assert_resume_is_exact(MD, args, 3, 6, cache_dir, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("preset,zero", [(MD, 1), (MD, 3), (BI, 2)], ids=["mdlstm-z1", "mdlstm-z3", "bilstm-z2"])
def test_two_process_data_parallel_matches_one_process(preset, zero, cache_dir, tmp_path):
    args = [*SMALL, "train.steps=4", "train.global_batch_size=8", f"parallel.zero_stage={zero}",
            "eval.every=4", "eval.batches=2"]
    one_eval, two_eval = assert_two_processes_match_one(preset, args, 4, cache_dir, tmp_path)
    assert two_eval[0]["val_cer"] == pytest.approx(one_eval[0]["val_cer"], abs=1e-12)


@pytest.mark.parametrize("setting,needle", [
    ("model.n_labels=10", "has 41 labels but model.n_labels=10"),
    ("model.height=48", "rendered 32 pixels high"),
    ("parallel.tp=2", "tensor parallelism is available for model.family"),
])
def test_settings_the_recognizer_cannot_take_are_one_line(setting, needle, cache_dir, tmp_path):
    p = run_cli(["train", MD, "--run-dir", str(tmp_path / "r"), *sets(*SMALL, setting)], cache_dir, check=False)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def test_a_text_file_with_a_character_outside_the_alphabet_names_its_line(cache_dir, tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("".join(f"line {i}\n" for i in range(50)) + "Capital letters\n")
    p = run_cli(["train", MD, "--run-dir", str(tmp_path / "r"), *sets(*SMALL, f"data.source={src}")], cache_dir,
                check=False)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.endswith(f"{src}:51: 'C' not in the label alphabet {textlines.ALPHABET!r}") and "Traceback" not in p.stderr


def test_an_image_the_recognizer_cannot_read_is_one_line(trained_bilstm, cache_dir, tmp_path):
    rgb, junk = tmp_path / "rgb.png", tmp_path / "junk.png"
    Image.new("RGB", (80, 32), "white").save(rgb)
    junk.write_text("not an image")
    for path, needle in ((rgb, "3 channels (RGB); expected a grey"), (junk, "not a readable image"),
                         (tmp_path / "missing.png", "no such file")):
        p = run_cli(["generate", str(trained_bilstm), "--image", str(path)], cache_dir, check=False)
        assert p.returncode == 2 and needle in p.stderr.strip().splitlines()[-1], p.stderr


def test_character_error_rate_counts_edits_over_reference_characters():
    """By hand: 'abc' ► 'abd' one substitution, 'hello' ► 'hllo!' one deletion and one
    insertion, 'de' ► 'd' one deletion: 4 edits over 3 + 5 + 2 reference characters."""
    from trainer.evaluation.examples import char_errors

    assert char_errors(["abc", "hello", "de"], ["abd", "hllo!", "d"]) == (4.0, 10.0)
