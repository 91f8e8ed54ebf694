"""The layout planner: its parameter count is the model's, its model-state bytes are the ZeRO
paper's, its layouts are the ones the trainer accepts, and bad input is one line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from trainer.accounting.planner import Layout, Shape, candidates, memory_bytes, plan
from trainer.config import load_config

PRESET = "configs/gpt/gpt2-1.5b.yaml"


def test_json_plan_of_the_1_5b_preset_on_8_gpus(cache_dir):
    p = run_cli(["plan", PRESET, "--gpus", "8", "--gpu-memory-gb", "80", "--json"], cache_dir)
    out = json.loads(p.stdout)  # stdout is the JSON alone
    from trainer.parallel.materialize import reference_model

    # The preset's 50,257-token BPE padded to its vocab_multiple (64): 50,304 rows.
    assert out["params"] == reference_model(load_config(PRESET, ["model.vocab_size=50304"])).num_params()
    keys = {"dp", "tp", "pp", "zero_stage", "micro_batch_size", "activation_checkpointing", "memory_gb",
            "fits", "step_time_s", "mfu"}
    assert out["layouts"] and all(keys <= set(r) for r in out["layouts"])
    assert all({"params", "grads", "optimizer", "activations", "total"} <= set(r["memory_gb"]) for r in out["layouts"])
    assert all(r["dp"] * r["tp"] * r["pp"] == 8 for r in out["layouts"])
    fitting = [r for r in out["layouts"] if r["fits"]]
    assert fitting and out["layouts"][: len(fitting)] == fitting  # fitting first, fastest first
    assert [r["step_time_s"] for r in fitting] == sorted(r["step_time_s"] for r in fitting)
    assert all(r["memory_gb"]["total"] <= 80 for r in fitting)
    assert all(0 < r["mfu"] <= 0.5 for r in out["layouts"])  # never above the assumed efficiency


def test_model_states_are_the_zero_papers_figures():
    """Rajbhandari et al. 2020, figure 1: 7.5 B parameters, Adam in mixed precision, 64 data
    ranks: 120 GB per GPU without ZeRO, 31.4 with optimizer partitioning, 16.6 adding gradients,
    1.9 adding parameters."""
    s = Shape(params=7_500_000_000, block_params=7_500_000_000, embedding_params=0, n_layer=1, d_model=4096,
              vocab=1, seq_len=1, global_batch=64, flops_per_token=1.0, bytes_per_value=2,
              mixed_precision=True, dropout=False)
    states = []
    for zero in range(4):
        m = memory_bytes(s, Layout(64, 1, 1, zero, 1, False))
        states.append(round((m["params"] + m["grads"] + m["optimizer"]) / 1e9, 1))
    assert states == [120.0, 31.4, 16.6, 1.9]


def test_what_each_switch_saves_and_which_layouts_are_offered():
    # 20 heads, 36 blocks; bf16 accumulation, so that ZeRO 0 with accumulation is offered
    cfg = load_config("configs/gpt/gpt2-774m.yaml", ["train.grad_accum_dtype=bf16"])
    rows = plan(cfg, 8)["layouts"]
    fp32_accum = plan(load_config("configs/gpt/gpt2-774m.yaml", []), 8)["layouts"]
    zero0 = [r for r in fp32_accum if r["zero_stage"] == 0]
    assert zero0 and all(256 // r["dp"] // r["micro_batch_size"] == 1 for r in zero0)  # one micro-batch only
    assert [r for r in fp32_accum if r["dp"] == 1 and r["zero_stage"] == 1]  # ZeRO 1 even on one data rank
    by = {(r["dp"], r["tp"], r["pp"], r["zero_stage"], r["micro_batch_size"], r["activation_checkpointing"]): r
          for r in rows}
    a, b = by[(8, 1, 1, 0, 2, False)], by[(8, 1, 1, 0, 2, True)]
    # Checkpointing keeps one of a block's 16 sbh-sized tensors (and recomputes one block); the
    # head's logits stay: under a third of the activations here.
    assert b["memory_gb"]["activations"] < a["memory_gb"]["activations"] / 3
    assert b["step_time_s"] > a["step_time_s"]  # the recomputed forward
    tp2 = by[(4, 2, 1, 0, 2, False)]
    assert tp2["memory_gb"]["params"] == pytest.approx(a["memory_gb"]["params"] / 2)
    states = [sum(by[(8, 1, 1, z, 2, False)]["memory_gb"][k] for k in ("params", "grads", "optimizer"))
              for z in range(4)]
    assert states == sorted(states, reverse=True)
    # ZeRO 2-3 never under a pipeline (DeepSpeed's pipeline engine refuses them).
    assert not [r for r in rows if r["pp"] > 1 and r["zero_stage"] > 1]
    assert {(r["tp"], r["pp"]) for r in rows} == {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (1, 4), (2, 4)}
    # Tensor ranks divide the heads (GPT-2 XL's 25: only tp 1 of 1, 2, 4, 8).
    assert {lay.tp for lay in candidates(load_config(PRESET, []), 8, 8)} == {1}


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8", "--gpu", "B300"], "--gpu 'B300' is not a GPU the planner knows (H200, H100, A100"),
    (["--gpus", "0"], "--gpus 0 --nodes 1: both must be at least 1"),
    (["--gpus", "8", "--gpu-memory-gb", "-4"], "--gpu-memory-gb -4.0: must be positive"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, cache_dir):
    p = run_cli(["plan", PRESET, *args], cache_dir, check=False)
    assert p.returncode == 2 and p.stderr.startswith(f"seqtrain: error: {message}")
    assert len(p.stderr.strip().splitlines()) == 1


def test_train_refuses_a_layout_that_cannot_fit_and_names_one_that_does():
    """``seqtrain train``'s check (on GPUs, before anything is allocated): the 7 B preset under
    ZeRO-3 on one 80 GiB GPU needs its 16 bytes per parameter alone (~99 GiB)."""
    from trainer.accounting.planner import GIB, check_fits
    from trainer.errors import ConfigError

    cfg = load_config("configs/gpt/gpt-7b.yaml", [])
    with pytest.raises(ConfigError, match=r"needs about 1\d\d\.\d GiB per GPU, the GPU has 80\.0 GiB .*no layout"):
        check_fits(cfg, 1, 1, 80 * GIB, "NVIDIA H100 80GB HBM3")
    with pytest.raises(ConfigError) as e:
        check_fits(load_config("configs/gpt/gpt-7b.yaml", ["parallel.zero_stage=0", "train.grad_accum_dtype=bf16"]),
                   8, 8, 80 * GIB, "H100")
    assert "the fastest that fits: parallel.tp=" in str(e.value) and len(str(e.value).splitlines()) == 1
    check_fits(cfg, 8, 8, 80 * GIB, "H100")  # ZeRO-3 over 8 GPUs fits: no error


def test_a_degree_that_does_not_divide_the_gpus_is_one_line(cache_dir):
    p = run_cli(["plan", PRESET, "--gpus", "8", "--set", "parallel.pp=3", "--set", "train.compile=false"], cache_dir, check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == ("seqtrain: error: parallel.tp=1 × parallel.pp=3 does not divide 8 GPUs; "
                                "choose degrees whose product divides the GPU count")


def test_step_communication_is_the_measured_volume_at_link_speed():
    """The planner times ``trainer/accounting/comm_volume.py``'s volumes, the ones the parity matrix
    measures (``test_layouts.py``): tp2 × pp2 inside a node, Megatron's per-layer count."""
    from trainer.accounting.comm_volume import StepShape, volumes, wire
    from trainer.accounting.planner import _gpu, comm_time_s

    gpu = _gpu("h100-80gb")
    s = Shape(params=0, block_params=1000, embedding_params=500, n_layer=4, d_model=64, vocab=256, seq_len=128,
              global_batch=8, flops_per_token=0.0, bytes_per_value=2, mixed_precision=True, dropout=False)
    lay = Layout(dp=1, tp=2, pp=2, zero_stage=0, micro_batch_size=2, activation_checkpointing=False)
    bsh = 2 * 128 * 64 * 2
    m, layers = 4, 2  # micro-batches per step, blocks of the first stage
    # Ring factors at n = 2: all-reduce 2(n-1)/n = 1, all-gather (n-1)/n = 1/2.
    tp = m * (1 + 4 * layers) * bsh * 1  # all-reduces: embedding, 2 forward + 2 backward per block (no head)
    tp += m * bsh / 2  # the boundary gradient's halves all-gathered on arrival
    p2p = 2 * m * bsh / 2 + 256 * 64 * 2 / 2 * 1  # 1/tp each way per micro-batch; the tied embedding
    x = StepShape(n_layer=4, d_model=64, seq_len=128, micro_batch=2, grad_accum=m, vocab=256, bytes_per_value=2,
                  held_params=(2 * 1000 + 500) // 2, tp=2, pp=2)
    assert wire(x, volumes(x))["tp"] == pytest.approx(tp)
    assert comm_time_s(s, lay, gpu, nodes=1) == pytest.approx((tp + p2p) / (gpu.intra_node_gbps * 1e9))


def test_the_llama_8b_preset_plans_on_8_and_64_gpus():
    """The Llama-3-8B shape (grouped-query attention, SwiGLU, untied 128k head) fits 8 and 64
    80 GiB GPUs under its ZeRO-3 layout; its activations count SwiGLU's four d_ff-wide tensors."""
    from trainer.accounting.planner import GIB, check_fits, shape_of

    cfg = load_config("configs/gpt/gpt-7b.yaml", [])
    s = shape_of(cfg)
    assert s.params == 8_030_261_248 and s.embedding_params == 128256 * 4096  # no position table
    assert s.sharded_widths == pytest.approx((32 + 2 * 8) / 32 + 1 + 4 * 14336 / 4096)
    for gpus in (8, 64):
        check_fits(cfg, gpus, 8, 80 * GIB, "NVIDIA H100 80GB HBM3")


def test_fp32_accumulation_and_whole_buckets_are_counted():
    """bf16 with fp32 accumulation: BF16_Optimizer's whole fp32 gradient buffer (+4 B/param
    without ZeRO and at ZeRO 1), the fp32 partition at ZeRO 2/3; DeepSpeed's reduce buckets
    allocated whole (two with overlap), not cut to the model's size."""
    base = dict(params=10**6, block_params=10**6, embedding_params=0, n_layer=1, d_model=64, vocab=1,
                seq_len=1, global_batch=8, flops_per_token=1.0, bytes_per_value=2, mixed_precision=True,
                dropout=False, bucket_elements=5e8)
    plain, fp32 = Shape(**base), Shape(**base, fp32_grad_accum=True)
    extra = [memory_bytes(fp32, Layout(8, 1, 1, z, 1, False))["grads"]
             - memory_bytes(plain, Layout(8, 1, 1, z, 1, False))["grads"] for z in range(4)]
    assert extra == [4e6, 4e6, 2e6 / 8, 2e6 / 8]
    one, two = (memory_bytes(Shape(**base, overlap_comm=o), Layout(8, 1, 1, 2, 1, False))["buffers"] for o in (False, True))
    assert two - one == 5e8 * 2 and one - 2**30 == 5e8 * 2  # whole buckets for a 1M-parameter model


def test_chunked_loss_plans_one_chunk_of_logits_and_the_two_gradients():
    """``train.loss_chunk``: the planner holds one chunk's logits (and their fp32 copy and
    gradient) plus the head input's and weight's gradients, where the trainer chunks."""
    shape = Shape(params=124_000_000, block_params=7_000_000, embedding_params=39_000_000, n_layer=12,
                  d_model=768, vocab=50304, seq_len=1024, global_batch=16, flops_per_token=1e9,
                  bytes_per_value=2, mixed_precision=True, dropout=False)
    one = Layout(dp=1, tp=1, pp=1, zero_stage=1, micro_batch_size=16, activation_checkpointing=False)
    whole = memory_bytes(shape, one)["activations"]
    auto = memory_bytes(Shape(**{**shape.__dict__, "loss_chunk": None}), one)["activations"]
    chunk = 2**26 // 50304
    kept = chunk * 50304 * 10 + 16 * 1024 * 768 * 2 + 4 * 50304 * 768
    assert whole - auto == pytest.approx(16 * 1024 * 50304 * 10 - kept)
    zero3 = Layout(**{**one.__dict__, "zero_stage": 3})  # whole logits there, as in the trainer
    assert memory_bytes(Shape(**{**shape.__dict__, "loss_chunk": None}), zero3)["activations"] == \
        memory_bytes(shape, zero3)["activations"]
