"""Sequence-to-sequence decoding metrics: exact match, BLEU and chrF (sacrebleu)."""

from __future__ import annotations

import sacrebleu


def text_metrics(hyps: list[str], refs: list[str], bleu_tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU and chrF from sacrebleu on detokenized text, and exact match in percent."""
    if not hyps:
        return {}
    exact = 100.0 * sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True)) / len(hyps)
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize=bleu_tokenize).score
    chrf = sacrebleu.corpus_chrf(hyps, [refs]).score
    return {"exact_match": exact, "bleu": bleu, "chrf": chrf}
