"""Sequence-to-sequence decoding metrics: exact match, BLEU and chrF (sacrebleu); character and
word error rates (jiwer) of transcriptions."""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import sacrebleu


def text_metrics(hyps: list[str], refs: Sequence[str | Sequence[str]], bleu_tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU and chrF from sacrebleu on detokenized text, and exact match in percent.

    A reference may be a list of equally good texts (every caption of a scene): a hypothesis
    matches exactly if it equals any, and sacrebleu scores against all of them. sacrebleu wants
    as many references for every hypothesis, so shorter lists repeat their first text, which
    changes neither score (BLEU clips n-gram counts by the maximum over references, and a copy
    adds no closer length; chrF takes the best reference)."""
    if not hyps:
        return {}
    sets = [[r] if isinstance(r, str) else list(r) for r in refs]
    exact = 100.0 * sum(h.strip() in {r.strip() for r in rs} for h, rs in zip(hyps, sets, strict=True)) / len(hyps)
    width = max(map(len, sets))
    streams = [[rs[k] if k < len(rs) else rs[0] for rs in sets] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, streams, tokenize=bleu_tokenize).score
    chrf = sacrebleu.corpus_chrf(hyps, streams).score
    return {"exact_match": exact, "bleu": bleu, "chrf": chrf}


def error_rates(hyps: list[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Character and word error rates of transcriptions against their (first) reference:
    (substitutions + deletions + insertions) / reference length, over the whole set (jiwer)."""
    if not hyps:
        return {}
    first = [r if isinstance(r, str) else r[0] for r in refs]
    return {"cer": jiwer.cer(first, hyps), "wer": jiwer.wer(first, hyps),
            "exact_match": 100.0 * sum(h.strip() == r.strip() for h, r in zip(hyps, first, strict=True)) / len(hyps)}
