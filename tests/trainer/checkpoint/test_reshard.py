"""Resume in another layout, optimizer included: 4 steps in layout A, then 4 in layout B, equal
8 steps straight in one process (fp32, dropout 0) within 2e-5 per step; and the moments each
rank of the new layout holds equal the checkpoint's consolidated ones exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, make_corpus, read_metrics, run_cli, sets
from tests.trainer.parallel.test_layouts import (
    ENCDEC,
    ENCDEC_ARGS,
    GPT,
    GPT_ARGS,
    LLAMA_ARGS,
    MUP_ARGS,
)
from trainer.launch import torchrun

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=16", "checkpoint.every=4"]
LAYOUTS = {
    "one": (1, []),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "cp2-zero2": (2, ["parallel.cp=2", "parallel.zero_stage=2"]),
    "cp2-zero3": (2, ["parallel.cp=2", "parallel.zero_stage=3"]),
    # bf16 accumulates micro-batches in fp32 only under ZeRO (trainer/config.py says why).
    "one-zero1": (1, ["parallel.zero_stage=1"]),
    "dp2-zero0-mb4": (2, ["train.micro_batch_size=4"]),
    "tp2xpp2-zero1": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"]),
}
DESCRIBED = {"one": "dp 1, tp 1, pp 1, zero 0", "dp2-zero1": "dp 2, tp 1, pp 1, zero 1",
             "dp2-zero2": "dp 2, tp 1, pp 1, zero 2", "dp2-zero3": "dp 2, tp 1, pp 1, zero 3",
             "tp2": "dp 1, tp 2, pp 1, zero 0", "tp2xpp2": "dp 1, tp 2, pp 2, zero 0",
             "cp2-zero2": "dp 1, tp 1, pp 1, cp 2, zero 2", "cp2-zero3": "dp 1, tp 1, pp 1, cp 2, zero 3",
             "one-zero1": "dp 1, tp 1, pp 1, zero 1", "dp2-zero0-mb4": "dp 2, tp 1, pp 1, zero 0",
             "tp2xpp2-zero1": "dp 1, tp 2, pp 2, zero 1"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """16 steps in one process: what every chain of layouts must reproduce."""
    root = tmp_path_factory.mktemp("reshard")
    corpus = make_corpus(root / "corpus")
    args = [*GPT_ARGS, f"data.source={corpus}", *STEPS]
    run_cli(["train", GPT, "--run-dir", str(root / "straight"), *sets(*args)], cache_dir)
    rows, _ = read_metrics(root / "straight")
    return args, {r["step"]: r for r in rows}, root / "straight"


def _chain(layouts: list[str], args: list[str], run_dir, cache_dir, preset: str = GPT) -> dict[int, dict]:
    """Segments of 4 steps, each in the next layout, in one run directory."""
    for i, name in enumerate(layouts):
        nproc, extra = LAYOUTS[name]
        stop = {"SEQTRAIN_FAULT": f"usr1@{4 * (i + 1)}"} if i + 1 < len(layouts) else {}
        p = run_cli(["train", preset, "--run-dir", str(run_dir), *sets(*args, *extra)], cache_dir,
                    nproc=nproc, env=stop)
        if i and name != layouts[i - 1]:  # (the same layout resumes through DeepSpeed)
            said = f"resharded step_{4 * i:08d} from {DESCRIBED[layouts[i - 1]]} to {DESCRIBED[name]}"
            assert said in p.stdout, p.stdout[-2000:]
    rows, _ = read_metrics(run_dir)
    return {r["step"]: r for r in rows}


def _assert_same_losses(ref: dict[int, dict], got: dict[int, dict], steps: int) -> float:
    assert sorted(got) == list(range(1, steps + 1))
    worst = 0.0
    for s in range(1, steps + 1):
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
        worst = max(worst, abs(got[s]["loss"] - ref[s]["loss"]))
        assert abs(got[s]["loss"] - ref[s]["loss"]) < 2e-5, (s, ref[s], got[s])
    segments = [max(abs(got[s]["loss"] - ref[s]["loss"]) for s in range(a, min(a + 4, steps + 1)))
                for a in range(1, steps + 1, 4)]
    print(f"max loss difference {worst:.2e}; per 4-step segment: "  # for the record (pytest -s)
          + ", ".join(f"{d:.1e}" for d in segments))
    return worst


def test_one_to_zero2_to_tp2xpp2_to_one(straight, cache_dir, tmp_path):
    args, ref, _ = straight
    got = _chain(["one", "dp2-zero2", "tp2xpp2", "one"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)


def test_context_parallel_zero3_to_one_to_zero2_to_one(straight, cache_dir, tmp_path):
    """ZeRO partitions over dp · cp ranks: read from and written into context-parallel layouts."""
    args, ref, _ = straight
    got = _chain(["cp2-zero3", "one", "cp2-zero2", "one"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)


def test_llama_shape_zero3_to_tp2xpp2_to_cp2_to_one(straight, cache_dir, tmp_path):
    """The Llama-shaped decoder (grouped-query attention, SwiGLU, untied head, z-loss) resumes
    across layouts with its optimizer as exactly as the GPT-2 shape."""
    args = [*LLAMA_ARGS, *straight[0][len(GPT_ARGS):]]
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "straight"), *sets(*args)], cache_dir)
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight")[0]}
    got = _chain(["dp2-zero3", "tp2xpp2", "cp2-zero2", "one"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)


def test_mup_zero1_to_tp2xpp2_to_one(straight, cache_dir, tmp_path):
    """μP's per-group learning rates survive resume in layouts whose optimizers group the
    parameters differently (a pipeline stage holds its own layers' groups only)."""
    args = [*MUP_ARGS, *straight[0][len(GPT_ARGS):]]
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "straight"), *sets(*args)], cache_dir)
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight")[0]}
    got = _chain(["dp2-zero1", "tp2xpp2", "one"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)


def test_encoder_decoder_mup_zero1_to_tp2_to_one(cache_dir, tmp_path):
    """The encoder-decoder's μP groups (twice the base width) survive resume in other layouts."""
    args = [*ENCDEC_ARGS, "model.mup.base_width=16", "model.mup.output_mult=2", "eval.decode_samples=0", *STEPS]
    run_cli(["train", ENCDEC, "--run-dir", str(tmp_path / "straight"), *sets(*args)], cache_dir)
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight")[0]}
    got = _chain(["dp2-zero1", "tp2", "one"], args, tmp_path / "run", cache_dir, ENCDEC)
    _assert_same_losses(ref, got, 16)


def test_zero3_to_tp2_to_zero1(straight, cache_dir, tmp_path):
    args, ref, _ = straight
    got = _chain(["dp2-zero3", "tp2", "dp2-zero1"], args, tmp_path / "run", cache_dir)
    _assert_same_losses(ref, got, 16)
    # Every rank's resharded master weights and moments equal the consolidated originals.
    ckpt = tmp_path / "run/checkpoints/step_00000016"  # saved under ZeRO-1
    for target in ("dp2-zero3", "dp2-zero2", "tp2xpp2"):
        nproc, extra = LAYOUTS[target]
        launcher = [*torchrun(nproc)] if nproc > 1 else [sys.executable]
        p = subprocess.run([*launcher, str(REPO / "tests/trainer/checkpoint/reshard_worker.py"), str(ckpt), GPT,
                            *args, *extra], cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("moments and step 16 equal") == nproc, p.stdout


def test_bf16_resumes_exactly_and_reshards_within_bf16_rounding(straight, cache_dir, tmp_path):
    """bf16 checkpoints hold DeepSpeed's bf16 weights beside fp32 masters: the unfused wrapper's
    at ZeRO 0, ``BF16_Optimizer``'s (``bf16_zero_pp_rank_*`` files) at ZeRO 1 and in pipelines,
    ZeRO 2/3's own. Resumed in its own layout a run is bitwise the straight one; resharded
    through every optimizer kind it stays within the bf16 parity matrix's tolerance
    (``test_layouts.BF16_U``: the fp32 masters carry over, the bf16 weights are rounded from
    them, as at every step)."""
    from tests.trainer.parallel.test_layouts import BF16_U

    args = [*straight[0], "train.precision=bf16", "train.lr=3e-3"]
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "straight"), *sets(*args, "parallel.zero_stage=1")],
            cache_dir)
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight")[0]}
    same = _chain(["one-zero1", "one-zero1"], args, tmp_path / "same", cache_dir)
    assert [same[s]["loss"] for s in sorted(same)] == [ref[s]["loss"] for s in sorted(ref)]
    got = _chain(["dp2-zero0-mb4", "tp2xpp2-zero1", "dp2-zero3", "one-zero1"], args, tmp_path / "run", cache_dir)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert abs(got[s]["loss"] - ref[s]["loss"]) < BF16_U, (s, ref[s], got[s])
    print(f"max loss difference {max(abs(got[s]['loss'] - ref[s]['loss']) for s in ref):.2e}")


