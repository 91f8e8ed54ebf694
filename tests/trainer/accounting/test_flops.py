"""MFU that cannot lie: a peak probed while another job shared the cores is measured again
when training beats it, the best figure a machine has shown is kept across runs, and a figure
still below the achieved rate gives way to it: MFU never exceeds 100 %."""

from __future__ import annotations

import pytest
import torch

from trainer.accounting import flops
from trainer.accounting.flops import PeakFlops, measured_peak

CPU = torch.device("cpu")


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """The start-up probe reads 1 GFLOP/s (cores shared); probing again reads 4 GFLOP/s."""
    monkeypatch.setenv("SEQTRAIN_CACHE", str(tmp_path))
    calls = []

    def contended(device, precision):
        calls.append("start-up")
        return 1e9

    def again(device, precision, reps):
        calls.append("again")
        return 4e9

    contended.__wrapped__ = again
    monkeypatch.setattr(flops, "matmul_peak", contended)
    return calls


def test_a_low_probe_is_measured_again_and_mfu_never_exceeds_one(probes, capsys):
    peak = PeakFlops(CPU, "fp32")
    assert peak.value == 1e9 and peak.mfu(0.5e9) == 0.5 and probes == ["start-up"]
    assert peak.mfu(2e9) == 0.5 and probes == ["start-up", "again"] and peak.value == 4e9
    assert peak.mfu(5e9) == 1.0  # beyond every probe: the achieved rate is the floor of the peak
    assert "above the peak figure" in capsys.readouterr().err
    assert peak.mfu(2.5e9) == 0.5


def test_the_best_figure_of_a_machine_is_kept_across_runs(probes):
    assert measured_peak(CPU, "fp32", fresh=True) == 4e9  # an uncontended probe, cached
    assert PeakFlops(CPU, "fp32").value == 4e9  # a later contended probe (1e9) does not win
    assert PeakFlops(CPU, "bf16").value == 1e9  # another precision: its own figure


def test_a_configured_peak_is_not_probed_but_still_caps_mfu(probes):
    peak = PeakFlops(CPU, "fp32", override_tflops=0.002)
    assert peak.mfu(1e9) == 0.5 and peak.mfu(3e9) == 1.0 and probes == []


def test_gpu_peaks_are_looked_up_by_exact_device_name():
    """A substring match gave the H100 PCIe and NVL the SXM part's 989 TFLOP/s."""
    from trainer.accounting.flops import known_gpu

    assert known_gpu("NVIDIA H100 80GB HBM3") == (989.0, 67.0)
    assert known_gpu("NVIDIA H100 PCIe") == (756.0, 51.0)
    assert known_gpu("NVIDIA H100 NVL") == (835.0, 60.0)
    assert known_gpu("NVIDIA H200") == (989.0, 67.0)
    assert known_gpu("NVIDIA A100-SXM4-40GB") == known_gpu("NVIDIA A100 80GB PCIe") == (312.0, 19.5)
    assert known_gpu("NVIDIA RTX 6000 Ada Generation") is None  # unknown: probed instead
    assert known_gpu("NVIDIA H100 PCIe (MIG 1g.10gb)") is None  # a slice has no full-part peak


def test_an_unknown_gpu_is_probed_at_a_size_that_reaches_its_peak(monkeypatch):
    from trainer.accounting import flops

    sizes = []
    monkeypatch.setattr(torch, "randn", lambda n, m, **kw: sizes.append(n) or torch.ones(1, 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    flops.matmul_peak.__wrapped__(torch.device("cpu"), "fp32", reps=1)
    assert sizes[-1] == 1024  # fast products: the size grows to the largest
    sizes.clear()
    flops.matmul_peak.__wrapped__(torch.device("cuda", 0), "bf16", reps=1)  # (no GPU touched: all patched)
    assert sizes[-1] == 8192


def test_a_slow_precision_is_probed_at_a_size_that_takes_milliseconds(monkeypatch):
    """bf16 on a CPU without bf16 instructions: one 1024³ product took seconds, every process."""
    from trainer.accounting import flops

    # 10 ms at 256³; a fixed 1 GFLOP/s machine whatever the size.
    monkeypatch.setattr(flops, "_timed_matmul", lambda a, b: 2 * a.shape[0] ** 3 / 1e9)
    sizes = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda n, m, **kw: sizes.append(n) or real(n, m, **kw))
    state = torch.random.get_rng_state()
    assert flops.matmul_peak.__wrapped__(torch.device("cpu"), "bf16", reps=2) == pytest.approx(1e9)
    assert sizes[-1] == 256
    # The size depends on timing: the run's random stream must not (resumed runs are bitwise).
    assert torch.equal(torch.random.get_rng_state(), state)
