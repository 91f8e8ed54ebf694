"""The GPU check script, dry-run on the CPU so that it cannot rot between sessions lent a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, cli_env


def test_gpu_check_dry_run_writes_every_figure(tmp_path, cache_dir):
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO,
                       env=cli_env(cache_dir), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["dry_run"] is True
    failed = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and not v.get("ok", True)}
    assert not failed
    for name in ("base", "compile", "zero2", "activation_checkpointing"):
        t = r["throughput"][name]
        assert t["tokens_per_s"] > 0 and 0 < t["mfu"] <= 1 and t["peak_memory_mb"] > 0
    assert r["compile_speedup"] > 0
    # ZeRO-2 on one rank is the same optimizer as ZeRO-0: the same losses (fp32).
    assert r["zero2"]["loss_diff_vs_zero0"] < 1e-5
    assert set(r["planner"]) - {"ok", "seconds"} == {"base", "zero2", "activation_checkpointing"}
    assert all(v["predicted_mb"] > 0 for k, v in r["planner"].items() if isinstance(v, dict))
    # Flash and math attention, fused and foreach AdamW, ours and transformers' GPT-2: equal.
    assert r["sdpa"]["abs_diff"] < 1e-4
    assert r["adamw"]["max_abs_weight_diff"] < 1e-5
    assert r["hf_export"]["max_abs_logit_diff"] < 1e-4
    # Two processes (gloo here, NCCL on two GPUs): 1 + 2 everywhere, a bandwidth figure.
    assert r["nccl"]["correct"] is True and r["nccl"]["busbw_gb_s"] > 0 and r["nccl"]["backend"] == "gloo"
    assert all(isinstance(r[k].get("seconds"), float) for k in ("throughput", "sdpa", "nccl"))


def test_each_part_has_its_own_limit_and_the_json_is_written_after_each(tmp_path, monkeypatch):
    """A part that hangs is recorded as timed out; what the parts before it measured is on disk
    before the next starts."""
    import time

    from tools import gpu_check

    monkeypatch.setitem(gpu_check.LIMITS_S, "sdpa", 1)
    results: dict = {}
    gpu_check._attempt(results, "adamw", lambda: {"figure": 1.0}, tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["adamw"]["figure"] == 1.0
    gpu_check._attempt(results, "sdpa", lambda: time.sleep(30) or {}, tmp_path)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["sdpa"]["error"] == "timed out after 1 s" and on_disk["sdpa"]["seconds"] < 5
    assert on_disk["adamw"]["ok"] is True


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path, cache_dir):
    p = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                       env={**cli_env(cache_dir), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--dry-run" in p.stderr
