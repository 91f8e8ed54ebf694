"""``seqtrain eval``: evaluate a checkpoint, or every checkpoint of a run (a curve over steps).

Language models: loss (nats/token), perplexity = exp(loss), bits per byte and per character
(total NLL / ln 2 over the UTF-8 bytes and the characters of the predicted text), token
accuracy. Sequence-to-sequence: exact match, BLEU and chrF (sacrebleu, detokenized text),
greedy or beam; image captioners against every caption of a scene, with attention maps as PNGs.
Classifiers: accuracy over a split of ListOps expressions. Text lines:
character error rate. Speech synthesizers: intelligibility, a recognizer's character and word
error rates on the synthesised sentences beside its rates on espeak-ng's own readings of them,
with WAVs of a few. Plus a few samples. Runs on one device (CPU by default) from checkpoints of
any layout: the weights are consolidated on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer import checkpoint
from trainer.callbacks.checkpointing import FINISHED
from trainer.callbacks.tracking import open_run
from trainer.config import Config, TrackingConfig, load_config
from trainer.data import listops, prepare, scenes, speech, textlines
from trainer.data.mixture import prepare_mixture
from trainer.data.seq2seq import read_pair_file, read_splits
from trainer.data.tokenizer import EOS
from trainer.errors import CheckpointError, DataError
from trainer.evaluation.examples import char_errors
from trainer.evaluation.inference import (
    caption_ids,
    classify,
    encode_sources,
    load_classifier,
    load_for_inference,
    load_synthesizer,
    load_transcriber,
    read_lines,
    speak,
    transcribe_ids,
    translate_ids,
)
from trainer.families import spec

if TYPE_CHECKING:
    from tools.harness import Harness

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


def _lm_tokens(run_dir: Path, cfg: Config, tok, text_file: str | None, data: str | None
               ) -> dict[str | None, tuple[float, np.ndarray]]:
    """Token ids to evaluate, by source (``None``: the one source) with their weight: a text
    file, or the validation split of ``--data`` (a config) or of the run's own data (each
    source of a mixture), always tokenized with the run's tokenizer."""
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise DataError(f"--text-file {text_file}: no such file")
        return {None: (1.0, np.array(tok.encode(p.read_text(encoding="utf-8", errors="replace"),
                                                add_special_tokens=False).ids, dtype=np.int64))}

    data_cfg = (load_config(data).data if data else cfg.data).model_copy(deep=True)
    # Never a tokenizer trained anew here: the model only knows the run's own.
    data_cfg.tokenizer.path = str(run_dir / "tokenizer.json")
    if data_cfg.mixture is not None:
        return {m.label: (m.weight, _val_ids(prep)) for m, prep in prepare_mixture(data_cfg, log=lambda _: None)}
    return {None: (1.0, _val_ids(prepare(data_cfg, log=lambda _: None)))}


def _val_ids(prep) -> np.ndarray:
    return np.fromfile(prep.split_path("val"), dtype=prep.dtype).astype(np.int64)


def _lm_source_metrics(model, tok, sets: dict[str | None, tuple[float, np.ndarray]], seq_len: int,
                       max_tokens: int | None) -> dict[str, Any]:
    """``lm_metrics`` of the one source; of a mixture, the mixture's (losses and bits weighted
    by the mixture's weights) and each source's loss and bits per byte (``loss/NAME``)."""
    if list(sets) == [None]:
        return lm_metrics(model, tok, sets[None][1], seq_len, max_tokens=max_tokens)
    per = {name: lm_metrics(model, tok, ids, seq_len, max_tokens=max_tokens) for name, (_, ids) in sets.items()}
    total = sum(w for w, _ in sets.values())
    mean = lambda key: sum(w * per[n][key] for n, (w, _) in sets.items()) / total  # noqa: E731
    loss = mean("loss")
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": mean("bits_per_byte"),
            "bits_per_char": mean("bits_per_char"), "token_accuracy": mean("token_accuracy"),
            "tokens": sum(r["tokens"] for r in per.values()),
            **{f"{key}/{n}": r[key] for n, r in per.items() for key in ("loss", "bits_per_byte")}}


