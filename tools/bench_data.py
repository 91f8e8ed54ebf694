"""Data path benchmarks: preparation throughput side by side, memory of a preparation far larger
than the memory it is given, and loader throughput against the training step rate.

    python -m tools.bench_data throughput [--mb 64] [--workers 2]
    python -m tools.bench_data memory [--corpus-gb 3] [--limit-gb 1] [--workers 2]
    python -m tools.bench_data loader [--steps 200]

``throughput``: the same JSONL texts (``--mb`` of them) tokenized by the same trained byte-level
BPE three ways, each in a fresh process: ``seqtrain data prepare --workers N`` (read, split,
encode, write, concatenate), HF ``datasets``' ``map(batched=True, num_proc=N)`` over the same
file (encode only, into its Arrow cache), and the limit: a bare ``encode_batch_fast`` loop over
the texts already in memory (no reading, no writing). MB/s of input text.

``memory``: a JSONL corpus of ``--corpus-gb`` (64 MB of generated documents, repeated with new
line names) prepared with ``--workers`` processes inside a cgroup-v1 memory group of
``--limit-gb`` (page cache included, so the corpus cannot sit in memory), sampling every second
the proportional set size of the process tree (shared pages once), the group's usage and the shards done.

``loader``: samples/s of one rank's micro-batches from a three-source mixture (``MixtureBatches``,
random-access windows of 300 MB of tokens each), against the samples/s the planner predicts for
the 124M preset on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.config import load_config
from trainer.data.mixture import MixtureBatches
from trainer.data.sampler import WindowDataset

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/gpt/gpt2-124m.yaml"
WORDS = 30_000


def write_corpus(path: Path, mb: float, seed: int = 0, unique_mb: float = 64) -> int:
    """Generated JSONL documents (Zipf-distributed made-up words, 50-2000 per document): ``mb``
    MB, the first ``unique_mb`` of them repeated as often as needed. Returns bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(2, 10, size=WORDS)]
    block, size = [], 0
    while size < min(mb, unique_mb) * 1e6:
        idx = np.minimum(rng.zipf(1.2, size=int(rng.integers(50, 2000))), WORDS) - 1
        line = json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n"
        block.append(line)
        size += len(line)
    text = "".join(block).encode()
    written = 0
    with open(path, "wb") as f:
        while written < mb * 1e6:
            f.write(text)
            written += len(text)
    return written


def _prepare_args(corpus: Path, cache: Path, extra: list[str]) -> list[str]:
    sets = [f"data.source={corpus}", "data.max_bytes=null", f"data.cache_dir={cache}", *extra]
    return [sys.executable, "-m", "trainer", "data", "prepare", str(CONFIG), *(a for s in sets for a in ("--set", s))]


def _timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


HF_MAP = """
import sys, time, datasets
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
t_load = time.perf_counter()
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[4])
t0 = time.perf_counter()
print(t0 - t_load)
ds.map(lambda b: {"input_ids": [e.ids for e in tok.encode_batch_fast(b["text"], add_special_tokens=False)]},
       batched=True, num_proc=int(sys.argv[3]), remove_columns=["text"])
print(time.perf_counter() - t0)
"""

BARE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
texts = [json.loads(line)["text"] for line in open(sys.argv[1])]
t0 = time.perf_counter()
for i in range(0, len(texts), 256):
    tok.encode_batch_fast(texts[i:i + 256], add_special_tokens=False)
