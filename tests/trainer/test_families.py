"""Every model family through the real trainer: it overfits a tiny task, its checkpoint decodes,
and two data-parallel processes give the single-process losses."""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO, read_metrics, run_cli, sets

FAMILIES = {
    "encdec": (str(REPO / "configs/encdec/debug.yaml"), [
        "model.n_enc_layers=1", "model.n_dec_layers=1", "model.d_model=128", "model.d_ff=256",
        "model.label_smoothing=0.0", "model.dropout=0.0", "train.lr=2e-3", "train.steps=300"]),
    "rnn_seq2seq": (str(REPO / "configs/rnn/gru-attn-debug.yaml"), [
        "model.dropout=0.0", "model.d_hidden=96", "train.lr=1e-2", "train.steps=200"]),
}
SEQ2SEQ_COMMON = ["data.source=dates", "data.num_pairs=40", "data.val_fraction=0.2",
                  "data.max_tokens=null", "train.micro_batch_size=8", "train.global_batch_size=8",
                  "train.warmup_steps=10", "train.min_lr=1e-4", "eval.every=0", "eval.batches=1",
                  "eval.decode_samples=8", "checkpoint.every=0", "tracking.enabled=false", "train.log_every=10"]
LM = (str(REPO / "configs/rnn/lstm-lm-debug.yaml"), [
    "model.d_embed=32", "model.d_hidden=64", "model.dropout=0.0", "data.seq_len=16",
    "data.tokenizer.vocab_size=40", "train.micro_batch_size=4", "train.global_batch_size=4",
    "train.lr=1e-2", "train.warmup_steps=5", "eval.every=0", "eval.batches=2", "checkpoint.every=0",
    "tracking.enabled=false", "train.log_every=10"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_seq2seq_family_memorises_a_tiny_task_and_decodes_it(family, cache_dir, tmp_path):
    preset, extra = FAMILIES[family]
    run = tmp_path / "run"
    run_cli(["train", preset, "--run-dir", str(run), *sets(*SEQ2SEQ_COMMON, *extra)], cache_dir)
    rows, evals = read_metrics(run)
    assert rows[-1]["loss"] < 0.05, rows[-1]
    # The training pairs (val_fraction 0.2 of 40 held out): decoding reproduces their targets.
    from trainer.data.corpus import name_key
    from trainer.data.dates import pairs

    train_pairs = [p for i, p in enumerate(pairs(40, 1234)) if name_key(str(i), "split") >= 0.2][:4]
    out = run_cli(["generate", str(run), *sum((["--source", s] for s, _ in train_pairs), []),
                   "--beam", "3"], cache_dir).stdout.splitlines()
    assert [line.split("\t")[1] for line in out] == [t for _, t in train_pairs]
    assert {"val_exact_match", "val_bleu", "val_chrf"} <= evals[-1].keys()


def test_lstm_lm_with_tbptt_memorises_a_tiny_corpus(tiny_corpus, cache_dir, tmp_path):
    preset, extra = LM
    run = tmp_path / "run"
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tiny_corpus.parent / "one.txt").write_text(text)
    run_cli(["train", preset, "--run-dir", str(run), *sets(
        *extra, f"data.source={tiny_corpus.parent / 'one.txt'}", "train.steps=150")], cache_dir)
    rows, evals = read_metrics(run)
    assert rows[-1]["loss"] < 0.1 and evals[-1]["val_loss"] < 0.2
    out = run_cli(["generate", str(run), "--prompt", "the quick", "--temperature", "0",
                   "--max-new-tokens", "40"], cache_dir).stdout
    assert "the quick brown fox jumps over the lazy dog." in out


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["encdec", "rnn_seq2seq", "rnn_lm"])
def test_two_process_data_parallel_matches_one_process(family, tiny_corpus, cache_dir, tmp_path):
    if family == "rnn_lm":
        preset, extra = LM
        args = [*extra, f"data.source={tiny_corpus}", "train.micro_batch_size=2",
                "train.global_batch_size=4", "parallel.zero_stage=1"]
    else:
        preset, extra = FAMILIES[family]
        args = [*SEQ2SEQ_COMMON, *extra, "data.num_pairs=200", "train.micro_batch_size=4",
                "parallel.zero_stage=2", "eval.decode_samples=0"]
    args += ["train.steps=6", "train.log_every=1"]
    run_cli(["train", preset, "--run-dir", str(tmp_path / "one"), *sets(*args)], cache_dir)
    run_cli(["train", preset, "--run-dir", str(tmp_path / "two"), *sets(*args)], cache_dir, nproc=2)
    one, _ = read_metrics(tmp_path / "one")
    two, _ = read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert a["tokens"] == b["tokens"]
    assert one[-1]["loss"] < one[0]["loss"]