def _pairs(cfg: Config, data: str | None, split: str, limit: int) -> list[tuple[str, str]]:
    """Pairs to translate: a ``.tsv``/``.jsonl`` file, or ``split`` of a config's data (``--data``)
    or of the run's own (official files where the config names them, else its hash slices)."""
    if data and Path(data).suffix in (".tsv", ".jsonl"):
        return read_pair_file(cfg.data, data, None, "--data")[:limit]
    data_cfg = load_config(data).data if data else cfg.data
    splits = read_splits(data_cfg, cfg.train.seed)
    if split not in splits:
        raise DataError(f"--split {split}: {data or 'the run'} has no {split} set (set data.{split}_source, "
                        "or give --data pairs.tsv)")
    return splits[split][:limit]


def evaluate_checkpoint(path: str | Path, data: str | None = None, text_file: str | None = None,
                        split: str = "val", beam: int = 1, limit: int | None = None,
                        max_tokens: int | None = 200_000, samples: int = 3,
                        harness: Harness | None = None, recognizer: str | None = None) -> dict[str, Any]:
    """Metrics of one checkpoint: lm-eval tasks with ``harness``, else perplexity and bits
    (language models), BLEU/chrF (sequence-to-sequence) or, for a speech synthesizer, the
    error rates of ``recognizer`` (a speech recognizer's run or checkpoint) on what it says."""
    ckpt = checkpoint.resolve(path)
    kind = checkpoint.saved_config(ckpt).family.examples
    if (kind == "sounds") != (recognizer is not None):
        raise CheckpointError(f"{ckpt}: a speech synthesizer is scored by a recognizer: give --recognizer REC_RUN"
                              if kind == "sounds" else "--recognizer goes with a speech synthesizer's checkpoint")
    if kind == "sounds":
        return _synthesis_metrics(ckpt, recognizer, data, split, limit, samples)
    if kind:
        if harness is not None or text_file:
            raise CheckpointError(f"{ckpt}: a {kind} model; give --data (a config, or a ListOps file) and --split")
        if kind == "images":
            return _recognition_metrics(ckpt, data, split, limit, samples)
        return _classifier_metrics(ckpt, data, split, limit, samples)
    model, src_tok, tgt_tok, cfg = load_for_inference(ckpt)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "step": checkpoint.step_of(ckpt),
                           "family": cfg.model.family}
    if harness is not None:
        if cfg.is_seq2seq:
            raise CheckpointError(f"{ckpt}: lm-eval tasks score language models, not {cfg.model.family}")
        return {**out, **harness.score(model, src_tok), "samples": []}
    source = cfg.source
    if source is not None and source.kind == "image":
        return {**out, **_caption_metrics(ckpt, model, tgt_tok, cfg, data, split, limit, beam, samples)}
    if source is not None:
        return {**out, **_transcription_metrics(model, tgt_tok, cfg, data, split, limit, beam, samples)}
    if cfg.is_seq2seq:
        if text_file:
            raise CheckpointError(f"{ckpt}: a {cfg.model.family} model; give --data pairs, not --text-file")
        return {**out, **_translation_metrics(model, src_tok, tgt_tok, cfg, _pairs(cfg, data, split, limit or 500),
                                              beam, samples)}
    sets = _lm_tokens(ckpt.parent.parent, cfg, src_tok, text_file, data)
    out.update(_lm_source_metrics(model, src_tok, sets, cfg.data.seq_len, max_tokens))
    eos = src_tok.token_to_id(EOS)
    g = torch.Generator().manual_seed(0)
    gen = model.generate(torch.tensor([[eos]] * samples), 64, 0.8, 50, None, (eos,), g)
    out["samples"] = [src_tok.decode(r.tolist()[1:]) for r in gen]
    return out


