"""lm-evaluation-harness through ``seqtrain eval --tasks``: lm-eval's scores equal ones computed
here from the model's own log-probabilities, on local tasks (offline)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli

TASK_DIR = REPO / "tests/tools/lm_tasks"
TASKS = "seqtrain_cloze_mc,seqtrain_cloze_ll"


def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one forward of the whole text, and whether every
    continuation token is the argmax. The continuation's tokens are those of the whole text
    past the context's (lm-eval's definition for causal models)."""
    ctx = tok.encode(context, add_special_tokens=False).ids
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
    target = torch.tensor(whole[len(ctx):])
    lp = logp[len(ctx) - 1:]
    return lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def _independent_scores(ckpt) -> dict[str, float]:
    from trainer.evaluation.inference import load_for_inference

    model, tok, _, _ = load_for_inference(ckpt)
    docs = [json.loads(ln) for ln in (TASK_DIR / "cloze.jsonl").read_text().splitlines()]
    acc, acc_norm, gold_ll, greedy = [], [], [], []
    for d in docs:
        lls = np.array([_loglikelihood(model, tok, d["context"], " " + c)[0] for c in d["choices"]])
        acc.append(lls.argmax() == d["gold"])
        acc_norm.append((lls / np.array([len(c) for c in d["choices"]])).argmax() == d["gold"])
        ll, g = _loglikelihood(model, tok, d["context"], " " + d["choices"][d["gold"]])
        gold_ll.append(ll)
        greedy.append(g)
    return {"seqtrain_cloze_mc/acc": np.mean(acc), "seqtrain_cloze_mc/acc_norm": np.mean(acc_norm),
            "seqtrain_cloze_ll/perplexity": math.exp(-np.mean(gold_ll)),
            "seqtrain_cloze_ll/acc": np.mean(greedy)}


def test_lm_eval_scores_equal_our_log_probabilities_for_every_checkpoint(gpt_run, cache_dir):
    root, _, uri = gpt_run
    run = root / "run"
    p = run_cli(["eval", str(run), "--tasks", TASKS, "--task-dir", str(TASK_DIR), "--json"], cache_dir)
    results = json.loads(p.stdout)
    assert [r["step"] for r in results] == [10, 20, 30]
    for r in results:
        want = _independent_scores(r["checkpoint"])
        for k, v in want.items():
            assert r[k] == pytest.approx(v, rel=1e-6), k
    assert results[-1]["seqtrain_cloze_mc/acc"] > 0.25  # above chance after 30 steps
    rows = [json.loads(ln) for ln in (run / "eval/results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "harness" in r["settings"]] == [10, 20, 30]
    assert (run / "eval/curve.png").stat().st_size > 0

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (run / "mlflow_run_id").read_text().strip()
    hist = client.get_metric_history(run_id, "eval/seqtrain_cloze_mc/acc")
    assert sorted(m.step for m in hist) == [10, 20, 30]


def test_unknown_tasks_and_empty_task_dirs_are_one_line_errors(gpt_run, cache_dir, tmp_path):
    run = gpt_run[0] / "run"
    p = run_cli(["eval", str(run), "--tasks", "seqtrain_cloze_mcq", "--task-dir", str(TASK_DIR)],
                cache_dir, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "seqtrain_cloze_mcq" in p.stderr and "close matches: seqtrain_cloze_mc" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run_cli(["eval", str(run), "--tasks", "hellaswag", "--task-dir", str(tmp_path / "empty")],
                cache_dir, check=False)
    assert p.returncode == 2 and "no lm-eval task YAML files there" in p.stderr.strip().splitlines()[-1]
    assert len(p.stderr.strip().splitlines()) == 1


def test_rolling_loglikelihood_and_greedy_generation_are_the_models(gpt_run):
    """The other two request kinds: a whole text's log-likelihood after EOS (one window here),
    and greedy generation cut at the first stop string."""
    from tools.harness import SeqtrainLM
    from trainer.evaluation.inference import load_for_inference

    model, tok, _, _ = load_for_inference(gpt_run[0] / "run")
    lm = SeqtrainLM(model, tok)

    class Request:
        def __init__(self, *args):
            self.args = args

    text = "the cat sees the ball."
    [rolling] = lm.loglikelihood_rolling([Request(text)])
    ll, _ = _loglikelihood(model, tok, "<|endoftext|>", text)  # EOS is one token of our vocabulary
    assert rolling == pytest.approx(ll, rel=1e-6)
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("my friend", add_special_tokens=False).ids]
    greedy = tok.decode(model.generate(torch.tensor([ids]), 12, 0.0)[0, len(ids):].tolist())
    [out] = lm.generate_until([Request("my friend", {"until": ["."], "max_gen_toks": 12})])
    assert out == greedy.split(".")[0] and out
