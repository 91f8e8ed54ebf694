"""The parity matrix: every parallel layout trains the same model to the same losses.

Fixed seed, fixed global batch (8 sequences), fp32, dropout 0: the per-step losses and gradient
norms of each layout equal the single-process run's within 1e-5 (float summation order differs,
so not bitwise). Every layout starts from the same numbers because every parameter is drawn
from a generator seeded by its name, whole, before a rank keeps its slice, stage or partition.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets

pytestmark = pytest.mark.distributed

GPT = str(REPO / "configs/gpt/debug.yaml")
ENCDEC = str(REPO / "configs/encdec/debug.yaml")
# 4 blocks so that two pipeline stages hold two each; vocab padded so tp=2 can split it.
GPT_ARGS = [*TINY, "model.n_layer=4", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.steps=6", "parallel.vocab_multiple=64"]
ENCDEC_ARGS = ["data.source=dates", "data.num_pairs=200", "data.val_fraction=0.2", "data.max_tokens=null",
               "model.n_enc_layers=2", "model.n_dec_layers=2", "model.d_model=32", "model.d_ff=64",
               "model.n_head=2", "model.dropout=0.0", "model.label_smoothing=0.1",
               "parallel.vocab_multiple=64",
               "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=6",
               "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1", "eval.every=0",
               "eval.batches=1", "eval.decode_samples=8", "checkpoint.every=0", "tracking.enabled=false"]

# The Llama shape: RoPE, RMSNorm, SwiGLU, grouped-query attention (2 key/value heads for 4
# query heads: one whole group per rank at tp2 and cp2), no biases, untied head, the z-loss.
LLAMA_ARGS = [*GPT_ARGS, "model.n_head=4", "model.n_kv_head=2", "model.position=rope", "model.norm=rmsnorm",
              "model.activation=swiglu", "model.d_ff=64", "model.bias=false", "model.tie_embeddings=false",
              "train.z_loss=1e-3"]
LLAMA_LAYOUTS = ["dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2", "tp2-sp", "cp2", "pp2-activation-checkpointing",
                 "tp2xpp2"]

# μP at twice its base width, untied head: per-group learning rates (hidden matrices at lr/2),
# the attention scale 1/head_dim and the logit multiplier, in every layout's own groups.
MUP_ARGS = [*GPT_ARGS, "model.mup.base_width=16", "model.mup.output_mult=2", "model.tie_embeddings=false"]
MUP_LAYOUTS = ["dp2-zero3", "tp2", "pp2"]

LAYOUTS = {
    # name: (nproc, overrides)
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2-activation-checkpointing": (2, ["parallel.pp=2", "train.activation_checkpointing=true"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "dp2xtp2-zero2": (4, ["parallel.tp=2", "parallel.zero_stage=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2xtp2-sp-zero2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"]),
    "cp2": (2, ["parallel.cp=2"]),
    "cp2-zero3": (2, ["parallel.cp=2", "parallel.zero_stage=3"]),
    "dp2xcp2-zero2": (4, ["parallel.cp=2", "parallel.zero_stage=2"]),
    "dp2xpp2-zero1": (4, ["parallel.pp=2", "parallel.zero_stage=1"]),
    # The head and loss in chunks of 24 tokens (64 per micro-batch: the last chunk short).
    "dp2-zero2-loss-chunk": (2, ["parallel.zero_stage=2", "train.loss_chunk=24"]),
}


def _train(preset: str, args: list[str], run_dir, cache_dir, nproc: int = 1):
    p = run_cli(["train", preset, "--run-dir", str(run_dir), *sets(*args)], cache_dir, nproc=nproc)
    (run_dir / "stdout.txt").write_text(p.stdout)
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The single-process run every layout is compared with."""
    root = tmp_path_factory.mktemp("ref")
    from tests.conftest import make_corpus

    corpus = make_corpus(root / "corpus")
    rows, evals = _train(GPT, [*GPT_ARGS, f"data.source={corpus}"], root / "one", cache_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it trains, so parity is not trivial
    return corpus, rows, evals, root / "one"


@pytest.fixture(scope="module")
def llama_reference(reference, tmp_path_factory, cache_dir):
    """The single-process run of the Llama-shaped decoder, on the same corpus."""
    root = tmp_path_factory.mktemp("llama")
    rows, evals = _train(GPT, [*LLAMA_ARGS, f"data.source={reference[0]}"], root / "one", cache_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert all(0 < r["z_loss"] < r["loss"] for r in rows)  # logged as its own metric
    return reference[0], rows, evals, root / "one"


@pytest.fixture(scope="module")
def mup_reference(reference, tmp_path_factory, cache_dir):
    """The single-process μP run: it trains, and not as the standard parametrisation does."""
    root = tmp_path_factory.mktemp("mup")
    rows, evals = _train(GPT, [*MUP_ARGS, f"data.source={reference[0]}"], root / "one", cache_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    sp, _ = _train(GPT, [*GPT_ARGS, f"data.source={reference[0]}", "model.tie_embeddings=false"], root / "sp", cache_dir)
    assert [r["lr"] for r in rows] == [r["lr"] for r in sp]  # the base rate is logged
    assert min(abs(a["loss"] - b["loss"]) for a, b in zip(rows[1:], sp[1:], strict=True)) > 1e-3
    return reference[0], rows, evals, root / "one"


def assert_same_run(ref_rows, rows, ref_evals, evals) -> None:
    """Same losses, gradient norms and validation loss; and the same per-layer-group gradient
    norms and update ratios."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"]), (a, b)
        _assert_same_layer_stats(a, b)
    assert abs(ref_evals[-1]["val_loss"] - evals[-1]["val_loss"]) < 1e-5
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(ref_rows, rows, strict=True))
    print(f"max loss difference {worst:.2e}")  # for the record (pytest -s)


def _assert_same_layer_stats(a: dict, b: dict) -> None:
    """Each element of a weight or gradient counted once in every layout (shards, replicas,
    pipeline-tied copies, ZeRO-3 partitions): the groups' norms agree like the global one."""
    ratios = {k for k in a if k.startswith("update_ratio/")}
    grads = {k for k in a if k.startswith("grad_norm/")}
    assert ratios and grads and ratios <= b.keys() and grads <= b.keys(), sorted(b)
    for k in ratios:
        assert b[k] == pytest.approx(a[k], rel=1e-3), (k, a[k], b[k])
    for k in grads:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])


@pytest.mark.parametrize("layout", [*LAYOUTS, *(f"llama-{name}" for name in LLAMA_LAYOUTS),
                                    *(f"mup-{name}" for name in MUP_LAYOUTS)])
def test_layout_matches_single_process(layout, request, cache_dir, tmp_path):
    kind = layout.split("-")[0] if layout.startswith(("llama-", "mup-")) else ""
    llama = kind == "llama"
    reference = request.getfixturevalue(f"{kind}_reference" if kind else "reference")
    corpus, ref_rows, ref_evals, _ = reference
    nproc, extra = LAYOUTS[layout.removeprefix(f"{kind}-")]
    args = {"llama": LLAMA_ARGS, "mup": MUP_ARGS}.get(kind, GPT_ARGS)
    rows, evals = _train(GPT, [*args, f"data.source={corpus}", *extra], tmp_path / layout, cache_dir, nproc)
    assert_same_run(ref_rows, rows, ref_evals, evals)
    if llama and "pp2" not in layout:  # the z-loss metric, averaged over replicas like the loss
        assert all(abs(a["z_loss"] - b["z_loss"]) < 1e-7 for a, b in zip(ref_rows, rows, strict=True))
    resolved = yaml.safe_load((tmp_path / layout / "config.yaml").read_text())["parallel"]
    assert resolved["dp"] * resolved["tp"] * resolved["pp"] * resolved["cp"] == nproc
    _assert_analytic_traffic(rows[-1], tmp_path / layout)
    if resolved["cp"] > 1:  # split for real (whole sequences on every rank would also match)
        assert "each of 2 ranks holds 16 of every 32 tokens" in (tmp_path / layout / "stdout.txt").read_text()
    # The checkpoint consolidates to the single-process run's weights, whatever its layout
    # (Adam divides by sqrt(v): rounding-level differences grow to ~1e-5 in 6 steps).
    from trainer.checkpoint import load_model_state, resolve

    whole, ref_w = load_model_state(resolve(tmp_path / layout)), load_model_state(resolve(reference[3]))
    assert whole.keys() == ref_w.keys()
    assert max((whole[k] - ref_w[k]).abs().max().item() for k in whole) < 1e-4
    if layout == "dp2-zero3":  # export writes the consolidated ZeRO-3 weights
        from safetensors.torch import load_file

        run_cli(["export", str(tmp_path / layout), "--format", "safetensors", "--out", str(tmp_path / "x")], cache_dir)
        exported = load_file(tmp_path / "x" / "model.safetensors")
        assert len(exported) > 10 and all(torch.equal(exported[k], whole[k]) for k in exported)


# bf16: DeepSpeed's bf16 weights, fp32 master weights and fp32 gradient accumulation (ZeRO ≥ 1
# wherever a rank accumulates micro-batches; the ZeRO-0 row has one micro-batch per rank and runs
# DeepSpeed's unfused fp16/bf16 wrapper). A gentler learning rate than GPT_ARGS': at 1e-2 the tiny
# model's loss spikes at step 4 and amplifies rounding ~30×, which tests chaos, not the layouts.
BF16_ARGS = [*GPT_ARGS, "train.precision=bf16", "train.lr=3e-3"]
ZERO1 = ["parallel.zero_stage=1"]
BF16_LAYOUTS = {
    "dp2-zero0": (2, ["train.micro_batch_size=4"]),
    "dp2-zero1": LAYOUTS["dp2-zero1"],
    "dp2-zero2": LAYOUTS["dp2-zero2"],
    "dp2-zero3": LAYOUTS["dp2-zero3"],
    "tp2": (2, [*LAYOUTS["tp2"][1], *ZERO1]),
    "tp2-sp": (2, [*LAYOUTS["tp2-sp"][1], *ZERO1]),
    "cp2": (2, [*LAYOUTS["cp2"][1], *ZERO1]),
    "pp2": (2, [*LAYOUTS["pp2"][1], *ZERO1]),
    "tp2xpp2": (4, [*LAYOUTS["tp2xpp2"][1], *ZERO1]),
}
# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3. Every layout starts from the
# same bf16 weights; after each update the fp32 masters, which differ only in summation order,
# round to bf16 weights a neighbouring value apart here and there. Losses (means of ~256 fp32
# token losses) agree within u absolute, gradient norms within 8 u relative, and the weights
# within bf16's epsilon 2 u in relative norm. (Measured on 2 vCPUs: ≤ 3e-4, ≤ 1.2 % and on
# another AMD EPYC 1.75 % (tp2-sp, step 6: the CPU's bf16 kernels round differently), ≤ 3.4e-3;
# DeepSpeed's zero-gradient Adam step at ZeRO 0, a missed tensor-parallel mark: 2.4e-2, 6-18 %.)
BF16_U = 2.0**-8


@pytest.fixture(scope="module")
def bf16_reference(reference, tmp_path_factory, cache_dir):
    """One process in bf16 (ZeRO 1 at dp 1: the fp32 accumulation of four micro-batches)."""
    root = tmp_path_factory.mktemp("bf16")
    rows, evals = _train(GPT, [*BF16_ARGS, f"data.source={reference[0]}", *ZERO1], root / "one", cache_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    return reference[0], rows, evals, root / "one"


@pytest.mark.parametrize("layout", list(BF16_LAYOUTS))
def test_bf16_layout_matches_single_process(layout, bf16_reference, cache_dir, tmp_path):
    corpus, ref_rows, ref_evals, ref_dir = bf16_reference
    nproc, extra = BF16_LAYOUTS[layout]
    rows, evals = _train(GPT, [*BF16_ARGS, f"data.source={corpus}", *extra], tmp_path / layout, cache_dir, nproc)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows, strict=True):
        assert abs(a["loss"] - b["loss"]) < BF16_U, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 8 * BF16_U * a["grad_norm"], (a, b)
    assert abs(ref_evals[-1]["val_loss"] - evals[-1]["val_loss"]) < BF16_U
    from trainer.checkpoint import load_model_state, resolve

    whole, ref_w = load_model_state(resolve(tmp_path / layout)), load_model_state(resolve(ref_dir))
    assert whole.keys() == ref_w.keys()
    diff = sum((whole[k] - ref_w[k]).norm() ** 2 for k in whole) ** 0.5
    assert diff < 2 * BF16_U * sum(ref_w[k].norm() ** 2 for k in ref_w) ** 0.5
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(ref_rows, rows, strict=True))
    print(f"max loss difference {worst:.2e}")  # for the record (pytest -s)