def _classifier_metrics(ckpt: Path, data: str | None, split: str, limit: int | None,
                        samples: int) -> dict[str, Any]:
    """Accuracy on ``split`` of the run's ListOps data (or of ``--data``: a config, or a ListOps
    file read whole), every expression of it unless ``limit``."""
    model, cfg = load_classifier(ckpt)
    if data and not data.endswith((".yaml", ".yml")):
        rows = list(listops.read_file(data))
        trees, labels = [t for t, _ in rows], [t.value() if y is None else y for t, y in rows]
    else:
        trees, labels = listops.read_splits(load_config(data).data if data else cfg.data, cfg.train.seed)[split]
    trees, labels = trees[:limit], labels[:limit]
    if not trees:
        raise DataError(f"--split {split}: no expressions to classify")
    pred = classify(model, cfg, trees)
    return {"checkpoint": str(ckpt), "step": checkpoint.step_of(ckpt), "family": cfg.model.family,
            "accuracy": sum(p == y for p, y in zip(pred, labels, strict=True)) / len(trees),
            "examples": len(trees),
            "samples": [{"expression": t.text(), "label": y, "output": p}
                        for t, y, p in list(zip(trees, labels, pred, strict=True))[:samples]]}


def _recognition_metrics(ckpt: Path, data: str | None, split: str, limit: int | None,
                         samples: int) -> dict[str, Any]:
    """Character error rate (jiwer) of the best-path transcriptions of ``split``'s text lines
    (``test``: drawn in the font no training line has), every line unless ``limit``."""
    model, cfg = load_classifier(ckpt, ("images",))
    lines = textlines.read_splits(load_config(data).data if data else cfg.data, cfg.train.seed)[split]
    n = min(len(lines), limit or len(lines))
    refs = lines.texts[:n]
    hyps = read_lines(model, [lines.image(i) for i in range(n)])
    errors, chars = char_errors(refs, hyps)
    return {"checkpoint": str(ckpt), "step": checkpoint.step_of(ckpt), "family": cfg.model.family,
            "cer": errors / chars, "lines": n,
            "samples": [{"reference": r, "output": h} for r, h in list(zip(refs, hyps, strict=True))[:samples]]}


def _caption_metrics(ckpt: Path, model, tok, cfg: Config, data: str | None, split: str, limit: int | None,
                     beam: int, samples: int) -> dict[str, Any]:
    """Exact match, BLEU and chrF of the captions of ``split``'s scenes (``test``: colour-shape
    combinations no training scene shows) against every caption the grammar gives each, and
    the attention maps of the first ``samples`` as PNGs under the run's ``eval/attention/``."""
    from trainer.evaluation.attention import attention_png
    from trainer.evaluation.metrics import text_metrics

    split_scenes = scenes.read_splits(load_config(data).data if data else cfg.data, cfg.train.seed)[split]
    n = min(len(split_scenes), limit or 500)
    images = [split_scenes.image(i) for i in range(n)]
    eos = tok.token_to_id(EOS)
    outs = caption_ids(model, cfg, images, eos, beam)
    hyps = [tok.decode(o) for o in outs]
    refs = [split_scenes.references(i) for i in range(n)]
    where = ckpt.parent.parent / "eval" / "attention"
    pngs = [str(attention_png(model, tok, images[i], outs[i], eos, where / f"{ckpt.name}-{split}-beam{beam}-{i}.png"))
            for i in range(min(samples, n))]
    return {**text_metrics(hyps, refs, cfg.eval.bleu_tokenize), "scenes": n, "attention_pngs": pngs,
            "samples": [{"reference": refs[i][0], "output": hyps[i]} for i in range(min(samples, n))]}


