"""The code base stays ruff-clean (the style rules in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed (it is a dev dependency: pip install -e '.[dev]')")
    p = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
