"""Evaluation and Hugging Face export/import, proven by numbers."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.evaluation.metrics import text_metrics

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_export_hf_loads_with_equal_logits_and_generates(gpt_run, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluation.inference import load_for_inference

    root, _, _ = gpt_run
    out = tmp_path / "hf"
    p = run_cli(["export", str(root / "run"), "--format", "hf", "--out", str(out)], cache_dir)
    assert "reloaded logits differ by at most" in p.stdout
    hf, info = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and type(hf).__name__ == "GPT2LMHeadModel"
    ours, tok, _, _ = load_for_inference(root / "run")
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "the cat sees the ball.\nmy friend likes"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert hf_tok(text)["input_ids"] == ids and hf_tok.eos_token == "<|endoftext|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf.eval()(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4
    gen = hf.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    assert gen.shape == (1, len(ids) + 5)
    assert torch.equal(gen, ours.generate(x, 5, temperature=0))  # greedy: the same continuation


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_import_hf_gives_equal_logits_and_fine_tunes(gpt_run, cache_dir, tmp_path, activation):
    from transformers import GPT2Config, GPT2LMHeadModel

    from models import build
    from trainer.config import load_config

    root, corpus, _ = gpt_run
    hf_dir = tmp_path / "gpt2-small-ish"
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                    activation_function=activation)).eval()
    hf.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text((root / "run/tokenizer.json").read_text())
    out = tmp_path / "imported"
    run_cli(["import-hf", str(hf_dir), "--out", str(out)], cache_dir)
    cfg = load_config(out / "config.yaml")
    from safetensors.torch import load_model

    ours = build(cfg.model)
    load_model(ours, str(out / "model.safetensors"))
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (ours.eval()(x) - hf(x).logits).abs().max().item() <= 1e-5
    run_cli(["train", str(out / "config.yaml"), "--run-dir", str(tmp_path / "ft"), *sets(
        f"data.source={corpus}", "data.seq_len=32", "train.steps=2", "train.micro_batch_size=4",
        "eval.every=0", "eval.batches=1", "tracking.enabled=false", "data.val_fraction=0.2")], cache_dir)
    assert (tmp_path / "ft/checkpoints/latest").is_file()


def test_init_from_exported_weights_starts_where_the_run_ended(gpt_run, cache_dir, tmp_path):
    root, corpus, _ = gpt_run
    run_cli(["export", str(root / "run"), "--format", "safetensors", "--out", str(tmp_path / "w")], cache_dir)
    run_cli(["train", PRESET, "--run-dir", str(tmp_path / "again"), *sets(
        *TINY, f"data.source={corpus}", "train.steps=2", "train.global_batch_size=8",
        f"train.init_from={tmp_path / 'w/model.safetensors'}")], cache_dir)
    first, _ = read_metrics(tmp_path / "again")
    trained, _ = read_metrics(root / "run")
    assert abs(first[0]["loss"] - trained[-1]["loss"]) < 0.5 < trained[0]["loss"] - first[0]["loss"]


def test_lm_metrics_relations_and_known_values(gpt_run, tmp_path):
    """perplexity = exp(loss); bits per byte and per character from the same NLL; an untrained
    model scores ln(vocab)."""
    from models import GPTConfig, build
    from tools.evaluate import evaluate_checkpoint, lm_metrics
    from trainer.evaluation.inference import load_for_inference

    root, _, _ = gpt_run
    text = "the bird draws a red box.\nour teacher finds the old tree.\n" * 30
    (tmp_path / "t.txt").write_text(text)
    r = evaluate_checkpoint(root / "run", text_file=str(tmp_path / "t.txt"))
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] * 1 == pytest.approx(r["bits_per_char"])  # ASCII: a byte per char
    _, tok, _, _ = load_for_inference(root / "run")
    ids = tok.encode(text, add_special_tokens=False).ids
    covered = tok.decode(ids[1: 1 + (len(ids) - 1) // 32 * 32])
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / len(covered.encode()))
    assert r["token_accuracy"] > 0.3  # the corpus' words: a trained model predicts many of them
    untrained = build(GPTConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=32, vocab_size=300), seed=0).eval()
    u = lm_metrics(untrained, tok, ids, seq_len=32)
    assert u["loss"] == pytest.approx(math.log(300), abs=0.05)


def test_bleu_and_chrf_are_sacrebleus():
    hyps = ["the cat sat on the mat", "1994 - 03 - 23", "a completely different sentence"]
    refs = ["the cat sat on the mat", "1994 - 03 - 24", "nothing alike here at all"]
    m = text_metrics(hyps, refs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert text_metrics(refs, refs)["bleu"] == pytest.approx(100.0)


def test_evaluating_a_run_gives_one_point_per_checkpoint_a_png_and_mlflow_metrics(gpt_run, cache_dir):
    import mlflow

    root, _, uri = gpt_run
    p = run_cli(["eval", str(root / "run"), "--json", "--max-tokens", "2000"], cache_dir)
    results = json.loads(p.stdout)
    assert [r["step"] for r in results] == [10, 20, 30]
    assert results[-1]["loss"] < results[0]["loss"]
    png = root / "run/eval/curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rows = [json.loads(ln) for ln in (root / "run/eval/results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30]  # other tests add their own rows
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (root / "run/mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [10, 20, 30]
    assert "eval" in [a.path for a in client.list_artifacts(run_id)]


def test_seq2seq_eval_reports_exact_match_bleu_chrf(cache_dir, tmp_path):
    run = tmp_path / "s2s"
    run_cli(["train", str(REPO / "configs/encdec/debug.yaml"), "--run-dir", str(run), *sets(
        "data.num_pairs=200", "model.n_enc_layers=1", "model.n_dec_layers=1", "model.d_model=32",
        "train.steps=5", "eval.every=0", "eval.decode_samples=0", "tracking.enabled=false")], cache_dir)
    r = json.loads(run_cli(["eval", str(run / "checkpoints/latest").replace("/latest", ""), "--json",
                            "--limit", "20", "--beam", "2"], cache_dir).stdout)
    from trainer.data.corpus import name_key

    n_val = sum(name_key(str(i), "split") < 0.05 for i in range(200))  # the run's validation pairs
    assert {"exact_match", "bleu", "chrf"} <= r.keys() and r["pairs"] == n_val
    assert r["samples"][0]["reference"][:2] in ("19", "20")


def test_translation_with_official_files_decodes_them_in_training_and_scores_test_per_checkpoint(
        cache_dir, tmp_path):
    """Official validation files: the decoding evaluation of training reads them (its last BLEU is
    the one `eval --split val` computes from the text at the last checkpoint); `eval --split
    test --beam 2` gives BLEU per checkpoint over the whole test file."""
    from trainer.data.dates import pairs

    data = pairs(360, seed=7)
    train, val, test = data[:300], data[300:330], data[330:]
    (tmp_path / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in train))
    (tmp_path / "valid.en").write_text("".join(s + "\n" for s, _ in val))
    (tmp_path / "valid.iso").write_text("".join(t + "\n" for _, t in val))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in test))
    run = tmp_path / "s2s"
    run_cli(["train", str(REPO / "configs/encdec/debug.yaml"), "--run-dir", str(run), *sets(
        f"data.source={tmp_path / 'train.tsv'}", f"data.val_source={tmp_path / 'valid.en'}",
        f"data.val_target_source={tmp_path / 'valid.iso'}", f"data.test_source={tmp_path / 'test.jsonl'}",
        "data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=300", "model.n_enc_layers=1",
        "model.n_dec_layers=1", "model.d_model=32", "train.steps=20", "eval.every=10",
        "eval.decode_samples=100", "checkpoint.every=10", "checkpoint.keep_last=null",
        "tracking.enabled=false")], cache_dir)
    _, evals = read_metrics(run)
    r_val = json.loads(run_cli(["eval", str(run / "checkpoints/step_00000020"), "--split", "val", "--json"],
                               cache_dir).stdout)
    assert r_val["pairs"] == 30 and evals[-1]["val_bleu"] == pytest.approx(r_val["bleu"], abs=1e-9)
    assert evals[-1]["val_chrf"] == pytest.approx(r_val["chrf"], abs=1e-9)
    results = json.loads(run_cli(["eval", str(run), "--split", "test", "--beam", "2", "--json"], cache_dir).stdout)
    assert [r["step"] for r in results] == [10, 20] and all(r["pairs"] == 30 for r in results)
    assert {r["samples"][0]["reference"] for r in results} == {test[0][1]}
    p = run_cli(["eval", str(run), "--split", "test", "--data", str(REPO / "configs/encdec/debug.yaml")],
                cache_dir, check=False)
    assert p.returncode == 2 and "has no test set" in p.stderr.strip().splitlines()[-1]


def test_bad_inputs_are_one_line_errors(gpt_run, cache_dir, tmp_path):
    root, _, _ = gpt_run
    (tmp_path / "nothing").mkdir()
    p = run_cli(["eval", str(tmp_path / "nothing")], cache_dir, check=False)
    assert p.returncode == 2 and "not a checkpoint" in p.stderr.strip().splitlines()[-1]
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(root / "run", broken)
    latest = broken / "checkpoints" / (broken / "checkpoints/latest").read_text().strip()
    states = next(latest.glob("mp_rank_*_model_states.pt"))
    states.write_bytes(states.read_bytes()[:1000])
    p = run_cli(["generate", str(broken)], cache_dir, check=False)
    assert p.returncode == 2 and "unreadable checkpoint" in p.stderr.strip().splitlines()[-1]
    p = run_cli(["export", str(root / "run"), "--format", "hf", "--out", str(tmp_path / "x"),
                 ], cache_dir, check=False)
    assert p.returncode == 0
    p = run_cli(["generate", str(root / "run"), "--source", "may 5, 1999"], cache_dir, check=False)
    assert p.returncode == 2 and "language model: give --prompt" in p.stderr


def test_hub_tasks_on_an_offline_node_are_one_line(gpt_run, cache_dir):
    """An lm-eval task whose dataset lives on the Hub, with the Hub unreachable (a closed local
    port): the clients run offline at once and the missing dataset is one line, no retries."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root, _, _ = gpt_run
    p = run_cli(["eval", str(root / "run"), "--tasks", "hellaswag", "--limit", "2"], cache_dir, check=False,
                env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(root / "hf-home")})
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
    assert "--tasks hellaswag:" in p.stderr and "--task-dir" in p.stderr