def _transcription_metrics(model, tok, cfg: Config, data: str | None, split: str, limit: int | None, beam: int,
                           samples: int) -> dict[str, Any]:
    """Character and word error rates (jiwer) of the transcripts of ``split``'s sounds
    (``test``: spoken by the voice no training sound has)."""
    from trainer.evaluation.metrics import error_rates

    sounds = speech.read_splits(load_config(data).data if data else cfg.data, cfg.train.seed,
                                cfg.model.source.sample_rate)[split]
    n = min(len(sounds), limit or 500)
    outs = transcribe_ids(model, cfg, [sounds.sound(i) for i in range(n)], tok.token_to_id(EOS), beam)
    hyps, refs = [tok.decode(o) for o in outs], sounds.texts[:n]
    return {**error_rates(hyps, refs), "sounds": n,
            "samples": [{"reference": r, "output": h} for r, h in list(zip(refs, hyps, strict=True))[:samples]]}


def _synthesis_metrics(ckpt: Path, recognizer: str, data: str | None, split: str, limit: int | None,
                       samples: int) -> dict[str, Any]:
    """Intelligibility of ``split``'s sentences (``test``: by default 100 of them) as the
    synthesizer says them: the recognizer's greedy CER and WER on them, beside the same
    recognizer's rates on espeak-ng's readings of the same sentences (``espeak_cer``: the
    synthesizer learnt to imitate those; the test voice is one no training sound has). The
    first ``samples`` sounds are written under the run's ``eval/audio/``."""
    from trainer.evaluation.metrics import error_rates

    model, tok, cfg = load_synthesizer(ckpt)
    rec, rec_tok, rec_cfg = load_transcriber(recognizer)
    rate = cfg.model.audio.sample_rate
    if rec_cfg.model.source.sample_rate != rate:
        raise DataError(f"--recognizer {recognizer} reads {rec_cfg.model.source.sample_rate} Hz sound; the "
                        f"synthesizer writes {rate} Hz (model.audio.sample_rate)")
    sounds = speech.read_splits(load_config(data).data if data else cfg.data, cfg.train.seed, rate)[split]
    n = min(len(sounds), limit or 100)
    refs = sounds.texts[:n]
    said = speak(model, tok, refs)
    eos = rec_tok.token_to_id(EOS)
    heard = [rec_tok.decode(o) for o in transcribe_ids(rec, rec_cfg, said, eos)]
    heard_espeak = [rec_tok.decode(o) for o in transcribe_ids(rec, rec_cfg, [sounds.sound(i) for i in range(n)], eos)]
    where = ckpt.parent.parent / "eval" / "audio"
    where.mkdir(parents=True, exist_ok=True)
    wavs = [str(speech.write_wav(where / f"{ckpt.name}-{split}-{i}.wav", said[i], rate)) for i in range(min(samples, n))]
    espeak = error_rates(heard_espeak, refs)
    return {"checkpoint": str(ckpt), "step": checkpoint.step_of(ckpt), "family": cfg.model.family,
            **error_rates(heard, refs), "espeak_cer": espeak["cer"], "espeak_wer": espeak["wer"],
            "seconds_ratio": sum(map(len, said)) / float(sounds.offsets[n] - sounds.offsets[0]),
            "sentences": n, "audio_files": wavs,
            "samples": [{"text": refs[i], "heard": heard[i], "heard_espeak": heard_espeak[i]}
                        for i in range(min(samples, n))]}


def _translation_metrics(model, src_tok, tgt_tok, cfg: Config, pairs: list[tuple[str, str]], beam: int,
                         samples: int) -> dict[str, Any]:
    """Exact match, BLEU and chrF of the decoded (detokenized) outputs against the references."""
    from trainer.evaluation.metrics import text_metrics

    eos = tgt_tok.token_to_id(EOS)
    src = encode_sources(src_tok, [s for s, _ in pairs], eos)
    hyps = [tgt_tok.decode(o) for o in translate_ids(model, src, cfg.model.pad_id, eos, cfg.data.seq_len, beam)]
    return {**text_metrics(hyps, [t for _, t in pairs], cfg.eval.bleu_tokenize), "pairs": len(pairs),
            "samples": [{"source": s, "reference": t, "output": h}
                        for (s, t), h in list(zip(pairs, hyps, strict=True))[:samples]]}


