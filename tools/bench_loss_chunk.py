"""Memory and time of the output layer + cross-entropy, whole logits against chunks.

    python -m tools.bench_loss_chunk [--tokens 4096] [--d-model 768] [--vocab 50304] [--chunk 0]

One forward and backward of ``ln_f(h) → head → loss`` on ``--tokens`` tokens, the rest of the
model left out (it is the same either way). Each variant runs in a fresh process: the bytes
autograd saves for backward (``tools.bench_activations.saved_bytes``: every storage once,
parameters excluded), the peak resident memory above the process's state before its first step
(the weights and inputs exist then; the largest allocations are mmapped and given back after
each step, so the peak is one step's), and the median
time of ``--repeat`` steps. ``--chunk 0``: ``train.loss_chunk``'s automatic size for the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from models.loss import TokenCrossEntropy
from tools.bench_activations import saved_bytes


class Head(nn.Module):
    """GPT's last norm, head and loss, as ``GPT.forward`` runs them."""

    def __init__(self, d_model: int, vocab: int, chunk: int) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.loss_fn = TokenCrossEntropy()
        self.loss_fn.chunk_tokens = chunk

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_fn.chunk_tokens:
            return self.loss_fn.head_forward(self.ln_f(h), self.lm_head.weight, labels)
        return self.loss_fn(self.lm_head(self.ln_f(h)), labels)


def measure(tokens: int, d_model: int, vocab: int, chunk: int, repeat: int) -> dict:
    torch.manual_seed(0)
    head = Head(d_model, vocab, chunk)
    h = torch.randn(tokens, d_model, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    head(h, labels).backward()  # warm-up: kernels, .grad buffers (in the peak: the same for both)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        head(h, labels).backward()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    saved = saved_bytes(head, h, labels)
    return {"chunk": chunk, "saved_mib": saved / 2**20, "peak_rss_mib": peak / 1024,
            "ms": 1e3 * statistics.median(times)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's variant
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.tokens, args.d_model, args.vocab, args.one, args.repeat)))
        return
    chunk = args.chunk or max(1, 2**26 // args.vocab)
    rows = []
    for variant in (0, chunk):  # fresh processes: one's peak must not hide the other's
        cmd = [sys.executable, "-m", "tools.bench_loss_chunk", "--tokens", str(args.tokens), "--d-model",
               str(args.d_model), "--vocab", str(args.vocab), "--repeat", str(args.repeat), "--one", str(variant)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"head + loss, {args.tokens} tokens, d_model {args.d_model}, vocab {args.vocab}, fp32 "
          f"(whole logits: {args.tokens * args.vocab * 4 / 2**20:.0f} MiB)")
    print("| train.loss_chunk | saved for backward MiB | peak RSS over the step MiB | ms per step |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['chunk'] or 'whole logits'} | {r['saved_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['ms']:.0f} |")


if __name__ == "__main__":
    main()
