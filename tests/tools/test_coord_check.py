"""μP's coordinate check (``seqtrain mup coord-check``): after 3 Adam steps, activation sizes
under μP do not move with the width, while the standard parametrisation's logits grow with it.

The bounds are on the least-squares slope of log(mean |activation|) against log(width) over
widths 32..256 (averaged over 2 initialisation seeds): under μP every block output and the
logits within ±0.15 (a size that changes by at most 2^0.45 ≈ 1.4× across 8× the width), and
attention scores at most +0.15 (they may shrink: a finite-width correction that fades with
steps); under SP the logits' slope at least +0.5 (about ∝ width^0.9 here)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, make_corpus, run_cli, sets

MUP_DEBUG = str(REPO / "configs/gpt/mup-debug.yaml")
SMALL = ["model.n_layer=2", "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer.vocab_size=300",
         "train.micro_batch_size=8", "train.global_batch_size=8", "train.lr=4e-3"]
BOUND_MUP, BOUND_SP_LOGITS = 0.15, 0.5


@pytest.fixture(scope="module")
def checked(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("coord")
    corpus = make_corpus(root / "corpus")
    p = run_cli(["mup", "coord-check", MUP_DEBUG, "--widths", "32,64,128,256", "--steps", "3", "--seeds", "2",
                 "--base-width", "32", "--out", str(root / "out"), "--json",
                 *sets(*SMALL, f"data.source={corpus}")], cache_dir)
    return json.loads(p.stdout), root / "out"


def test_mup_activations_keep_their_size_as_width_grows(checked):
    result, _ = checked
    slopes = result["slopes"][3]
    print(json.dumps(slopes, indent=1))  # for the record (pytest -s)
    for q, slope in slopes["mup"].items():
        if q.startswith("attn scores"):
            assert slope <= BOUND_MUP, (q, slope)
        else:
            assert abs(slope) <= BOUND_MUP, (q, slope)
    assert slopes["sp"]["logits"] >= BOUND_SP_LOGITS


def test_the_encoder_decoder_passes_the_same_check(cache_dir, tmp_path):
    """The encoder-decoder's μP (``models/encdec.py``): its encoder and decoder blocks and logits
    within the same bounds, every self- and cross-attention's scores at most +0.15."""
    p = run_cli(["mup", "coord-check", str(REPO / "configs/encdec/debug.yaml"), "--widths", "32,64,128,256",
                 "--steps", "3", "--seeds", "2", "--base-width", "32", "--out", str(tmp_path), "--json",
                 *sets("model.dropout=0.0", "model.label_smoothing=0.0", "data.num_pairs=200",
                       "train.micro_batch_size=8", "train.lr=4e-3")], cache_dir)
    result = json.loads(p.stdout)
    slopes = result["slopes"][3]
    print(json.dumps(slopes, indent=1))  # for the record (pytest -s)
    assert {"encoder block 1", "block 1", "logits"} <= slopes["mup"].keys()
    assert sum(q.startswith("attn scores") for q in slopes["mup"]) == 2 + 2 * 2  # encoder self; decoder self, cross
    for q, slope in slopes["mup"].items():
        assert (slope <= BOUND_MUP) if q.startswith("attn scores") else (abs(slope) <= BOUND_MUP), (q, slope)
    assert slopes["sp"]["logits"] >= BOUND_SP_LOGITS


def test_table_json_and_plot_are_written(checked):
    result, out = checked
    assert result["widths"] == [32, 64, 128, 256] and result["steps"] == 3
    assert {"embedding", "block 0", "block 1", "attn scores 0", "attn scores 1", "logits"} == set(result["sizes"]["mup"])
    assert "SP" in (out / "coord_check.txt").read_text() and (out / "coord_check.png").stat().st_size > 10_000


@pytest.mark.parametrize(("args", "said"), [
    (["--widths", "32,30"], "--widths 32,30: at least two widths, increasing"),
    (["--widths", "64,66"], "--widths 66: not divisible by model.n_head=4"),
    (["--widths", "32,64", "--base-width", "64"], "base width 64 is wider than the narrowest of --widths 32"),
    (["--widths", "a,b"], "--widths 'a,b': comma-separated numbers"),
])
def test_bad_input_is_one_line(args, said, cache_dir, tmp_path):
    p = run_cli(["mup", "coord-check", MUP_DEBUG, *args, "--out", str(tmp_path)], cache_dir, check=False)
    assert p.returncode == 2 and said in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_family_without_widths_is_refused(cache_dir, tmp_path):
    p = run_cli(["mup", "coord-check", str(REPO / "configs/rnn/lstm-lm-debug.yaml"), "--out", str(tmp_path)],
                cache_dir, check=False)
    assert p.returncode == 2 and "model.family=rnn_lm has no widths for μP" in p.stderr, p.stderr
