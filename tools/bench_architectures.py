"""What an architecture buys, at equal CPU minutes: presets trained through ``seqtrain train``
on one thread each, then scored on their held-out test split with ``seqtrain eval``.

    python -m tools.bench_architectures listops|textlines|captions|speech|synthesis [--jobs 2] [--only PRESET] [--out /tmp/bench-arch]
    python -m tools.bench_architectures tree-steps

``listops``: the binary Tree-LSTM on the binarized gold trees and the child-sum Tree-LSTM on the
trees as written, against two sequential readers of the same expressions, an LSTM and a
Transformer encoder (``configs/listops/``); test accuracy.

``tree-steps``: the Tree-LSTM's training step time (forward and backward, one thread) as the
batch grows at fixed tree shapes, and as the trees deepen at a fixed batch: one pass per height
level, so time follows the height of the deepest tree and, within a level, the node count.

``textlines``: the four-corner MD-LSTM against a 1D bidirectional LSTM over the same block
columns (``configs/textlines/``); character error rate on the test lines, drawn in a slanted
font no training line has.

``captions``: the image captioners of ``configs/captions/`` (a CNN under the Transformer
encoder-decoder, and under the bidirectional GRU with an attention decoder); exact match and
BLEU against every caption of a scene, greedy and with a beam of 4, on validation scenes and on
the test scenes of colour-shape combinations no training scene shows; training FLOPs per
sample at the mean caption length.

``speech``: the speech recognizers of ``configs/speech/`` (log-mel frames and strided
convolutions under the Transformer encoder-decoder, and under the bidirectional GRU with an
attention decoder); character and word error rates on validation sentences (training voices)
and on test sentences read in an accent and timbre no training sentence has, greedy and with a
beam of 4; training FLOPs per sample at the mean sound and transcript lengths.

``synthesis``: the speech synthesizer (``configs/speech/synthesizer-debug.yaml``) trained beside
the GRU recognizer, which then listens: its character and word error rates on the synthesised
validation and test sentences against its rates on espeak-ng's own readings of them; the
synthesizer's training FLOPs per sentence at the mean sound and text lengths.

Each run is its own process with ``OMP_NUM_THREADS=1``; ``--jobs`` run side by side (one per
core). Its CPU time (user + system, from ``wait4``) is what the comparison holds equal: each
preset's step count was chosen to take about 15 CPU minutes on the machines this project runs
on, and the measured minutes are printed beside each accuracy. Prints Markdown rows for
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.tree_rnn import TreeRNN, TreeRNNConfig
from trainer import checkpoint
from trainer.data import scenes, speech
from trainer.data.listops import Node, batch_of
from trainer.evaluation.inference import load_captioner, load_synthesizer, load_transcriber

SUITES = {
    "listops": ["configs/listops/binary-tree-lstm.yaml", "configs/listops/tree-lstm.yaml", "configs/listops/lstm.yaml",
                "configs/listops/transformer.yaml"],
    "textlines": ["configs/textlines/mdlstm.yaml", "configs/textlines/bilstm.yaml"],
    "captions": ["configs/captions/transformer.yaml", "configs/captions/gru-attn.yaml"],
    "speech": ["configs/speech/recognizer-debug.yaml", "configs/speech/gru-attn-recognizer-debug.yaml"],
    "synthesis": ["configs/speech/gru-attn-recognizer-debug.yaml", "configs/speech/synthesizer-debug.yaml"],
}


def _start(config: str, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    cmd = [sys.executable, "-m", "trainer", "train", config, "--run-dir", str(run_dir),
           "--set", "tracking.enabled=false"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _train_all(configs: list[str], out: Path, jobs: int) -> dict[str, float]:
    """CPU seconds of each run, ``jobs`` at a time."""
    pending, running, cpu = list(configs), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            proc = _start(config, out / Path(config).stem)
            running[proc.pid] = (config, proc, time.time())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        config, _, t0 = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{config} failed: see {out / Path(config).stem}.log")
        cpu[config] = usage.ru_utime + usage.ru_stime
        print(f"{config}: {cpu[config] / 60:.1f} CPU min, {(time.time() - t0) / 60:.1f} min wall", flush=True)
    return cpu


def _test_score(run_dir: Path, split: str = "test", beam: int = 1, *extra: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "trainer", "eval", str(run_dir / "checkpoints"), "--split",
                          split, "--json", "--beam", str(beam), *extra], check=True, capture_output=True, text=True)
    rows = json.loads(res.stdout)
    return rows[-1] if isinstance(rows, list) else rows


def _chain(height: int) -> Node:
    """A list nested ``height`` deep, three arguments at every level."""
    node = Node("[SM", [Node("3"), Node("4"), Node("5")])
    for _ in range(height - 1):
        node = Node("[MAX", [Node("1"), node, Node("2")])
    return node


def _step_ms(model, batch: dict, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(**batch).backward()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def tree_steps() -> None:
    torch.set_num_threads(1)
    for cell in ("tree_lstm", "binary_lstm"):
        model = TreeRNN(TreeRNNConfig(cell=cell, vocab_size=16, n_classes=10, d_model=128))
        print(f"\n{cell}\n| batch | trees' height | nodes | levels | ms per step |\n|---:|---:|---:|---:|---:|")
        shapes = [(b, _chain(4)) for b in (16, 64, 256)] + [(64, _chain(h)) for h in (2, 8, 16)]
        for b, tree in shapes:
            batch = batch_of([tree] * b, binary=model.cfg.binary)
            print(f"| {b} | {tree.height()} | {len(batch['tokens'])} | {int(batch['level'].max()) + 1} "
                  f"| {_step_ms(model, batch):.1f} |")


def _caption_rows(configs: list[str], out: Path, cpu: dict[str, float]) -> None:
    print("| preset | model | steps | CPU min | GFLOPs per sample | scenes | exact match greedy / beam 4 "
          "| BLEU greedy / beam 4 |\n|---|---|---:|---:|---:|---|---:|---:|")
    for config in configs:
        run = out / Path(config).stem
        model, tok, cfg = load_captioner(checkpoint.resolve(run / "checkpoints"))
        train = scenes.read_splits(cfg.data, cfg.train.seed)["train"]
        mean_len = statistics.mean(len(tok.encode(c).ids) + 1 for c in train.targets)  # + EOS
        gflops = model.flops_per_sample(round(mean_len)) / 1e9
        for split, what in (("val", "validation (seen combinations)"), ("test", "test (unseen combinations)")):
            g, b = _test_score(run, split, 1), _test_score(run, split, 4)
            print(f"| `{config}` | {cfg.model.family} | {g['step']} | {cpu[config] / 60:.1f} | {gflops:.3f} | {what} "
                  f"| {g['exact_match']:.1f} / {b['exact_match']:.1f} % | {g['bleu']:.1f} / {b['bleu']:.1f} |")


def _speech_rows(configs: list[str], out: Path, cpu: dict[str, float]) -> None:
    print("| preset | model | steps | CPU min | GFLOPs per sample | sentences | CER greedy / beam 4 "
          "| WER greedy / beam 4 |\n|---|---|---:|---:|---:|---|---:|---:|")
    for config in configs:
        run = out / Path(config).stem
        model, tok, cfg = load_transcriber(checkpoint.resolve(run / "checkpoints"))
        train = speech.read_splits(cfg.data, cfg.train.seed, cfg.model.source.sample_rate, log=lambda _: None)["train"]
        samples = round(float(np.mean(np.diff(train.offsets))))
        chars = round(statistics.mean(len(tok.encode(t).ids) + 1 for t in train.texts))  # + EOS
        gflops = model.flops_per_sample(chars, samples) / 1e9
        for split, what in (("val", "validation (training voices)"), ("test", "test (unheard voice)")):
            g, b = _test_score(run, split, 1), _test_score(run, split, 4)
            print(f"| `{config}` | {cfg.model.family} | {g['step']} | {cpu[config] / 60:.1f} | {gflops:.3f} | {what} "
                  f"| {100 * g['cer']:.1f} / {100 * b['cer']:.1f} % | {100 * g['wer']:.1f} / {100 * b['wer']:.1f} % |")


def _synthesis_rows(configs: list[str], out: Path, cpu: dict[str, float]) -> None:
    recognizer, synthesizer = (out / Path(c).stem for c in configs)
    model, tok, cfg = load_synthesizer(checkpoint.resolve(synthesizer / "checkpoints"))
    train = speech.read_splits(cfg.data, cfg.train.seed, cfg.model.audio.sample_rate, log=lambda _: None)["train"]
    frames = cfg.model.audio.frames(round(float(np.mean(np.diff(train.offsets)))))
    chars = round(statistics.mean(len(tok.encode(t).ids) for t in train.texts))
    gflops = model.flops_per_sample(frames, chars) / 1e9
    print("| synthesizer | steps | CPU min | GFLOPs per sentence | sentences | recognizer CER / WER on the synthesis "
          "| on espeak-ng's readings | duration vs espeak-ng |\n|---|---:|---:|---:|---|---:|---:|---:|")
    for split, what in (("val", "validation"), ("test", "test")):
        r = _test_score(synthesizer, split, 1, "--recognizer", str(recognizer / "checkpoints"), "--limit", "500")
        print(f"| `{configs[1]}` | {r['step']} | {cpu[configs[1]] / 60:.1f} | {gflops:.3f} | {what} ({r['sentences']}) "
              f"| {100 * r['cer']:.1f} / {100 * r['wer']:.1f} % | {100 * r['espeak_cer']:.1f} / "
              f"{100 * r['espeak_wer']:.1f} % | {r['seconds_ratio']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=sorted([*SUITES, "tree-steps"]))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-arch"))
    ap.add_argument("--only", action="append", default=[], help="a preset's name (its file stem), repeatable")
    a = ap.parse_args()
    if a.suite == "tree-steps":
        return tree_steps()
    out = a.out / a.suite
    out.mkdir(parents=True, exist_ok=True)
    configs = [c for c in SUITES[a.suite] if not a.only or Path(c).stem in a.only]
    cpu = _train_all(configs, out, a.jobs)
    if a.suite == "captions":
        return _caption_rows(configs, out, cpu)
    if a.suite == "speech":
        return _speech_rows(configs, out, cpu)
    if a.suite == "synthesis":
        return _synthesis_rows(configs, out, cpu)
    metric, count = ("accuracy", "examples") if a.suite == "listops" else ("cer", "lines")
    print(f"| preset | model | steps | CPU min | test {metric} | {count} |\n|---|---|---:|---:|---:|---:|")
    for config in configs:
        r = _test_score(out / Path(config).stem)
        print(f"| `{config}` | {r['family']} | {r['step']} | {cpu[config] / 60:.1f} | {100 * r[metric]:.1f} % "
              f"| {r[count]} |")


if __name__ == "__main__":
    main()
