"""Host syncs: the step's own code never reads the device between logging steps.

A run of 20 steps with ``train.log_every=10`` under a recorder that patches every way of reading
a tensor on the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``float``/``int``/``bool``,
``torch.cuda.synchronize``) and keeps the calls made directly by the project's own training
code (``models/``, ``trainer/`` but not ``trainer/data/``, whose tensors are host data). On a GPU
each such read waits for the queue to drain; here the count is what matters. DeepSpeed's own
reads (its overflow checks, its pipeline schedule) are its own and not counted.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY, make_corpus, run_cli, sets

RECORDER = '''
import json, os, sys
import torch
sys.path.insert(0, {repo!r})
ROOTS = (os.path.join({repo!r}, "trainer"), os.path.join({repo!r}, "models"))
SKIP = os.path.join({repo!r}, "trainer", "data")
from trainer import loop
state = {{"trainer": None, "in_step": False}}
calls = []

def record(name):
    caller = sys._getframe(2)
    f = caller.f_code.co_filename
    if not f.startswith(ROOTS) or f.startswith(SKIP) or state["trainer"] is None:
        return
    t = state["trainer"]
    calls.append({{"what": name, "where": f"{{os.path.relpath(f, {repo!r})}}:{{caller.f_lineno}}",
                  "step": t.step, "in_step": state["in_step"], "sync_point": t.at_sync_point()}})

def patch(owner, name):
    orig = getattr(owner, name)
    def wrapper(*args, **kwargs):
        record(name)
        return orig(*args, **kwargs)
    setattr(owner, name, wrapper)

for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
    patch(torch.Tensor, name)
patch(torch.cuda, "synchronize")
init, train_step, fit = loop.Trainer.__init__, loop.Trainer.train_step, loop.Trainer.fit

def capture(self, *a, **k):
    init(self, *a, **k)
    state["trainer"] = self

def step(self):
    state["in_step"] = True
    try:
        return train_step(self)
    finally:
        state["in_step"] = False

def fit_and_write(self):
    fit(self)  # (ranks leave with os._exit: no atexit)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join({out!r}, f"syncs_{{rank}}.json"), "w") as f:
        f.write(json.dumps(calls))

loop.Trainer.__init__, loop.Trainer.train_step, loop.Trainer.fit = capture, step, fit_and_write
from trainer.cli import main
sys.argv = ["seqtrain", *sys.argv[1:]]
main()
'''

GPT = str(REPO / "configs/gpt/debug.yaml")
RNN = str(REPO / "configs/rnn/gru-attn-debug.yaml")
RNN_ARGS = ["data.source=dates", "data.num_pairs=200", "model.d_hidden=32", "eval.decode_samples=0",
            "data.max_tokens=null", "train.micro_batch_size=4", "tracking.enabled=false"]
RUNS = {
    "gpt-local-fp32": (GPT, 1, TINY),
    "gpt-zero1-bf16": (GPT, 1, [*TINY, "parallel.zero_stage=1", "train.precision=bf16"]),
    "gpt-dp2-zero2": (GPT, 2, [*TINY, "parallel.zero_stage=2"]),
    "gpt-pp2": (GPT, 2, [*TINY, "parallel.pp=2"]),
    "rnn-seq2seq": (RNN, 1, RNN_ARGS),
}


@pytest.mark.distributed
@pytest.mark.parametrize("run", list(RUNS))
def test_no_host_sync_between_logging_steps(run, cache_dir, tmp_path):
    preset, nproc, extra = RUNS[run]
    corpus = make_corpus(tmp_path / "corpus")
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER.format(repo=str(REPO), out=str(tmp_path)))
    args = [f"data.source={corpus}", *extra, "train.steps=20", "train.log_every=10", "train.global_batch_size=8",
            "checkpoint.every=0", "eval.every=0"]
    run_cli(["train", preset, "--run-dir", str(tmp_path / "run"), *sets(*args)], cache_dir, nproc=nproc,
            script=script)
    for rank in range(nproc):
        calls = json.loads((tmp_path / f"syncs_{rank}.json").read_text())
        # Inside a step: never. Between steps: only where the loop reads the device (steps 10
        # and 20), and once after the first step (the start-up line).
        inside = [c for c in calls if c["in_step"]]
        between = [c for c in calls if not c["in_step"] and not c["sync_point"] and c["step"] > 1]
        assert not inside and not between, (inside + between)[:5]
        assert {c["step"] for c in calls if c["sync_point"]} <= {10, 20}
        assert [c for c in calls if c["step"] == 10], "the recorder saw the logging step's reads"
