"""``seqtrain mup lr-sweep``: one run per (parametrisation, width, rate), scored by its final
validation loss, read back rather than rerun. (Whether the best rate transfers is shown in
docs/scaling.md, not asserted here: it takes CPU hours.)"""

from __future__ import annotations

import json

from tests.conftest import REPO, TINY, make_corpus, read_metrics, run_cli, sets

MUP_DEBUG = str(REPO / "configs/gpt/mup-debug.yaml")


def test_sweep_scores_each_run_by_its_final_validation_loss_and_resumes(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    args = ["mup", "lr-sweep", MUP_DEBUG, "--widths", "16,32", "--lrs", "0.001,0.01", "--steps", "3",
            "--out", str(tmp_path / "sweep"), *sets(*TINY, "model.n_head=2", "model.mup.base_width=16", f"data.source={corpus}")]
    run_cli(args, cache_dir)
    result = json.loads((tmp_path / "sweep/sweep.json").read_text())
    assert result["base_width"] == 16
    for par in ("sp", "mup"):
        for w in ("16", "32"):
            for lr in ("0.001", "0.01"):
                run = tmp_path / "sweep/runs" / f"{par}-w{w}-lr{float(lr):.3g}"
                _, evals = read_metrics(run)
                assert result["val_loss"][par][w][lr] == evals[-1]["val_loss"] and evals[-1]["step"] == 3
                cfg = (run / "config.yaml").read_text()
                assert f"d_model: {w}" in cfg and (("base_width: 16" in cfg) == (par == "mup"))
    # At the base width the two parametrisations differ only by the preset's zero query init.
    assert "**" in (tmp_path / "sweep/sweep.md").read_text() and (tmp_path / "sweep/sweep.png").is_file()
    again = run_cli(args, cache_dir)
    assert json.loads((tmp_path / "sweep/sweep.json").read_text()) == result and "val_loss" in again.stdout
    assert len(list((tmp_path / "sweep/runs").iterdir())) == 8
