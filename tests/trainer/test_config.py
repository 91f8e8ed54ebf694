"""Config validation: each error class is one line naming the key and value, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from trainer.cli import main
from trainer.config import Config, apply_override, load_config
from trainer.errors import ConfigError

PRESET = str(REPO / "configs/gpt/debug.yaml")


def cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqtrain: error: "), err
    return err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1e-3", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("modle.n_layer=2", "unknown key 'modle'; did you mean 'model'?"),
        ("train.steps=many", "train.steps = 'many': Input should be a valid integer"),
        ("parallel.zero_stage=4", "parallel.zero_stage = 4: Input should be less than or equal to 3"),
        ("train.precision=fp8", "train.precision = 'fp8': Input should be 'fp32', 'bf16' or 'fp16'"),
        ("model.n_head=5", "model.d_model=192 is not divisible by model.n_head=5"),
        ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_seq_len=128"),
        ("train.min_lr=1", "train.min_lr=1.0 is larger than train.lr"),
        ("train.steps", "expected dotted.key=value"),
        ("model.mup.base_width=256", "model.mup.base_width=256 is wider than model.d_model=192; μP widens a base model"),
    ],
)
def test_config_errors_are_one_line_with_exit_code_2(capsys, override, expected):
    err = cli_error(capsys, "train", PRESET, "--set", override)
    assert expected in err


def test_mup_on_a_family_without_widths_is_refused_in_one_line(capsys):
    err = cli_error(capsys, "train", str(REPO / "configs/rnn/lstm-lm-debug.yaml"), "--set", "model.mup.base_width=8")
    assert "model.mup: μP is defined for the Transformer families (gpt, encdec), not model.family=rnn_lm" in err


def test_batch_arithmetic_is_checked_before_any_process_group(capsys):
    err = cli_error(capsys, "train", PRESET, "--set", "train.global_batch_size=20", "--set", "train.grad_accum=2")
    assert "train.global_batch_size=20 != train.micro_batch_size (16) × train.grad_accum (2) × dp (1) = 32" in err
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_missing_and_malformed_files(capsys, tmp_path):
    assert "not found" in cli_error(capsys, "train", str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in cli_error(capsys, "train", str(bad))


def test_cli_process_prints_no_traceback():
    p = subprocess.run([sys.executable, "-m", "trainer", "train", PRESET, "--set", "train.lrr=1"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"seqtrain: error: {PRESET}: unknown key 'train.lrr'; did you mean 'train.lr'? "
        "(valid: " + ", ".join(Config.model_fields["train"].annotation.model_fields) + ")"
    ]


def test_resolve_derives_the_missing_batch_term():
    cfg = load_config(PRESET, ["train.global_batch_size=64", "train.micro_batch_size=8"])
    r = cfg.resolve(world_size=2)
    assert (r.parallel.dp, r.train.grad_accum, r.train.global_batch_size) == (2, 4, 64)
    r = load_config(PRESET, ["train.global_batch_size=null", "train.grad_accum=3"]).resolve(2)
    assert r.train.global_batch_size == 16 * 3 * 2
    with pytest.raises(ConfigError, match="parallel.dp=4 but world size 2"):
        load_config(PRESET, ["parallel.dp=4"]).resolve(2)
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config(PRESET, ["train.global_batch_size=24"]).resolve(2)


def test_overrides_are_typed_by_yaml_and_the_saved_config_round_trips(tmp_path):
    tree: dict = {}
    apply_override(tree, "tracking.enabled=false")
    apply_override(tree, "train.betas=[0.9, 0.99]")
    assert tree == {"tracking": {"enabled": False}, "train": {"betas": [0.9, 0.99]}}
    typed = load_config(PRESET, ["train.lr=3e-4", "train.steps=7"])
    assert typed.train.lr == 3e-4 and typed.train.steps == 7
    cfg = load_config(PRESET, ["train.lr=3e-4"]).resolve(1)
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(Config)


@pytest.mark.parametrize(
    "preset, overrides, world, expected",
    [
        ("rnn/lstm-lm-debug.yaml", ["parallel.tp=2"], 2, "tensor parallelism is available for model.family gpt and encdec, not rnn_lm"),
        ("encdec/debug.yaml", ["parallel.pp=2"], 2, "pipeline parallelism is available for model.family gpt only, not encdec"),
        ("gpt/debug.yaml", ["parallel.pp=2", "parallel.zero_stage=2"], 2, "supports ZeRO stage 0 or 1 only"),
        ("gpt/debug.yaml", ["parallel.pp=8", "model.n_layer=4"], 8, "parallel.pp=8 exceeds model.n_layer=4"),
        ("gpt/debug.yaml", ["parallel.tp=4", "model.n_head=6"], 4, "model.n_head=6 is not divisible by parallel.tp=4"),
        ("gpt/debug.yaml", ["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp × parallel.pp = 4"),
        ("gpt/debug.yaml", ["parallel.pp=2", "eval.batches=3", "train.micro_batch_size=8"], 4, "eval.batches=3 is not a multiple of dp=2"),
        ("gpt/debug.yaml", ["parallel.pp=2", "train.compile=true"], 2, "parallel.pp=2 does not combine with train.compile"),
        ("gpt/debug.yaml", ["parallel.sequence_parallel=true"], 2, "sequence_parallel=true needs parallel.tp ≥ 2"),
        ("encdec/debug.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true"], 2,
         "parallel.sequence_parallel: available for model.family gpt only, not encdec"),
        ("gpt/debug.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], 4,
         "parallel.sequence_parallel with parallel.pp=2 is not supported"),
        ("gpt/debug.yaml", ["parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=126"], 4,
         "data.seq_len=126 is not divisible by parallel.tp=4"),
        ("encdec/debug.yaml", ["parallel.cp=2"], 2, "context parallelism is available for model.family gpt only, not encdec"),
        ("gpt/debug.yaml", ["parallel.cp=2", "parallel.pp=2"], 4, "composes with data parallelism and ZeRO only"),
        ("gpt/debug.yaml", ["parallel.cp=4"], 4, "model.n_head=6 is not divisible by parallel.cp=4"),
        ("gpt/debug.yaml", ["parallel.cp=2", "data.seq_len=127"], 2, "data.seq_len=127 is not divisible by parallel.cp=2"),
        ("gpt/debug.yaml", ["parallel.cp=2"], 3, "world size 3 is not divisible by parallel.tp × parallel.pp × parallel.cp = 2"),
        # The Llama shape: 6 query heads, 2 key/value heads; each rank takes whole groups.
        ("gpt/llama-debug.yaml", ["parallel.tp=3", "model.d_ff=510"], 3, "model.n_kv_head=2 is not divisible by parallel.tp=3"),
        ("gpt/llama-debug.yaml", ["parallel.cp=3", "data.seq_len=126"], 3, "model.n_kv_head=2 is not divisible by parallel.cp=3"),
        ("gpt/llama-debug.yaml", ["parallel.tp=2", "model.qk_norm=true"], 2, "model.qk_norm with parallel.tp=2 is not supported yet"),
    ],
)
def test_unsupported_parallel_layouts_are_refused_in_one_line(preset, overrides, world, expected):
    with pytest.raises(ConfigError) as e:
        load_config(str(REPO / "configs" / preset), overrides).resolve(world)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_vocabulary_must_split_over_tensor_ranks():
    cfg = load_config(PRESET, ["parallel.tp=2", "model.vocab_size=301"]).resolve(2)
    with pytest.raises(ConfigError, match=r"model.vocab_size=301 is not divisible by parallel.tp=2; "
                                          r"set parallel.vocab_multiple=128"):
        cfg.check_vocab()
    load_config(PRESET, ["parallel.tp=2", "model.vocab_size=302"]).resolve(2).check_vocab()


@pytest.mark.parametrize("preset", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                                          if "scaling" not in p.parts))
def test_every_preset_validates_and_resolves(preset):
    cfg = load_config(str(REPO / preset), [])
    cfg.resolve(1)
    assert cfg.name and cfg.train.steps > 0


def test_gpt2_preset_has_the_shape_of_transformers_gpt2_small():
    """The GPU preset is GPT-2 small: the same parameter count as ``transformers``' GPT-2 with
    the padded vocabulary (124,475,904 = 124,439,808 + 47 padded rows × 768), both built on
    the meta device (no memory, no init)."""
    import transformers

    from trainer.parallel.materialize import reference_model

    cfg = load_config(str(REPO / "configs/gpt/gpt2-124m.yaml"), ["model.vocab_size=50304"])
    ours = reference_model(cfg).num_params()
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50304, n_positions=1024))
    assert ours == sum(p.numel() for p in hf.parameters()) == 124_475_904
    assert cfg.train.precision == "bf16" and cfg.train.compile and cfg.data.seq_len == 1024


@pytest.mark.parametrize("preset, shape, published", [
    ("gpt2-355m", dict(n_layer=24, n_head=16, n_embd=1024), 354_823_168),   # GPT-2 medium
    ("gpt2-774m", dict(n_layer=36, n_head=20, n_embd=1280), 774_030_080),   # GPT-2 large
    ("gpt2-1.5b", dict(n_layer=48, n_head=25, n_embd=1600), 1_557_611_200),  # GPT-2 XL
])
def test_larger_gpt2_presets_count_what_transformers_counts(preset, shape, published):
    """Each preset has the shape of its GPT-2: our meta-device count equals ``transformers``'
    GPT-2 with the same padded vocabulary, and with GPT-2's own 50,257 rows the published
    count (the sizes OpenAI released)."""
    import transformers

    from trainer.parallel.materialize import reference_model

    for vocab in (50304, 50257):
        cfg = load_config(str(REPO / f"configs/gpt/{preset}.yaml"), [f"model.vocab_size={vocab}"])
        ours = reference_model(cfg).num_params()
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=1024, **shape))
        assert ours == sum(p.numel() for p in hf.parameters())
    assert ours == published


def test_7b_preset_counts_its_closed_form():
    """12·L·d² + 13·L·d per block (q, k, v, out, two MLP matrices, their biases, two norms),
    embeddings (V + P)·d tied with the head, a final norm: 6.66 B; ZeRO-3 shards it."""
    from trainer.parallel.materialize import reference_model

    cfg = load_config(str(REPO / "configs/gpt/gpt2-6.7b.yaml"), ["model.vocab_size=50304"])
    L, d, V, P = 32, 4096, 50304, 2048
    assert reference_model(cfg).num_params() == L * (12 * d * d + 13 * d) + (V + P) * d + 2 * d == 6_658_596_864
    assert cfg.parallel.zero_stage == 3 and cfg.train.activation_checkpointing


def test_document_mask_is_refused_where_no_layout_can_carry_it(capsys):
    err = cli_error(capsys, "train", PRESET, "--set", "data.document_mask=true", "--set", "parallel.cp=2",
                    "--set", "model.n_head=4")
    assert "data.document_mask=true applies to model.family gpt without pipeline, context or sequence" in err
    assert "cp 2" in err
    err = cli_error(capsys, "train", str(REPO / "configs/rnn/lstm-lm-debug.yaml"), "--set", "data.document_mask=true")
    assert "(here rnn_lm," in err