print(time.perf_counter() - t0)
"""


def throughput(mb: float, workers: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        corpus = work / "corpus.jsonl"
        size = write_corpus(corpus, mb, unique_mb=mb)
        # The tokenizer once (not timed), then each preparation from it.
        subprocess.run(_prepare_args(corpus, work / "c0", ["data.tokenizer.train_bytes=20000000"]), check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        tok = next((work / "c0" / "datasets").glob("*/tokenizer.json"))
        shard = max(1 << 20, int(size / (4 * workers)))  # a few shards per worker
        ours = _timed(_prepare_args(corpus, work / "c1", [f"data.tokenizer.path={tok}", f"data.shard_bytes={shard}"])
                      + ["--workers", str(workers)])
        one = _timed(_prepare_args(corpus, work / "c2", [f"data.tokenizer.path={tok}"]))
        phase = {c: json.loads(next((work / c / "datasets").glob("*/meta.json")).read_text())["seconds"]["encode"]
                 for c in ("c1", "c2")}
        hf_load, hf = (float(x) for x in subprocess.run(
            [sys.executable, "-c", HF_MAP, str(corpus), str(tok), str(workers), str(work / "hf")],
            check=True, capture_output=True, text=True).stdout.split()[-2:])
        bare = float(subprocess.run([sys.executable, "-c", BARE, str(corpus), str(tok)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb_s = lambda s: size / 1e6 / s  # noqa: E731
    print("| what | seconds | MB/s | of the limit |\n| --- | ---: | ---: | ---: |")
    for name, s in ((f"`seqtrain data prepare --workers {workers}` (whole command: start-up, read, encode, "
                     "write, concatenate)", ours),
                    ("the same, its encode phase (read JSONL, encode, write the shards; `meta.json`)", phase["c1"]),
                    ("`seqtrain data prepare` (one process, tokenizers' threads), whole command", one),
                    ("the same, its encode phase", phase["c2"]),
                    (f"HF `load_dataset('json')` + `map(batched=True, num_proc={workers})` (read into Arrow, encode)",
                     hf_load + hf),
                    ("the same, `map` alone (encode into Arrow)", hf),
                    ("bare `encode_batch_fast` loop, texts in memory (the limit)", bare)):
        print(f"| {name} | {s:.1f} | {mb_s(s):.2f} | {bare / s:.2f} |")
    print(f"\n{size / 1e6:.0f} MB of JSONL text")


def _tree_pss(pid: int) -> int:
    """Proportional set size of a process and its children: pages shared between them (the
    forked workers share the parent's imports) counted once in all, unlike summed RSS."""
    import psutil

    try:
        p = psutil.Process(pid)
        return sum(q.memory_full_info().pss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


def memory(corpus_gb: float, limit_gb: float, workers: int, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    corpus, cache = root / "corpus.jsonl", root / "cache"
    if not corpus.is_file() or corpus.stat().st_size < corpus_gb * 1e9:
        write_corpus(corpus, corpus_gb * 1e3)
    shutil.rmtree(cache, ignore_errors=True)
    group = Path("/sys/fs/cgroup/memory/seqtrain-bench")
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 2**30)))
    (group / "memory.max_usage_in_bytes").write_text("0")
    cmd = _prepare_args(corpus, cache, ["data.tokenizer.train_bytes=100000000"]) + ["--workers", str(workers)]
    # The child joins the group before it starts (page cache it reads is charged there too).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    t0, rows = time.time(), []
    while proc.poll() is None:
        done = len(list((cache / "datasets").glob(".*.partial/?????.json"))) if (cache / "datasets").is_dir() else 0
        rows.append((time.time() - t0, _tree_pss(proc.pid), int((group / "memory.usage_in_bytes").read_text()), done))
        time.sleep(1.0)
    out = proc.stdout.read()
    peak = int((group / "memory.max_usage_in_bytes").read_text())
    print(out.strip())
    print(f"exit {proc.returncode}; corpus {corpus.stat().st_size / 1e9:.2f} GB; cgroup limit {limit_gb} GiB; "
          f"group peak (resident + page cache) {peak / 2**20:.0f} MiB; process-tree PSS peak "
          f"{max(r[1] for r in rows) / 2**20:.0f} MiB")
    total = max(r[3] for r in rows) or 1
    print("| seconds | shards done | process-tree PSS MiB | group usage MiB |\n| ---: | ---: | ---: | ---: |")
    for frac in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        r = next((r for r in rows if r[3] >= frac * total), rows[-1])
        print(f"| {r[0]:.0f} | {r[3]} | {r[1] / 2**20:.0f} | {r[2] / 2**20:.0f} |")


def _planned_samples_per_s() -> float:
    """Samples/s one H100 trains the 124M preset at, by the planner (its fastest layout)."""
    out = subprocess.run([sys.executable, "-m", "trainer", "plan", str(CONFIG), "--gpus", "1", "--json"],
                         check=True, cwd=REPO, capture_output=True, text=True).stdout
    fastest = min(lay["step_time_s"] for lay in json.loads(out)["layouts"] if lay["fits"])
    return load_config(str(CONFIG), []).train.global_batch_size / fastest


def loader(steps: int) -> None:
    """Samples/s of ``MixtureBatches`` at the 124M preset's shapes (sequence 1024, micro 16,
    global 128 on one rank), three sources by weight, on this CPU; beside the GPU's need."""
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        sources = {}
        for i, (name, w) in enumerate({"web": 0.6, "code": 0.3, "books": 0.1}.items()):
            path = work / f"{name}.bin"
            np.random.default_rng(i).integers(0, 50257, size=50_000_000, dtype=np.uint16).tofile(path)
            sources[name] = (w, WindowDataset(path, np.dtype(np.uint16), 1024))
        batches = MixtureBatches(sources, 16, 8, 1, seed=0, say=lambda _: None)
        t0 = time.perf_counter()
        for s in range(steps):
            for m in range(8):
                batches.micro_batch(s, m, 0)
        rate = steps * 128 / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    need = _planned_samples_per_s()
    print(f"| loader (one rank, one thread) | samples/s |\n| --- | ---: |\n"
          f"| 3-source mixture, sequence 1024, micro 16 × accum 8 | {rate:,.0f} |\n"
          f"| 124M preset on one H100, the planner's fastest layout | {need:,.0f} |\n\n"
          f"headroom: {rate / need:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--mb", type=float, default=64)
    t.add_argument("--workers", type=int, default=2)
    m = sub.add_parser("memory")
    m.add_argument("--corpus-gb", type=float, default=3)
    m.add_argument("--limit-gb", type=float, default=1)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--dir", type=Path, default=Path("/tmp/bench-data-memory"))
    lo = sub.add_parser("loader")
    lo.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    if a.what == "throughput":
        throughput(a.mb, a.workers)
    elif a.what == "memory":
        memory(a.corpus_gb, a.limit_gb, a.workers, a.dir)
    else:
        loader(a.steps)


if __name__ == "__main__":
    main()
