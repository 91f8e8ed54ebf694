"""``seqtrain scaling plan LADDER.yaml``: an IsoFLOP grid of training runs.

For each compute budget C (training FLOPs), several model sizes N; each gets the tokens
D = C / f(N) that spend the budget, where f is the model's exact training FLOPs per token
(attention included; the 6N approximation is reported beside it). Shapes follow one documented
rule per family (below), steps and batch follow from D, the learning rate from N. The plan is
a directory: one resolved training config per point (``points/{i}.yaml``) and a table
(``plan.csv``).

Shape rules (a scale s picks the shape):

- ``gpt``: ``d_model = head_dim · s``, ``n_head = s``, ``n_layer = max(1, round(d_model /
  aspect))``, ``d_ff = 4 d_model`` (width grows by one head per scale step, depth follows at a
  fixed aspect ratio; Kaplan et al. 2020 find loss depends weakly on shape at fixed N).
- ``rnn_lm``: ``n_layers`` fixed, ``d_hidden = width_step · s``, ``d_embed = d_hidden``.

Learning rate: ``lr = lr_ref · (N / n_ref)^lr_exponent`` (smaller models take larger steps),
warm-up 5 % of the steps, cosine to lr / 10. With ``mup_base_width`` (gpt) every point is μP
relative to that width and takes ``lr_ref`` itself, the rate tuned on the base model: μP
transfers it across widths (``docs/scaling.md``, "Learning rates that transfer").
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.config import Config, load_config
from trainer.errors import ConfigError
from trainer.parallel.materialize import reference_model

CSV_FIELDS = ["point", "budget", "family", "shape", "params", "nonemb_params", "flops_per_token",
              "flops_per_token_6n", "tokens", "tokens_per_param", "steps", "global_batch_size",
              "lr", "achieved_flops", "budget_error"]


class Ladder(BaseModel):
    """A scaling ladder: budgets, a shape rule and the rules for steps, batch and lr."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Name of the ladder: MLflow experiment of its runs, prefix of their names."""
    base: str
    """Training config every point starts from (data, tokenizer, optimizer); relative to the
    ladder file."""
    family: Literal["gpt", "rnn_lm"] = "gpt"
    """Model family to climb with."""
    budgets: list[float] = Field(min_length=1)
    """Compute budgets C in training FLOPs."""
    points_per_budget: int = Field(4, ge=1)
    """Model sizes per budget (spread evenly in log N over the admissible scales)."""
    scales: list[int] = Field(min_length=1)
    """Candidate scales s (see the shape rule of the family)."""
    aspect: int = Field(32, ge=1)
    """gpt: d_model per layer (the depth rule)."""
    head_dim: int = Field(32, ge=1)
    """gpt: width of one attention head."""
    n_layers: int = Field(1, ge=1)
    """rnn_lm: recurrent layers."""
    width_step: int = Field(32, ge=1)
    """rnn_lm: d_hidden per unit of scale."""
    tokens_per_param: tuple[float, float] = (2.0, 200.0)
    """Admissible D / N (non-embedding) range: points outside are too under- or over-trained
    to inform the fit."""
    batch_size: int = Field(16, ge=1)
    """Sequences per step (halved for short runs, see ``min_steps``)."""
    min_steps: int = Field(60, ge=1)
    """Fewest optimizer steps of a point; rounding steps then costs at most 1/min_steps of
    the budget."""
    lr_ref: float = Field(3e-3, gt=0)
    """Learning rate of a model with ``n_ref`` non-embedding parameters."""
    n_ref: float = Field(1e5, gt=0)
    """Reference size of the learning-rate rule."""
    lr_exponent: float = -0.25
    """lr ∝ N^lr_exponent."""
    mup_base_width: int | None = Field(None, ge=1)
    """gpt: train every point in μP (``model.mup``) relative to this width, at ``lr_ref``
    (no lr rule). Heads keep ``head_dim`` as the width grows, so the attention scale stays
    ``1/√head_dim`` (``attn_mult = √head_dim``)."""
    overrides: list[str] = []
    """``--set`` style overrides applied to every point (e.g. ``data.max_bytes=1000000``)."""
    budget_tolerance: float = Field(0.02, gt=0)
    """Largest relative miss of a point's achieved FLOPs against its budget."""

    @model_validator(mode="after")
    def _check(self) -> Ladder:
        lo, hi = self.tokens_per_param
        if not 0 < lo < hi:
            raise ValueError(f"tokens_per_param={self.tokens_per_param}: need 0 < low < high")
        if self.mup_base_width is not None:
            narrowest = self.head_dim * min(self.scales)
            if self.family != "gpt":
                raise ValueError(f"mup_base_width: μP needs a family with widths (gpt), not {self.family}")
            if self.mup_base_width > narrowest:
                raise ValueError(f"mup_base_width={self.mup_base_width} is wider than the narrowest point "
                                 f"(d_model {narrowest} at scale {min(self.scales)}); use at most {narrowest}")
        return self


def load_ladder(path: str | Path) -> tuple[Ladder, Path]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such ladder file")
    try:
        ladder = Ladder.model_validate(yaml.safe_load(p.read_text()))
    except Exception as e:
        first = str(e).splitlines()
        raise ConfigError(f"{path}: {' '.join(first[:3])}") from None
    return ladder, (p.parent / ladder.base).resolve()


