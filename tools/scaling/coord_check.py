"""``seqtrain mup coord-check``: μP's coordinate check (Yang et al. 2022, "Tensor Programs V", §D.1).

The same model (a decoder, or an encoder-decoder) is built at several widths, in the standard
parametrisation (SP) and in μP,
and trained a few Adam steps on the same batches at the config's learning rate (constant: no
warm-up, no decay). Before each step, and after the last, the mean absolute value of each
activation is recorded (averaged over a few initialisation seeds): the token embeddings, every block's output (an
encoder-decoder's decoder blocks are "block i", its encoder's "encoder block i"), every
attention's scores (``q·k · scale``, before the mask and softmax, in call order) and the logits. Under μP these stay the
same size as the width grows; under SP the logits grow with it once training starts. The
slope of ``log size`` against ``log width`` says which: ~0 is width-stable.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from models import FAMILIES, build
from trainer.build import build_data, setup
from trainer.config import Config, load_config
from trainer.engine.initialize import build_optimizer
from trainer.errors import ConfigError

PARAMETRISATIONS = ("sp", "mup")


@dataclass
class CoordCheck:
    widths: list[int]
    base_width: int
    seeds: int
    steps: int
    lr: float
    sizes: dict[str, dict[str, list[list[float]]]]
    """Parametrisation ► quantity ► ``[step][width]`` mean |activation|."""

    def slopes(self, step: int) -> dict[str, dict[str, float]]:
        """Least-squares slope of log(size) against log(width) at ``step``, per quantity."""
        x = torch.tensor(self.widths, dtype=torch.float64).log()
        out: dict[str, dict[str, float]] = {}
        for par, quantities in self.sizes.items():
            out[par] = {}
            for q, per_step in quantities.items():
                y = torch.tensor(per_step[step], dtype=torch.float64).log()
                xc = x - x.mean()
                out[par][q] = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
        return out


class _AttentionScores(TorchFunctionMode):
    """Records mean |q·k · scale| of every ``scaled_dot_product_attention`` call, in call order
    (layer order within a forward), without changing what attention computes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves a group
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
            with torch.no_grad():
                self.sizes.append(float((q @ k.transpose(-2, -1) * scale).abs().mean()))
        return func(*args, **kwargs)


def _at_width(cfg: Config, width: int, base_width: int, par: str) -> Config:
    m = cfg.model.model_dump()
    if width % m["n_head"]:
        raise ConfigError(f"--widths {width}: not divisible by model.n_head={m['n_head']}; pick widths that "
                          "are multiples of it (or --set model.n_head=...)")
    if m.get("d_ff"):  # an explicit MLP size grows with the width, as the default one does
        m["d_ff"] = max(1, round(m["d_ff"] * width / m["d_model"]))
    m["d_model"] = width
    m["mup"] = {**(m.get("mup") or {}), "base_width": base_width} if par == "mup" else None
    return cfg.model_copy(update={"model": type(cfg.model).model_validate(m)})