@pytest.mark.parametrize("layout", ["dp2-zero1", "tp2"])
def test_document_masking_matches_single_process(layout, reference, cache_dir, tmp_path):
    """data.document_mask: the per-window masks and restarting positions give every layout the
    single process's losses (under tp each rank's heads take the same mask)."""
    args = [*GPT_ARGS, f"data.source={reference[0]}", "data.document_mask=true", "model.position=rope"]
    one, one_evals = _train(GPT, args, tmp_path / "one", cache_dir)
    nproc, extra = LAYOUTS[layout]
    rows, evals = _train(GPT, [*args, *extra], tmp_path / layout, cache_dir, nproc)
    assert_same_run(one, rows, one_evals, evals)
    plain, _ = _train(GPT, [*GPT_ARGS, f"data.source={reference[0]}", "model.position=rope"], tmp_path / "plain", cache_dir)
    # The masks change what is computed (in the steps whose windows hold a document boundary).
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(plain, one, strict=True)) > 1e-3


def _assert_analytic_traffic(row: dict, run_dir) -> None:
    """Rank 0's counted collectives of the tensor, sequence and context-parallel regions (our
    own) equal ``trainer/accounting/comm_volume.py``'s formulas, to DeepSpeed's few scalars (a gradient
    norm) on the same groups. DeepSpeed's ZeRO and pipeline traffic is compared, with its
    differences explained, in docs/benchmarks.md (``python -m tools.bench_comm``)."""
    from tools.bench_comm import measured
    from trainer.accounting.comm_volume import step_shape, volumes
    from trainer.config import load_config

    shape = step_shape(load_config(str(run_dir / "config.yaml"), []))
    got, want = measured(row), volumes(shape)
    # (With dp 1, DeepSpeed's data group is the cp group: its ZeRO traffic lands on "cp.*".)
    ours = [k for k in want if k in ("tp.all_reduce", "tp.reduce_scatter", "cp.all_to_all")
            or (k == "tp.all_gather" and shape.pp == 1)]
    assert ours or shape.tp * shape.cp == 1
    for key in ours:
        assert 0 <= got.get(key, 0) - want[key] <= 16, (key, got, want)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_dropout_survives_activation_recomputation(sp, reference, cache_dir, tmp_path):
    """Dropout on under tp2: recomputing a block in backward must redraw exactly the masks of
    its forward, in replicated regions and in each rank's own head-parallel region (with
    sequence parallelism: in each rank's own part of the sequence), so the run with activation
    checkpointing equals the run without it."""
    corpus = reference[0]
    base = [*GPT_ARGS, f"data.source={corpus}", "model.dropout=0.2", "parallel.tp=2",
            f"parallel.sequence_parallel={str(sp).lower()}"]
    plain, _ = _train(GPT, base, tmp_path / "plain", cache_dir, 2)
    ckpt, _ = _train(GPT, [*base, "train.activation_checkpointing=true"], tmp_path / "ckpt", cache_dir, 2)
    assert [r["loss"] for r in plain] == [r["loss"] for r in ckpt]
    assert [r["grad_norm"] for r in plain] == [r["grad_norm"] for r in ckpt]


