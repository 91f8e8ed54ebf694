"""Adam's parameter groups under μP: learning-rate factors by parameter, kept by the schedule."""

from __future__ import annotations

import pytest

from models import build
from trainer.config import load_config
from trainer.engine.initialize import build_optimizer, build_scheduler


def test_optimizer_groups_scale_hidden_matrices_learning_rate_through_the_schedule():
    """Adam's groups: hidden matrices at lr/m, the rest at lr, at every step of warm-up and decay
    (one schedule, a factor on each group's own rate)."""
    cfg = load_config(None, ["model.d_model=128", "model.n_head=4", "model.mup.base_width=32", "model.vocab_size=50",
                             "model.tie_embeddings=false", "train.lr=1e-2", "train.warmup_steps=2", "train.steps=6"])
    model = build(cfg.model, seed=0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = next(g for g in opt.param_groups if g["lr_mult"] != 1.0)
    assert hidden["lr_mult"] == 0.25
    assert {names[id(p)].split(".")[-2] for p in hidden["params"]} == {"c_attn", "c_proj", "c_fc"}
    others = {names[id(p)] for g in opt.param_groups if g is not hidden for p in g["params"]}
    assert {"wte.weight", "wpe.weight", "lm_head.weight", "ln_f.weight", "h.0.attn.c_attn.bias"} <= others
    for _ in range(6):
        rates = {g["lr_mult"]: g["lr"] for g in opt.param_groups}
        assert rates[0.25] == pytest.approx(0.25 * rates[1.0], rel=1e-12) and rates[1.0] > 0
        opt.step()
        sched.step()
