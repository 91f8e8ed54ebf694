"""A real Slurm on localhost for the launch tests, started and stopped by the harness."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _root_or_skip(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (apt-get, munged); CI runs as root")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    if shutil.which("shellcheck") is None:
        _root_or_skip("installing shellcheck")
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "shellcheck"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("shellcheck")


@pytest.fixture(scope="session")
def slurm():
    """munged + slurmctld + slurmd on localhost (node: 4 CPUs), for the whole session."""
    _root_or_skip("a local Slurm")
    up = subprocess.run(["bash", str(HERE / "local_slurm.sh"), "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    subprocess.run(["bash", str(HERE / "local_slurm.sh"), "down"], capture_output=True)


@pytest.fixture(scope="session")
def postgres() -> str:
    """A PostgreSQL server on localhost with an empty ``mlflow`` database; its URI."""
    _root_or_skip("a local PostgreSQL")
    up = subprocess.run(["bash", str(HERE / "local_postgres.sh"), "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    yield up.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(HERE / "local_postgres.sh"), "down"], capture_output=True)
