"""The Llama-shaped decoder through the CLI: ``export --format hf`` writes a folder that
``LlamaForCausalLM.from_pretrained`` loads with our logits; ``import-hf`` starts a run from a
local Llama folder (continued pre-training); a configuration no transformers class computes is
refused in one line and still exports as safetensors; ``generate`` crops a long prompt in one
line. Nothing is downloaded: the transformers models are built from configs here."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets

PRESET = str(REPO / "configs/gpt/llama-debug.yaml")
LLAMA_TINY = [*TINY, "model.n_head=4", "model.n_kv_head=2", "model.d_ff=64", "train.steps=12",
              "train.global_batch_size=8", "checkpoint.every=12", "train.z_loss=1e-3"]


@pytest.fixture(scope="module")
def llama_run(cache_dir, tmp_path_factory):
    from tests.conftest import make_corpus

    root = tmp_path_factory.mktemp("llamarun")
    corpus = make_corpus(root / "corpus")
    run_cli(["train", PRESET, "--run-dir", str(root / "run"), *sets(*LLAMA_TINY, f"data.source={corpus}")], cache_dir)
    rows, _ = read_metrics(root / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] and all("z_loss" in r for r in rows)
    return root, corpus


def test_export_hf_is_a_llama_with_equal_logits_and_greedy_continuations(llama_run, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from trainer.evaluation.inference import load_for_inference

    root, _ = llama_run
    p = run_cli(["export", str(root / "run"), "--format", "hf", "--out", str(tmp_path / "hf")], cache_dir)
    assert "(transformers LlamaForCausalLM)" in p.stdout
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, output_loading_info=True)
    assert isinstance(hf, LlamaForCausalLM) and not info["missing_keys"] and not info["unexpected_keys"]
    ours, tok, _, _ = load_for_inference(root / "run")
    x = torch.tensor([tok.encode("the cat sees the ball.\nmy friend", add_special_tokens=False).ids])
    with torch.no_grad():
        assert (hf.eval()(x).logits - ours(x)).abs().max().item() <= 1e-5
    gen = hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(gen, ours.generate(x, 8, temperature=0))


def test_import_hf_reads_a_llama_folder_and_continues_training(llama_run, cache_dir, tmp_path):
    from safetensors.torch import load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import build
    from trainer.config import load_config

    root, corpus = llama_run
    hf_dir = tmp_path / "llama-tiny"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})).eval()
    hf.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text((root / "run/tokenizer.json").read_text())
    run_cli(["import-hf", str(hf_dir), "--out", str(tmp_path / "imported")], cache_dir)
    cfg = load_config(tmp_path / "imported" / "config.yaml")
    assert (cfg.model.n_kv_head, cfg.model.position, cfg.model.rope_scaling.factor) == (2, "rope", 4.0)
    ours = build(cfg.model)
    load_model(ours, str(tmp_path / "imported" / "model.safetensors"))
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (ours.eval()(x) - hf(x).logits).abs().max().item() <= 1e-5
    run_cli(["train", str(tmp_path / "imported" / "config.yaml"), "--run-dir", str(tmp_path / "ft"), *sets(
        f"data.source={corpus}", "data.seq_len=32", "train.steps=2", "train.micro_batch_size=4",
        "eval.every=0", "eval.batches=1", "tracking.enabled=false", "data.val_fraction=0.2")], cache_dir)
    assert (tmp_path / "ft/checkpoints/latest").is_file()


def test_a_model_no_transformers_class_computes_is_refused_and_exports_as_safetensors(llama_run, cache_dir, tmp_path):
    root, corpus = llama_run
    run = tmp_path / "qk"
    run_cli(["train", PRESET, "--run-dir", str(run), *sets(*LLAMA_TINY, f"data.source={corpus}", "train.steps=2",
                                                          "checkpoint.every=2", "model.qk_norm=true")], cache_dir)
    p = run_cli(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")], cache_dir, check=False)
    assert p.returncode == 2 and "LlamaForCausalLM has no query/key norm" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = run_cli(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")], cache_dir)
    assert (tmp_path / "st" / "model.safetensors").is_file()


def test_a_prompt_longer_than_the_context_is_cropped_in_one_line(llama_run, cache_dir):
    root, _ = llama_run
    long = "the cat sees the ball. " * 40  # far past model.max_seq_len=32
    p = run_cli(["generate", str(root / "run"), "--prompt", long, "--max-new-tokens", "40"], cache_dir)
    said = [ln for ln in p.stderr.splitlines() if "exceed model.max_seq_len=32" in ln]
    assert len(said) == 1 and "Traceback" not in p.stderr and p.stdout.strip()


def test_bad_decoder_shapes_are_one_line_errors(llama_run, cache_dir, tmp_path):
    root, corpus = llama_run
    for bad, key in [("model.n_kv_head=3", "model.n_kv_head=3 does not divide model.n_head=4"),
                     ("model.d_model=36", "model.position=rope needs an even head size")]:
        p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "x"), *sets(*LLAMA_TINY, f"data.source={corpus}", bad)],
                    cache_dir, check=False)
        assert p.returncode == 2 and key in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    hf_dir = tmp_path / "not-llama"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "mistral", "hidden_size": 8, "num_attention_heads": 2}')
    p = run_cli(["import-hf", str(hf_dir), "--out", str(tmp_path / "o")], cache_dir, check=False)
    assert p.returncode == 2 and "model_type 'mistral'; import-hf reads GPT-2 and Llama models" in p.stderr
