"""Evaluations beside the validation loss, run by ``Trainer.evaluate`` (its ``evaluators``)."""

from __future__ import annotations

import torch.distributed as dist

from trainer.config import Config
from trainer.data.build import Data, Decodable
from trainer.evaluation.examples import ExampleValidation
from trainer.evaluation.inference import translate_ids
from trainer.loop import Trainer


class DecodeValidation:
    """Greedy/beam decoding of the first ``eval.decode_samples`` validation examples: exact
    match, BLEU and chrF (sacrebleu) against their detokenized references (every caption of a
    scene), or a transcription's character and word error rates. Each data-parallel rank
    decodes its share; the hypotheses are gathered to every rank (a collective)."""

    def __init__(self, cfg: Config, data: Decodable) -> None:
        self.cfg, self.data = cfg, data
        self.n = min(cfg.eval.decode_samples, data.n)
        self.refs = [data.references(i) for i in range(self.n)]

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        from trainer.evaluation.metrics import error_rates, text_metrics

        cfg, dims, data = self.cfg, trainer.dims, self.data
        if cfg.parallel.zero_stage == 3:
            return {}  # parameters are sharded; decode the checkpoint with `seqtrain generate`
        mine = list(range(dims.dp_rank, self.n, dims.dp))
        outs = translate_ids(trainer.module.model, [data.source(i) for i in mine], cfg.model.pad_id, data.eos,
                             cfg.data.seq_len, cfg.eval.beam, cfg.eval.length_penalty, trainer.device)
        hyps = {i: data.tokenizer.decode(o) for i, o in zip(mine, outs, strict=True)}
        if dist.is_initialized() and dims.dp > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, hyps)  # collective: every rank decodes its share
            hyps = {k: v for p in parts for k, v in p.items()}
        hyps_in_order = [hyps[i] for i in range(self.n)]
        scores = error_rates(hyps_in_order, self.refs) if data.transcribes \
            else text_metrics(hyps_in_order, self.refs, cfg.eval.bleu_tokenize)
        return {f"val_{k}": v for k, v in scores.items()}


def evaluators(cfg: Config, data: Data) -> list:
    """The evaluations a run adds to its validation loss: accuracy of a classifier, character
    error rate of a text-line recognizer, decoding metrics of a sequence-to-sequence model
    with ``eval.decode_samples`` > 0. A speech synthesiser has its validation loss only: what
    it says is scored by a recognizer (``seqtrain eval RUN --recognizer REC``)."""
    if cfg.family.examples == "sounds":
        return []
    if cfg.family.examples:
        return [ExampleValidation(cfg.family.examples)]
    if data.decodable is None or not cfg.eval.decode_samples:
        return []
    return [DecodeValidation(cfg, data.decodable)]
