"""``seqtrain eval --tasks``: lm-evaluation-harness tasks on a seqtrain language model.

lm-eval drives an in-process ``LM`` adapter (``SeqtrainLM``) rather than its own HF model on a
temporary export, because: it scores every language-model family we train (the HF export holds
only GPT), through the run's own tokenizer and the consolidated weights that ``eval`` already
loads from any layout, with no export written per checkpoint of a curve; and the scores are the
model's own log-probabilities, which the tests recompute independently.

Hub tasks download their datasets (network); tasks in ``--task-dir`` (lm-eval YAML) run offline
when their data is local.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import TemplateLM

from trainer.data.tokenizer import EOS
from trainer.errors import DataError, SeqtrainError


class SeqtrainLM(TemplateLM):
    """lm-eval's view of a seqtrain LM: token log-likelihoods from one forward over
    context + continuation (right-padded batches, so a causal model's scores do not change),
    rolling windows for perplexity, greedy generation."""

    def __init__(self, model: torch.nn.Module, tok, batch_size: int = 16) -> None:
        super().__init__()
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size
        self._eot = tok.token_to_id(EOS)
        # GPT: its positions; a recurrent LM reads any length.
        self.max_length = getattr(model.cfg, "max_seq_len", None) or 1 << 30

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out  # recurrent LMs also return their state

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) per pair;
        the input is the last ``max_length`` tokens of context + continuation."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for k in range(0, len(order), self.batch_size):
            idx = order[k: k + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in idx]
            x = torch.full((len(rows), max(map(len, rows))), self._eot, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, : len(row)] = torch.tensor(row)
            logp = F.log_softmax(self._logits(x).float(), dim=-1)
            for r, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1])
                lp = logp[r, len(rows[r]) - len(cont): len(rows[r])]
                out[i] = (lp.gather(-1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        res = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, res, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self._eot, self.max_length, 1)]
            out.append(sum(ll for ll, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or [self.tok.decode([self._eot])]
            until = [until] if isinstance(until, str) else until
            n_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = ([self._eot] + self.tok_encode(context))[-max(1, self.max_length - n_new):]
            gen = self.model.generate(torch.tensor([ids]), n_new, 0.0, stop_tokens=(self._eot,))
            text = self.tok.decode([t for t in gen[0, len(ids):].tolist() if t != self._eot])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


class Harness:
    """Tasks to score every checkpoint on, with lm-eval's task index built once (seconds)."""

    def __init__(self, tasks: list[str], task_dir: str | None = None, num_fewshot: int | None = None,
                 limit: int | None = None) -> None:
        self.tm = task_manager(task_dir)
        check_tasks(self.tm, tasks, task_dir)
        self.tasks, self.task_dir, self.num_fewshot, self.limit = tasks, task_dir, num_fewshot, limit

    def settings(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "task_dir": self.task_dir, "num_fewshot": self.num_fewshot,
                "limit": self.limit}

    def score(self, model: torch.nn.Module, tok) -> dict[str, float]:
        return run_tasks(model, tok, self.tm, self.tasks, self.num_fewshot, self.limit)


def task_manager(task_dir: str | None):
    """lm-eval's task index: its own tasks plus those under ``task_dir``."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        d = Path(task_dir)
        if not d.is_dir() or not any(d.rglob("*.yaml")):
            raise SeqtrainError(f"--task-dir {task_dir}: no lm-eval task YAML files there")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its index warnings are not ours to show
    return TaskManager(include_path=task_dir)


def check_tasks(tm, tasks: list[str], task_dir: str | None) -> None:
    """One line naming a task lm-eval does not know, with what it does know."""
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            local = sorted(_local_tasks(task_dir)) if task_dir else []
            close = difflib.get_close_matches(t, known, n=5)
            raise SeqtrainError(
                f"--tasks: lm-eval knows no task {t!r}; close matches: {', '.join(close) or 'none'}; "
                f"in --task-dir: {', '.join(local) or 'none'} ({len(known):,} tasks in all; "
                "`python -m lm_eval ls tasks` lists them)")


def _local_tasks(task_dir: str) -> set[str]:
    names = set()
    for f in Path(task_dir).rglob("*.yaml"):
        try:
            doc = yaml.load(f.read_text(), Loader=_IgnoreTags)
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.add(doc["task"])
    return names


class _IgnoreTags(yaml.SafeLoader):
    """lm-eval YAML uses ``!function`` tags; listing task names needs none of them."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def run_tasks(model: torch.nn.Module, tok, tm, tasks: list[str], num_fewshot: int | None = None,
              limit: int | None = None) -> dict[str, float]:
    """``{"task/metric": value}`` of lm-eval's ``simple_evaluate`` on this model."""
    from lm_eval import simple_evaluate

    try:
        res = simple_evaluate(model=SeqtrainLM(model, tok), tasks=tasks, num_fewshot=num_fewshot,
                              limit=limit, task_manager=tm, log_samples=False, bootstrap_iters=0,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0)
    except ConnectionError as e:  # a task's dataset on the Hub, which an offline node cannot reach
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--tasks {','.join(tasks)}: {first}; on an offline node, run these tasks once where "
                        "the Hub is reachable (the datasets cache then serves them) or give local tasks "
                        "with --task-dir") from None
    return flatten_results(res["results"])


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{"task": {"acc,none": v, "acc_stderr,none": "N/A", ...}}`` ► ``task/acc``."""
    out = {}
    for task, metrics in results.items():
        for key, v in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(v, int | float) and not isinstance(v, bool) and "stderr" not in name \
                    and name != "sample_len":  # documents scored, not a metric
                out[f"{task}/{name}" + (f"[{filt}]" if filt not in ("", "none") else "")] = float(v)
    return out