@pytest.mark.parametrize("mup", [False, True], ids=["sp", "mup"])
def test_encoder_decoder_tensor_parallel_matches_single_process(mup, cache_dir, tmp_path):
    """Label smoothing on (the vocab-parallel loss computes it across shards), and decoding
    metrics at the end (evaluation mode gathers whole logits). Under μP (twice the base width)
    each shard keeps its parameter's learning-rate factor; the μP run is not the standard one."""
    args = [*ENCDEC_ARGS, "model.mup.base_width=16", "model.mup.output_mult=2"] if mup else ENCDEC_ARGS
    ref_rows, ref_evals = _train(ENCDEC, args, tmp_path / "one", cache_dir)
    rows, evals = _train(ENCDEC, [*args, "parallel.tp=2"], tmp_path / "tp2", cache_dir, nproc=2)
    assert_same_run(ref_rows, rows, ref_evals, evals)
    if mup:
        sp_rows, _ = _train(ENCDEC, ENCDEC_ARGS, tmp_path / "sp", cache_dir)
        assert min(abs(a["loss"] - b["loss"]) for a, b in zip(ref_rows[1:], sp_rows[1:], strict=True)) > 1e-3
    for key in ("val_exact_match", "val_bleu", "val_chrf"):
        assert evals[-1][key] == pytest.approx(ref_evals[-1][key], abs=1e-6)