def _probes(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose outputs are recorded: a decoder's (``models/gpt.py``) or an
    encoder-decoder's (``models/encdec.py``) embedding, blocks and output head."""
    if hasattr(model, "h"):
        return {"embedding": model.wte, **{f"block {i}": b for i, b in enumerate(model.h)}, "logits": model.lm_head}
    return {"embedding": model.src_embed, **{f"encoder block {i}": b for i, b in enumerate(model.encoder)},
            **{f"block {i}": b for i, b in enumerate(model.decoder)}, "logits": model.out}


def _record(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
    """One forward: each quantity's mean |activation| and the loss."""
    sizes: dict[str, float] = {}

    def keep(name: str):
        def hook(_mod, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            sizes[name] = float(out.detach().abs().mean())
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in _probes(model).items()]
    scores = _AttentionScores()
    try:
        with scores:
            loss = model(**batch)
    finally:
        for h in hooks:
            h.remove()
    for i, s in enumerate(scores.sizes):
        sizes[f"attn scores {i}"] = s
    return sizes, loss


def _train(cfg: Config, batches: list[dict[str, torch.Tensor]], device: torch.device, seed: int) -> list[dict[str, float]]:
    """Sizes before each of ``len(batches) - 1`` Adam steps and after the last."""
    model = build(cfg.model, seed=seed).to(device)
    opt = build_optimizer(model, cfg)
    out = []
    for s, batch in enumerate(batches):
        sizes, loss = _record(model, batch)
        out.append(sizes)
        if s + 1 < len(batches):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return out


def _mean_over_seeds(cfg: Config, batches, device: torch.device, seeds: int) -> list[dict[str, float]]:
    runs = [_train(cfg, batches, device, cfg.train.seed + i) for i in range(seeds)]
    return [{q: sum(r[s][q] for r in runs) / seeds for q in runs[0][s]} for s in range(len(batches))]


def coord_check(config: str, widths: list[int], steps: int, overrides: list[str] = (),
                base_width: int | None = None, lr: float | None = None, seeds: int = 3) -> CoordCheck:
    if len(widths) < 2 or sorted(set(widths)) != widths:
        raise ConfigError(f"--widths {','.join(map(str, widths))}: at least two widths, increasing")
    if steps < 1 or seeds < 1:
        raise ConfigError(f"--steps {steps} --seeds {seeds}: at least 1 each")
    sets = [*overrides, "tracking.enabled=false", "data.prefetch=false", "train.loss_chunk=0"]
    if lr is not None:
        sets.append(f"train.lr={lr}")
    cfg = load_config(config, sets)
    if "mup" not in type(cfg.model).model_fields:  # the families config.py lets take μP
        raise ConfigError(f"{config}: model.family={cfg.model.family} has no widths for μP; the coordinate "
                          "check takes the Transformer families (gpt, encdec)")
    mup = getattr(cfg.model, "mup", None)
    base = base_width or (mup.base_width if mup else widths[0])
    if base > widths[0]:
        raise ConfigError(f"base width {base} is wider than the narrowest of --widths {widths[0]}; "
                          f"μP widens a base model: a base width of at most {widths[0]}")
    cfg, dims, device = setup(cfg)
    data = build_data(cfg, dims)
    cfg = data.cfg
    # The tensors the model's forward takes (tokens, targets, labels), none of the bookkeeping.
    takes = inspect.signature(FAMILIES[cfg.model.family][1].forward).parameters
    batches = [{k: v.to(device) for k, v in data.train.micro_batch(s, 0, 0).items()
                if k in takes and isinstance(v, torch.Tensor)} for s in range(steps + 1)]
    sizes: dict[str, dict[str, list[list[float]]]] = {}
    for par in PARAMETRISATIONS:
        runs = [_mean_over_seeds(_at_width(cfg, w, base, par), batches, device, seeds) for w in widths]
        sizes[par] = {q: [[run[s][q] for run in runs] for s in range(steps + 1)] for q in runs[0][0]}
    return CoordCheck(widths, base, seeds, steps, cfg.train.lr, sizes)


def table(cc: CoordCheck, step: int) -> str:
    """Sizes at ``step`` per width, and the slope, SP beside μP."""
    slopes = cc.slopes(step)
    head = f"{'quantity':<16}" + "".join(f"{w:>9}" for w in cc.widths) + f"{'slope':>8}"
    lines = [f"mean |activation| after {step} Adam steps at lr {cc.lr:g} (μP base width {cc.base_width})"]
    for par in PARAMETRISATIONS:
        lines += ["", f"{par.upper():<16}" + head[16:], "-" * len(head)]
        for q, per_step in cc.sizes[par].items():
            lines.append(f"{q:<16}" + "".join(f"{v:>9.3g}" for v in per_step[step]) + f"{slopes[par][q]:>+8.2f}")
    return "\n".join(lines)


def plot(cc: CoordCheck, path: Path) -> Path:
    """Mean |activation| against width, one line per step, SP on the left and μP on the right,
    for the embedding, the last block, the last layer's attention scores and the logits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    last = max(int(q.split()[-1]) for q in cc.sizes["sp"] if q.startswith("block "))
    quantities = ["embedding", f"block {last}", f"attn scores {last}", "logits"]
    fig, axes = plt.subplots(2, len(quantities), figsize=(4 * len(quantities), 7), sharex=True)
    for row, par in enumerate(PARAMETRISATIONS):
        for col, q in enumerate(quantities):
            ax = axes[row][col]
            for s, per_width in enumerate(cc.sizes[par][q]):
                ax.plot(cc.widths, per_width, marker="o", color=plt.cm.viridis(s / max(1, cc.steps)), label=f"step {s}")
            ax.set(xscale="log", yscale="log", title=f"{par.upper()}: {q}")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no 6×10¹ beside 64
            ax.set_xticks(cc.widths, [str(w) for w in cc.widths])
            if row == 1:
                ax.set_xlabel("width (d_model)")
    axes[0][0].set_ylabel("mean |activation|")
    axes[1][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Coordinate check: Adam at lr {cc.lr:g}, μP base width {cc.base_width}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(cc: CoordCheck, out: Path, step: int) -> dict[str, Any]:
    """``coord_check.json`` (sizes and slopes at every step), ``coord_check.txt`` and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    result = {**asdict(cc), "slopes": [cc.slopes(s) for s in range(cc.steps + 1)], "table_step": step}
    (out / "coord_check.json").write_text(json.dumps(result, indent=1))
    (out / "coord_check.txt").write_text(table(cc, step) + "\n")
    plot(cc, out / "coord_check.png")
    return result
