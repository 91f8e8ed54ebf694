"""A scaling ladder as one Slurm job array (the real local Slurm of the launch tests)."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import REPO, run_cli
from tests.tools.test_scaling import MICRO


@pytest.mark.slurm
def test_ladder_points_run_as_a_slurm_array_and_are_collected(slurm, cache_dir, tmp_path, tiny_corpus):
    ladder = tmp_path / "ladder.yaml"
    text = MICRO.format(base=REPO / "configs/gpt/debug.yaml", corpus=tiny_corpus, db=tmp_path / "unused.db")
    text = text.replace("budgets: [2.0e9, 6.0e9]", "budgets: [2.0e9]")
    text = text.replace(f"  - tracking.uri=sqlite:///{tmp_path / 'unused.db'}", "  - tracking.enabled=false")
    ladder.write_text(text)
    plan = tmp_path / "plan"
    run_cli(["scaling", "plan", str(ladder), "--out", str(plan)], cache_dir)
    p = run_cli(["scaling", "run", str(plan), "--executor", "slurm", "--wait", "--time", "00:10:00"], cache_dir)
    assert "3 of 3 points to train: [0, 1, 2]" in p.stdout and "3 points finished" in p.stdout, p.stdout
    assert len(list((plan / "logs").glob("*.out"))) == 3  # one log per array task
    rows = list(csv.DictReader((plan / "results.csv").open()))
    assert sorted(int(r["point"]) for r in rows) == [0, 1, 2]
    again = run_cli(["scaling", "run", str(plan), "--executor", "slurm"], cache_dir)
    assert "0 of 3 points to train" in again.stdout
