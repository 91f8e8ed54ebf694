"""``seqtrain eval``: evaluate a checkpoint, or every checkpoint of a run (a curve over steps).

Language models: loss (nats/token), perplexity = exp(loss), bits per byte and per character
(total NLL / ln 2 over the UTF-8 bytes and the characters of the predicted text), token
accuracy. Sequence-to-sequence: exact match, BLEU and chrF (sacrebleu, detokenized text),
greedy or beam. Plus a few samples. Runs on one device (CPU by default) from checkpoints of
any layout: the weights are consolidated on load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer import checkpoint
from trainer.config import Config, load_config
from trainer.data.tokenizer import EOS
from trainer.errors import CheckpointError, DataError
from trainer.families import spec

LN2 = math.log(2)


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, tok, ids: np.ndarray, seq_len: int, batch: int = 16,
               max_tokens: int | None = None) -> dict[str, float]:
    """Metrics of a language model on a token stream.

    GPT: independent windows of ``seq_len`` predictions. RNN: ``batch`` contiguous streams,
    the state carried from window to window (as in training with truncated BPTT).
    """
    ids = np.asarray(ids[: (max_tokens + 1) if max_tokens else None], dtype=np.int64)
    is_rnn = spec(model.cfg.family).carries_state
    if is_rnn:
        stream = (len(ids) - 1) // batch
        n_win = max(0, stream - 1) // seq_len
        rows = [ids[r * stream: r * stream + n_win * seq_len + 1] for r in range(batch)]
        covered = np.concatenate([r[1:] for r in rows]) if n_win else np.zeros(0, np.int64)
    else:
        n_win = (len(ids) - 1) // seq_len
        covered = ids[1: n_win * seq_len + 1]
    if n_win == 0:
        raise DataError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    nll, correct, count = 0.0, 0, 0
    state = None
    for w in range(n_win):
        if is_rnn:
            x = torch.from_numpy(np.stack([r[w * seq_len: (w + 1) * seq_len + 1] for r in rows]))
            logits, state = model(x[:, :-1], state=state)
            chunks = [(logits, x[:, 1:])]
        else:
            if w % batch:
                continue
            starts = np.arange(w, min(w + batch, n_win)) * seq_len
            x = torch.from_numpy(np.stack([ids[s: s + seq_len + 1] for s in starts]))
            chunks = [(model(x[:, :-1]), x[:, 1:])]
        for logits, y in chunks:
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
    text = tok.decode(covered.tolist(), skip_special_tokens=False)
    n_bytes, n_chars = len(text.encode("utf-8")), len(text)
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / LN2 / n_bytes,
            "bits_per_char": nll / LN2 / n_chars, "token_accuracy": correct / count, "tokens": count}


def _lm_tokens(run_dir: Path, cfg: Config, tok, text_file: str | None, data: str | None) -> np.ndarray:
    """Token ids to evaluate: a text file, or the validation split of ``--data`` (a config) or
    of the run's own data, always tokenized with the run's tokenizer."""
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise DataError(f"--text-file {text_file}: no such file")
        return np.array(tok.encode(p.read_text(encoding="utf-8", errors="replace"),
                                   add_special_tokens=False).ids, dtype=np.int64)
    from trainer.data import prepare

    data_cfg = (load_config(data).data if data else cfg.data).model_copy(deep=True)
    # Never a tokenizer trained anew here: the model only knows the run's own.
    data_cfg.tokenizer.path = str(run_dir / "tokenizer.json")
    prep = prepare(data_cfg, log=lambda _: None)
    return np.fromfile(prep.split_path("val"), dtype=prep.dtype).astype(np.int64)


def _pairs(cfg: Config, data: str | None, limit: int) -> list[tuple[str, str]]:
    from trainer.data.corpus import name_key
    from trainer.data.seq2seq import read_pairs

    if data and Path(data).suffix in (".tsv", ".jsonl"):
        return read_pairs(cfg.data.model_copy(update={"source": data, "target_source": None}))[:limit]
    data_cfg = load_config(data).data if data else cfg.data
    pairs = read_pairs(data_cfg, cfg.train.seed)
    val = [p for i, p in enumerate(pairs) if name_key(str(i), "split") < data_cfg.val_fraction]
    return val[:limit]


def evaluate_checkpoint(path: str | Path, data: str | None = None, text_file: str | None = None,
                        beam: int = 1, limit: int = 500, max_tokens: int | None = 200_000,
                        samples: int = 3) -> dict[str, Any]:
    from trainer.inference import encode_sources, load_for_inference, translate_ids
    from trainer.metrics import text_metrics

    ckpt = checkpoint.resolve(path)
    model, src_tok, tgt_tok, cfg = load_for_inference(ckpt)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "step": int(ckpt.name.split("_")[-1]),
                           "family": cfg.model.family}
    if cfg.is_seq2seq:
        if text_file:
            raise CheckpointError(f"{ckpt}: a {cfg.model.family} model; give --data pairs, not --text-file")
        pairs = _pairs(cfg, data, limit)
        eos = tgt_tok.token_to_id(EOS)
        src = encode_sources(src_tok, [s for s, _ in pairs], eos)
        hyps = [tgt_tok.decode(o) for o in translate_ids(model, src, cfg.model.pad_id, eos, cfg.data.seq_len, beam)]
        out.update(text_metrics(hyps, [t for _, t in pairs], cfg.eval.bleu_tokenize))
        out["pairs"] = len(pairs)
        out["samples"] = [{"source": s, "reference": t, "output": h}
                          for (s, t), h in list(zip(pairs, hyps, strict=True))[:samples]]
    else:
        ids = _lm_tokens(ckpt.parent.parent, cfg, src_tok, text_file, data)
        out.update(lm_metrics(model, src_tok, ids, cfg.data.seq_len, max_tokens=max_tokens))
        eos = src_tok.token_to_id(EOS)
        g = torch.Generator().manual_seed(0)
        gen = model.generate(torch.tensor([[eos]] * samples), 64, 0.8, 50, None, (eos,), g)
        out["samples"] = [src_tok.decode(r.tolist()[1:]) for r in gen]
    return out


def evaluate_run(run_dir: str | Path, **kw) -> list[dict[str, Any]]:
    """Every checkpoint of a run, a curve PNG, ``eval/results.jsonl``, and MLflow metrics."""
    run_dir = Path(run_dir)
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "config.yaml").is_file())
    if not ckpts:
        raise CheckpointError(f"{run_dir}: no checkpoints under {run_dir / 'checkpoints'}")
    results = [evaluate_checkpoint(c, **kw) for c in ckpts]
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    png = plot_curve(results, out / "curve.png")
    _log_mlflow(run_dir, results, png)
    return results


def curve_metrics(results: list[dict[str, Any]]) -> list[str]:
    return ["bleu", "exact_match"] if "bleu" in results[0] else ["loss", "bits_per_byte"]


def plot_curve(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = curve_metrics(results)
    steps = [r["step"] for r in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        ax.plot(steps, [r[name] for r in results], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(results[0]["checkpoint"]).parent.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_mlflow(run_dir: Path, results: list[dict[str, Any]], png: Path) -> None:
    """Metrics ``eval/<name>`` at each checkpoint's step, into the training run when it has one."""
    import mlflow
    import yaml

    from trainer.config import TrackingConfig
    from trainer.tracking import open_run

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    tracking = TrackingConfig.model_validate(cfg.get("tracking", {}))
    if not tracking.enabled:
        return
    open_run(run_dir, tracking, f"eval-{run_dir.name}", record=False)
    try:
        for r in results:
            mlflow.log_metrics({f"eval/{k}": float(v) for k, v in r.items()
                                if isinstance(v, int | float) and k != "step"}, step=r["step"])
        mlflow.log_artifact(str(png), "eval")
    finally:
        mlflow.end_run()