def shape_overrides(ladder: Ladder, s: int) -> dict[str, int]:
    """Model fields of scale ``s``. A family check by name, on purpose: each ladder family has
    its own shape rule and ladder fields (heads and aspect ratio, or width steps)."""
    if ladder.family == "gpt":
        d = ladder.head_dim * s
        # d_ff from the activation's own rule: 4·d for GELU, 8d/3 for SwiGLU (models/gpt.py).
        shape = {"n_layer": max(1, round(d / ladder.aspect)), "d_model": d, "n_head": s, "d_ff": None}
        if ladder.mup_base_width is not None:
            shape["mup"] = {"base_width": ladder.mup_base_width, "attn_mult": ladder.head_dim ** 0.5}
        return shape
    d = ladder.width_step * s
    return {"n_layers": ladder.n_layers, "d_hidden": d, "d_embed": d}


def _model_cfg(base: Config, ladder: Ladder, s: int) -> Config:
    tree = base.model_dump()
    tree["model"].update(shape_overrides(ladder, s))
    cfg = Config.model_validate(tree)  # validates the new shape
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = cfg.data.tokenizer.vocab_size
    return cfg


def _measure(cfg: Config) -> tuple[int, int, float, float]:
    """(total params, non-embedding params, exact FLOPs/token, 6N FLOPs/token) of a shape."""
    m = reference_model(cfg)
    exact, six_n = m.flops_per_token(cfg.data.seq_len)
    return m.num_params(), m.num_params(non_embedding=True), exact, six_n


def plan(ladder_path: str | Path, out: Path) -> list[dict]:
    """Write ``out/points/{i}.yaml`` and ``out/plan.csv``; returns the plan rows."""
    ladder, base_path = load_ladder(ladder_path)
    base = load_config(base_path, ladder.overrides)
    if base.model.family != ladder.family:
        raise ConfigError(f"{ladder_path}: family {ladder.family} but base {base_path} is {base.model.family}")
    cfgs = {s: _model_cfg(base, ladder, s) for s in ladder.scales}
    shapes = {s: (cfg, *_measure(cfg)) for s, cfg in cfgs.items()}
    seq = base.data.seq_len
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    (out / "points").mkdir(exist_ok=True)
    for budget in sorted(ladder.budgets):
        fits = [s for s, (_, _, n, f, _) in shapes.items()
                if ladder.tokens_per_param[0] <= budget / f / n <= ladder.tokens_per_param[1]]
        if not fits:
            raise ConfigError(
                f"{ladder_path}: no scale in {ladder.scales} gives {ladder.tokens_per_param} tokens per "
                f"parameter at budget {budget:.3g}; add scales or change the budget"
            )
        k = min(ladder.points_per_budget, len(fits))
        fits.sort(key=lambda s: shapes[s][2])
        picks = sorted({fits[round(i * (len(fits) - 1) / max(1, k - 1))] for i in range(k)})
        for s in picks:
            cfg, total, nonemb, f, f6 = shapes[s]
            rows.append(_point(ladder, cfg, budget, s, total, nonemb, f, f6, seq, len(rows)))
    # A plan's identity is its points: runs of a re-planned ladder (other shapes, tokens or
    # accounting) carry another id in the same MLflow experiment, and `fit` keeps them apart.
    plan_id = hashlib.sha256(json.dumps([{k: r[k] for k in CSV_FIELDS} for r in rows]).encode()).hexdigest()[:12]
    for row in rows:
        point = row["config"]
        point.tracking.tags["plan"] = plan_id
        (out / "points" / f"{row['point']}.yaml").write_text(point.to_yaml())
    with (out / "plan.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    (out / "ladder.yaml").write_text(ladder.model_dump_json(indent=2))
    return rows


def _point(ladder: Ladder, cfg: Config, budget: float, s: int, total: int, nonemb: int, f: float,
           f6: float, seq: int, index: int) -> dict:
    tokens = budget / f
    batch = ladder.batch_size
    while batch > 1 and tokens / (batch * seq) < ladder.min_steps:
        batch //= 2
    steps = max(1, round(tokens / (batch * seq)))
    achieved = steps * batch * seq * f
    err = abs(achieved - budget) / budget
    if err > ladder.budget_tolerance:
        raise ConfigError(
            f"point {index} (scale {s}, budget {budget:.3g}): {steps} steps of {batch}×{seq} tokens "
            f"miss the budget by {err:.1%}; raise the budget or lower batch_size"
        )
    lr = ladder.lr_ref if ladder.mup_base_width else ladder.lr_ref * (nonemb / ladder.n_ref) ** ladder.lr_exponent
    point = cfg.model_copy(deep=True)
    point.name = f"{ladder.name}-{index:02d}"
    t = point.train
    t.steps, t.lr, t.min_lr = steps, lr, lr / 10
    t.micro_batch_size, t.global_batch_size, t.grad_accum = batch, batch, None
    t.warmup_steps = max(1, round(0.05 * steps))
    t.log_every = max(1, steps // 20)
    point.eval.every = 0
    point.checkpoint.every = max(1, steps // 4)
    point.checkpoint.keep_last = 1
    point.tracking.experiment = ladder.name
    point.tracking.tags = {"ladder": ladder.name, "budget": f"{budget:.6g}", "family": ladder.family,
                           "N": str(nonemb), "N_total": str(total), "D": str(steps * batch * seq),
                           "point": str(index)}
    return {"point": index, "budget": budget, "family": ladder.family,
               "shape": " ".join(f"{k}={v}" for k, v in shape_overrides(ladder, s).items() if k != "mup"),
               "params": total, "nonemb_params": nonemb, "flops_per_token": f,
               "flops_per_token_6n": f6, "tokens": steps * batch * seq,
               "tokens_per_param": round(steps * batch * seq / nonemb, 2), "steps": steps,
               "global_batch_size": batch, "lr": round(lr, 6), "achieved_flops": achieved,
               "budget_error": round(err, 5), "config": point}