def test_old_checkpoints_without_parameter_names_are_refused_in_one_line(straight, tmp_path):
    """A ZeRO-0 checkpoint saved before its optimizer's parameter names were recorded cannot
    be resharded (its state is by index); it still resumes in its own layout."""
    import shutil

    import torch

    from trainer.checkpoint import reshard, saved_config
    from trainer.errors import CheckpointError

    src = straight[2] / "checkpoints/step_00000016"
    old = tmp_path / "old"
    shutil.copytree(src, old)
    f = old / "mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=False)
    assert states.pop(reshard.NAMES_KEY) is not None
    torch.save(states, f)
    with pytest.raises(CheckpointError, match="saved before checkpoints named their optimizer's parameters"):
        reshard.read(old, saved_config(old))


def _as_format_1(ckpt) -> None:
    """Rewrite a ZeRO-0 checkpoint the way seqtrain wrote it before the q/k/v fusion: separate
    q/k/v weights and Adam moments (each rank's own heads), no ``format`` in the manifest."""
    import json

    import torch

    from models.fused_qkv import unfuse
    from trainer.checkpoint import MANIFEST, reshard, saved_config, sha256_file

    head_dim = saved_config(ckpt).model.d_model // saved_config(ckpt).model.n_head

    def split(name: str) -> list[str] | None:
        return [name.replace("c_attn", f"{x}_proj") for x in "qkv"] if ".c_attn." in name else None

    for f in ckpt.glob("mp_rank_*_model_states.pt"):
        st = torch.load(f, weights_only=False)
        module = {}
        for k, v in st["module"].items():
            module.update(zip(split(k), unfuse(v, head_dim, 3), strict=True) if split(k) else {k: v})
        st["module"] = module
        opt, names = st["optimizer"], st[reshard.NAMES_KEY]
        name_of = dict(zip([i for g in opt["param_groups"] for i in g["params"]], names, strict=True))
        state, new_names = {}, []
        for g in opt["param_groups"]:
            params = []
            for i in g["params"]:
                name, old = name_of[i], opt["state"][i]
                parts = split(name) or [name]
                pieces = ({k: unfuse(old[k], head_dim, 3) for k in ("exp_avg", "exp_avg_sq")} if split(name)
                          else {k: [old[k]] for k in ("exp_avg", "exp_avg_sq")})
                for j, part in enumerate(parts):
                    state[len(state)] = {"step": old["step"].clone(), **{k: v[j].clone() for k, v in pieces.items()}}
                    params.append(len(state) - 1)
                    new_names.append(part)
            g["params"] = params
        opt["state"], st[reshard.NAMES_KEY] = state, new_names
        torch.save(st, f)
    m = json.loads((ckpt / MANIFEST).read_text())
    assert m.pop("format") == 2
    for rel in m["files"]:
        m["files"][rel] = {"size": (ckpt / rel).stat().st_size, "sha256": sha256_file(ckpt / rel)}
    (ckpt / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("first", ["one", "tp2"])
def test_checkpoints_from_before_the_fused_qkv_resume_exactly(straight, cache_dir, tmp_path, first):
    """A run saved with separate q/k/v tensors resumes, weights and Adam moments mapped, with
    the losses of the straight run (in one process and under tp2, where each rank held its own
    heads' q, k and v)."""
    args, ref, _ = straight
    run = tmp_path / "run"
    nproc, extra = LAYOUTS[first]
    run_cli(["train", GPT, "--run-dir", str(run), *sets(*args, *extra)], cache_dir, nproc=nproc,
            env={"SEQTRAIN_FAULT": "usr1@4"})
    _as_format_1(run / "checkpoints/step_00000004")
    p = run_cli(["train", GPT, "--run-dir", str(run), *sets(*args)], cache_dir, env={"SEQTRAIN_FAULT": "usr1@8"})
    assert "resharded step_00000004" in p.stdout, p.stdout[-2000:]
    rows, _ = read_metrics(run)
    _assert_same_losses(ref, {r["step"]: r for r in rows}, 8)
