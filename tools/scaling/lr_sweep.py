"""``seqtrain mup lr-sweep``: does the best learning rate move with the width?

One training run per (parametrisation, width, learning rate), each a ``seqtrain train`` of the
config with ``model.d_model``, ``train.lr`` (``min_lr`` a tenth of it) and, for SP,
``model.mup=null`` set; the score is the validation loss at the last step. Runs that finished
are read back, not rerun, so an interrupted sweep continues where it stopped. Under the
standard parametrisation the best rate falls as the model widens; under μP it should stay
put (Yang et al. 2022, Fig. 1).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.config import load_config
from trainer.errors import ConfigError

PARAMETRISATIONS = ("sp", "mup")


def _run_dir(out: Path, par: str, width: int, lr: float) -> Path:
    return out / "runs" / f"{par}-w{width}-lr{lr:.3g}"


def _final_val_loss(run_dir: Path, steps: int) -> float | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = [r["val_loss"] for r in rows if "val_loss" in r and r.get("step") == steps]
    return last[-1] if last else None


def point_overrides(par: str, width: int, lr: float, steps: int, base_width: int) -> list[str]:
    mup = f"model.mup.base_width={base_width}" if par == "mup" else "model.mup=null"
    return [f"model.d_model={width}", mup, f"train.lr={lr}", f"train.min_lr={lr / 10}", f"train.steps={steps}",
            f"eval.every={steps}", "checkpoint.every=0", "tracking.enabled=false"]


def sweep(config: str, widths: list[int], lrs: list[float], steps: int, out: Path,
          overrides: list[str] = (), base_width: int | None = None) -> dict[str, Any]:
    """Train every point not yet finished; return ``{"sp"|"mup": {width: {lr: val_loss}}}`` and
    the settings. A diverged run (non-finite loss) scores ``inf``."""
    cfg = load_config(config, list(overrides))
    if "mup" not in type(cfg.model).model_fields:  # the families config.py lets take μP
        raise ConfigError(f"{config}: model.family={cfg.model.family} has no widths for μP")
    mup = getattr(cfg.model, "mup", None)
    base = base_width or (mup.base_width if mup else min(widths))
    if base > min(widths):
        raise ConfigError(f"base width {base} is wider than the narrowest of --widths {min(widths)}")
    losses: dict[str, dict[int, dict[float, float]]] = {p: {w: {} for w in widths} for p in PARAMETRISATIONS}
    for par in PARAMETRISATIONS:
        for w in widths:
            for lr in lrs:
                run_dir = _run_dir(out, par, w, lr)
                loss = _final_val_loss(run_dir, steps)
                if loss is None:
                    cmd = [sys.executable, "-m", "trainer", "train", config, "--run-dir", str(run_dir)]
                    for o in [*overrides, *point_overrides(par, w, lr, steps, base)]:
                        cmd += ["--set", o]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    loss = _final_val_loss(run_dir, steps)
                    if loss is None:  # stopped by the non-finite guard, or failed
                        print(f"{par} width {w} lr {lr:g}: no final validation loss (exit {p.returncode}): "
                              f"{(p.stderr.strip().splitlines() or [''])[-1]}", file=sys.stderr)
                        loss = math.inf
                losses[par][w][lr] = loss
                print(f"{par:>4} width {w:>4} lr {lr:<9.3g} val_loss {loss:.4f}", flush=True)
    return {"config": config, "overrides": list(overrides), "widths": widths, "lrs": lrs, "steps": steps,
            "base_width": base, "val_loss": losses}


def best(result: dict[str, Any], par: str, width: int) -> float:
    row = result["val_loss"][par][width]
    return min(row, key=row.get)


def table(result: dict[str, Any]) -> str:
    """Markdown: validation loss per width and learning rate, the best of each row in bold."""
    lrs = result["lrs"]
    lines = ["| parametrisation | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
             "|---|---:|" + "---:|" * (len(lrs) + 1)]
    for par in PARAMETRISATIONS:
        for w in result["widths"]:
            row, top = result["val_loss"][par][w], best(result, par, w)
            cells = [(f"**{row[lr]:.4f}**" if lr == top else f"{row[lr]:.4f}") for lr in lrs]
            lines.append(f"| {par.upper()} | {w} | " + " | ".join(cells) + f" | {top:g} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    finite = [v for par in PARAMETRISATIONS for w in result["widths"] for v in result["val_loss"][par][w].values()
              if math.isfinite(v)]
    for ax, par in zip(axes, PARAMETRISATIONS, strict=True):
        for i, w in enumerate(result["widths"]):
            row = result["val_loss"][par][w]
            color = plt.cm.viridis(i / max(1, len(result["widths"]) - 1))
            ax.plot(result["lrs"], [row[lr] for lr in result["lrs"]], marker="o", color=color, label=f"width {w}")
            top = best(result, par, w)
            ax.plot([top], [row[top]], marker="*", markersize=14, color=color)
        ax.set(xscale="log", xlabel="learning rate", title=f"{par.upper()}: validation loss after {result['steps']} steps")
        ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    axes[0].set_ylabel("validation loss")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