def _checkpoint_key(ckpt: Path) -> str:
    """A checkpoint's identity: its name and its manifest (a step saved again after a resume from
    an earlier checkpoint is another checkpoint)."""
    return f"{ckpt.name}:{hashlib.sha256((ckpt / checkpoint.MANIFEST).read_bytes()).hexdigest()[:16]}"


def _settings(kw: dict[str, Any]) -> dict[str, Any]:
    """What makes two evaluations of a checkpoint the same (their rows are reused)."""
    h = kw.get("harness")
    return {**{k: v for k, v in kw.items() if k not in ("harness", "samples")},
            **({"harness": h.settings()} if h is not None else {})}


def evaluate_run(run_dir: str | Path, follow: bool = False, every_seconds: float = 60.0,
                 log=print, **kw) -> list[dict[str, Any]]:
    """Every checkpoint of a run: ``eval/results.jsonl`` (one row per checkpoint and settings,
    appended), a curve PNG and MLflow metrics. Rows already there for the same checkpoint and
    settings are not scored again. With ``follow``, keep watching for new checkpoints until
    the run has written ``finished.json`` and every checkpoint is scored."""
    run_dir = Path(run_dir)
    results_file = run_dir / "eval" / "results.jsonl"
    settings = _settings(kw)
    done = {r["key"]: r for r in _read_rows(results_file) if r.get("settings") == settings}
    while True:
        finished = (run_dir / FINISHED).is_file()  # first: the final checkpoint precedes the marker
        new = [c for c in checkpoint.complete(run_dir / "checkpoints") if _checkpoint_key(c) not in done]
        scored = []
        for c in new:
            r = _evaluate_new(c, settings, kw, log)
            if r is not None:
                done[r["key"]] = r
                _append_row(results_file, r)  # row by row: a restart keeps what is scored
                scored.append(r)
        if scored:
            _log_mlflow(run_dir, scored, plot_curve(_sorted(done), results_file.with_name("curve.png")))
        if not follow or (finished and not new):
            break
        time.sleep(every_seconds)
    if not done:
        raise CheckpointError(f"{run_dir}: no checkpoints under {run_dir / 'checkpoints'}")
    return _sorted(done)


def _evaluate_new(ckpt: Path, settings: dict[str, Any], kw: dict[str, Any], log) -> dict[str, Any] | None:
    try:
        key = _checkpoint_key(ckpt)
        r = evaluate_checkpoint(ckpt, **kw)
    except (FileNotFoundError, CheckpointError):
        if ckpt.exists():
            raise
        log(f"{ckpt.name}: removed before it was scored (checkpoint.keep_last); skipped")
        return None
    log(f"scored {ckpt.name}: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)))
    return {**r, "key": key, "settings": settings}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _sorted(done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(done.values(), key=lambda r: r["step"])


def curve_metrics(results: list[dict[str, Any]]) -> list[str]:
    if "wer" in results[0]:
        return ["cer", "wer"]
    if "bleu" in results[0]:
        return ["bleu", "exact_match"]
    if "loss" in results[0]:
        return ["loss", "bits_per_byte"]
    if "accuracy" in results[0] or "cer" in results[0]:
        return ["accuracy" if "accuracy" in results[0] else "cer"]
    # lm-eval tasks: the first metric of each task (``task/acc``), at most four panels.
    tasks: dict[str, str] = {}
    for k in results[0]:
        if "/" in k:
            tasks.setdefault(k.split("/")[0], k)
    return list(tasks.values())[:4]


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
        for r in results:
            for f in r.get("attention_pngs", ()):
                mlflow.log_artifact(f, "eval/attention")
            for f in r.get("audio_files", ()):
                mlflow.log_artifact(f, "eval/audio")
    finally:
        mlflow.end_run()