def test_resharding_between_layouts(reference, cache_dir, tmp_path):
    """tp2×pp2 ► one process and one process ► tp2: whole weights are consolidated from the
    saved shards and stages, then sharded the new way (``train.init_from`` a checkpoint);
    the new layout's evaluation before its first step equals the old run's last one. (Resuming
    a run directory in another layout, optimizer included: ``test_reshard.py``.)"""
    from safetensors.torch import load_file

    from trainer.checkpoint import load_model_state, resolve

    corpus, ref_rows, ref_evals, ref_dir = reference
    base = [*GPT_ARGS, f"data.source={corpus}"]
    _, evals_3d = _train(GPT, [*base, "parallel.tp=2", "parallel.pp=2"], tmp_path / "3d", cache_dir, 4)
    whole = load_model_state(resolve(tmp_path / "3d"))
    ref_w = load_model_state(resolve(ref_dir))
    assert whole.keys() == ref_w.keys()
    assert max((whole[k] - ref_w[k]).abs().max().item() for k in whole) < 1e-4

    then = ["train.steps=1", "eval.at_start=true"]
    _, evals_1 = _train(GPT, [*base, *then, f"train.init_from={tmp_path / '3d'}"], tmp_path / "to1", cache_dir)
    assert evals_1[0]["step"] == 0
    assert abs(evals_1[0]["val_loss"] - evals_3d[-1]["val_loss"]) < 1e-5
    _, evals_tp = _train(GPT, [*base, *then, "parallel.tp=2", f"train.init_from={ref_dir}"],
                         tmp_path / "totp2", cache_dir, 2)
    assert abs(evals_tp[0]["val_loss"] - ref_evals[-1]["val_loss"]) < 1e-5

    # Export writes the same whole weights, from any layout.
    run_cli(["export", str(tmp_path / "3d"), "--format", "safetensors", "--out", str(tmp_path / "x")], cache_dir)
    exported = load_file(next((tmp_path / "x").glob("*.safetensors")))
    assert len(exported) > 10 and exported.keys() <= whole.keys()  # tied weights stored once
    assert all(torch.equal(exported[k], whole[k]) for k in exported)