@pytest.mark.parametrize("family", ["encdec", "rnn_seq2seq", "rnn_lm"])
def test_family_trains_in_bf16_as_in_fp32(family, tiny_corpus, cache_dir, tmp_path):
    """bf16 weights (DeepSpeed's, saved as bf16), fp32 masters and accumulation (ZeRO 1): each
    family follows its fp32 run to within 4 bf16 unit roundoffs (2^-6) of the loss, relative,
    over 12 steps (the encoder-decoder's fp32 sinusoidal table once promoted its bf16
    activations into a bf16 LayerNorm: a crash)."""
    import torch

    if family == "rnn_lm":
        preset, extra = LM
        args = [*extra, f"data.source={tiny_corpus}", "train.micro_batch_size=2", "train.global_batch_size=4"]
    else:
        preset, extra = FAMILIES[family]
        args = [*SEQ2SEQ_COMMON, *extra, "data.num_pairs=200", "train.micro_batch_size=4",
                "train.global_batch_size=8", "eval.decode_samples=4"]
    args += ["train.steps=12", "train.log_every=1", "parallel.zero_stage=1"]
    for precision in ("fp32", "bf16"):
        run_cli(["train", preset, "--run-dir", str(tmp_path / precision),
                 *sets(*args, f"train.precision={precision}")], cache_dir)
    fp32, _ = read_metrics(tmp_path / "fp32")
    bf16, evals = read_metrics(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 12 and bf16[-1]["loss"] < bf16[0]["loss"] - 0.1
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2.0**-6), (a, b)
    saved = torch.load(next((tmp_path / "bf16/checkpoints").glob("step_*/mp_rank_00_model_states.pt")),
                       weights_only=False)["module"]
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert all(map(math.isfinite, evals[-1].values()))


def test_gpt_memorises_a_tiny_corpus(tiny_corpus, cache_dir, tmp_path):
    from tests.conftest import TINY

    run = tmp_path / "run"
    (tiny_corpus.parent / "one.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run_cli(["train", str(REPO / "configs/gpt/debug.yaml"), "--run-dir", str(run), *sets(
        *TINY, f"data.source={tiny_corpus.parent / 'one.txt'}", "train.steps=150",
        "data.tokenizer.kind=char", "data.tokenizer.vocab_size=40",
        "train.global_batch_size=4", "train.log_every=10")], cache_dir)
    rows, _ = read_metrics(run)
    assert rows[-1]["loss"] < 0.1


def test_every_callback_a_family_names_exists():
    """The registry names its callbacks (it sits below the loop); the assembly resolves them."""
    from trainer.families import FAMILIES
    from trainer.train import FAMILY_CALLBACKS

    named = {n for s in FAMILIES.values() for n in s.callbacks}
    assert named, "rnn_seq2seq names scheduled_sampling"
    assert named <= FAMILY_CALLBACKS.keys()


def test_the_planner_refuses_a_family_it_does_not_model(tmp_path):
    """What the planner covers is the registry's ``planned``, not a family name in its code."""
    from trainer.accounting.planner import shape_of
    from trainer.config import load_config
    from trainer.errors import ConfigError
    from trainer.families import having

    assert having("planned") == ["gpt"]
    cfg = load_config(str(REPO / "configs/rnn/lstm-lm-debug.yaml"), [])
    with pytest.raises(ConfigError, match="covers model.family in \\['gpt'\\]; rnn_lm"):
        shape_of(cfg)
