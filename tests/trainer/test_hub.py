"""An unreachable Hub is found out in one quick connection, before a Hub client retries."""

from __future__ import annotations

import socket
import time

from tests.conftest import REPO, run_cli, sets
from trainer.data import hub


def test_a_closed_endpoint_is_unreachable_at_once_and_switches_to_offline(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import sys

    for v in hub.OFFLINE_VARS:  # "0": not offline; monkeypatch restores the originals after the test
        monkeypatch.setenv(v, "0")
    for mod, attr in hub.CLIENT_FLAGS:
        if mod in sys.modules and hasattr(sys.modules[mod], attr):
            monkeypatch.setattr(sys.modules[mod], attr, getattr(sys.modules[mod], attr))
    monkeypatch.setattr(hub, "endpoint", lambda: f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    assert hub.offline_unless_reachable()
    assert time.perf_counter() - t0 < hub.TIMEOUT_S
    import os

    assert all(os.environ[v] == "1" for v in hub.OFFLINE_VARS)


def test_a_listening_endpoint_is_reachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert hub.reachable(f"http://127.0.0.1:{s.getsockname()[1]}")


def test_an_hf_source_on_an_offline_node_is_one_line_within_seconds(cache_dir, tmp_path, monkeypatch):
    """Whatever the machine's network: the endpoint is pointed at a closed local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    p = run_cli(["data", "prepare", str(REPO / "configs/gpt/debug.yaml"),
                 *sets("data.source=hf:some-org/some-corpus")], cache_dir, check=False,
                env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")})
    seconds = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer" in lines[0] and "hf:some-org/some-corpus" in lines[0], p.stderr
    assert seconds < 20, seconds  # the process's start and imports; no retries
