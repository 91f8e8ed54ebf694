"""Asynchronous saves (``checkpoint.async``): the snapshot is what ``torch.save`` would have
written at that moment; runs saved asynchronously resume exactly like synchronous ones; a crash
while a save is being written leaves the previous checkpoint as ``latest``."""

from __future__ import annotations

import io

import pytest
import torch

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.checkpoint import safe_load
from trainer.checkpoint.async_writer import snapshot

PRESET = str(REPO / "configs/gpt/debug.yaml")


def _saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_snapshot_is_what_torch_save_wrote_then_and_keeps_sharing():
    flat = torch.arange(12.0)
    state = {"module": {"a": flat[:6].view(2, 3), "b": flat[6:], "tied": flat[:6].view(2, 3)},
             "opt": [{"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}], "n": 7, "name": "x"}
    then = _saved_bytes(state)
    snap = snapshot(state)
    flat.mul_(-1)  # training goes on
    state["opt"][0]["exp_avg"].add_(1)
    assert _saved_bytes(snap) == then  # byte for byte: values, views, sharing, storage sizes
    m = snap["module"]
    assert m["a"].untyped_storage().data_ptr() == m["b"].untyped_storage().data_ptr()
    assert m["a"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()


def test_a_writer_that_fails_reports_its_error(tmp_path):
    from trainer.checkpoint.async_writer import AsyncSaver

    saver = AsyncSaver()
    saver.submit([({"x": torch.ones(2)}, tmp_path / "missing-dir" / "s.pt")], publish=lambda: None,
                 ckpt_root=tmp_path, tag="t")
    error, _, _ = saver.wait()
    assert error is not None and "missing-dir" in str(error)


def _save_twice(tmp_path, state: dict, device_update) -> list[tuple[bytes, list[int]]]:
    """Two asynchronous saves of ``state`` through an ``AsyncSaver``, each followed (after the
    train module's fence) by ``device_update``, as the next step's optimizer would: (what each
    file holds, the host buffers' addresses)."""
    from types import SimpleNamespace

    from trainer.checkpoint.async_writer import AsyncSaver

    saver, out = AsyncSaver(), []
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(save=None))
    for i in range(2):
        then = _saved_bytes({k: v.cpu() for k, v in state.items()})
        with saver.capture(engine) as writes:
            engine.checkpoint_engine.save(state, str(tmp_path / f"s{i}.pt"))
        saver.submit(writes, publish=lambda: None, ckpt_root=tmp_path, tag=f"t{i}")
        snap = writes[0][0]
        saver.fence()  # the next optimizer step's
        device_update()
        assert saver.wait()[0] is None
        got = torch.load(tmp_path / f"s{i}.pt")
        assert _saved_bytes(got) == then, "the file holds the values at the save"
        out.append([v.untyped_storage().data_ptr() for v in snap.values()])
        assert all(v.untyped_storage().is_pinned() == state["w"].is_cuda for v in snap.values())
    return out


def test_snapshot_buffers_are_reused_from_save_to_save(tmp_path):
    """The second save copies into the first one's host buffers (no allocation), and what it
    writes is still that moment's values."""
    state = {"w": torch.randn(1000), "m": torch.randn(300)}
    first, second = _save_twice(tmp_path, state, lambda: state["w"].mul_(-1))
    assert first == second


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_snapshot_copies_into_reused_pinned_buffers_on_a_side_stream(tmp_path):
    """On GPU: pinned host buffers, reused; the copies run on the saver's own stream while the
    training stream queues the next update behind the fence (a long kernel first, so an
    unfenced update would overtake the copy)."""
    torch.cuda.init()
    state = {"w": torch.randn(1 << 24, device="cuda"), "m": torch.randn(1 << 20, device="cuda")}

    def update():
        torch.cuda._sleep(50_000_000)  # about 20-50 ms of the training stream
        state["w"].mul_(-1)

    first, second = _save_twice(tmp_path, state, update)
    assert first == second


def _args(corpus, *extra):
    return [*TINY, f"data.source={corpus}", "train.steps=8", "train.global_batch_size=8",
            "model.dropout=0.1", "checkpoint.every=2", "checkpoint.keep_last=null", *extra]


def _losses(run_dir) -> dict[int, tuple[float, float]]:
    rows, _ = read_metrics(run_dir)
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def _module_states(run_dir, step: int) -> dict:
    return safe_load(run_dir / f"checkpoints/step_{step:08d}/mp_rank_00_model_states.pt")


def test_async_saves_resume_like_synchronous_ones(tiny_corpus, cache_dir, tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    run_cli(["train", PRESET, "--run-dir", str(sync), *sets(*_args(tiny_corpus))], cache_dir)
    first = run_cli(["train", PRESET, "--run-dir", str(asyn), *sets(*_args(tiny_corpus, "checkpoint.async=true"))],
                    cache_dir, env={"SEQTRAIN_FAULT": "usr1@4"})
    assert "saving step_00000002 behind training" in first.stdout
    assert "saved step_00000004" in first.stdout  # the last save is waited for before exit
    run_cli(["train", PRESET, "--run-dir", str(asyn), *sets(*_args(tiny_corpus, "checkpoint.async=true"))], cache_dir)
    assert _losses(asyn) == _losses(sync)  # bitwise, dropout on
    for step in (2, 4, 8):
        a, b = _module_states(sync, step), _module_states(asyn, step)
        for part in ("module", "optimizer"):
            flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
            assert flat_a.keys() == flat_b.keys()
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), (step, part)


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: v for key, sub in items for k, v in _flatten(sub, f"{prefix}.{key}").items()}


def test_a_crash_while_a_save_is_written_keeps_the_previous_checkpoint(tiny_corpus, cache_dir, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_cli(["train", PRESET, "--run-dir", str(straight), *sets(*_args(tiny_corpus))], cache_dir)
    args = _args(tiny_corpus, "checkpoint.async=true")
    # The save at step 4 stalls before writing; the process is SIGKILLed after step 5.
    p = run_cli(["train", PRESET, "--run-dir", str(crashed), *sets(*args)], cache_dir, check=False,
                env={"SEQTRAIN_FAULT": "slowsave@4,kill@5"})
    assert p.returncode == -9, p.stderr[-2000:]
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004").exists() and (ckpts / ".tmp/step_00000004").is_dir()
    resumed = run_cli(["train", PRESET, "--run-dir", str(crashed), *sets(*args)], cache_dir)
    assert "at step 2" in resumed.stdout
    assert _losses(crashed) == _losses(straight)


@pytest.mark.distributed
def test_async_saves_under_zero2_resume_like_synchronous_ones(tiny_corpus, cache_dir, tmp_path):
    """dp2 ZeRO-2: two writers agree over their own gloo group before rank 0 publishes."""
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    base = _args(tiny_corpus, "parallel.zero_stage=2")
    run_cli(["train", PRESET, "--run-dir", str(sync), *sets(*base)], cache_dir, nproc=2)
    run_cli(["train", PRESET, "--run-dir", str(asyn), *sets(*base, "checkpoint.async=true")], cache_dir, nproc=2,
            env={"SEQTRAIN_FAULT": "usr1@4"})
    run_cli(["train", PRESET, "--run-dir", str(asyn), *sets(*base, "checkpoint.async=true")], cache_dir, nproc=2)
    assert _losses(asyn) == _losses(sync)
    for f in (sync / "checkpoints/step_00000008").glob("*optim_states.pt"):
        a = safe_load(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        b = safe_load(asyn / "checkpoints/step_00000008" / f.name)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
