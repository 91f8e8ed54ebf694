"""Evaluations beside the validation loss, run by ``Trainer.evaluate`` (its ``evaluators``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from trainer.config import Config
from trainer.data.build import Data
from trainer.evaluation.examples import ExampleValidation
from trainer.evaluation.inference import translate_ids
from trainer.loop import Trainer


class DecodeValidation:
    """Greedy/beam decoding of the first ``eval.decode_samples`` validation pairs: exact match,
    BLEU and chrF (sacrebleu) against the detokenized references. Each data-parallel rank
    decodes its share; the hypotheses are gathered to every rank (a collective)."""

    def __init__(self, cfg: Config, tgt_tok: Tokenizer, val_split, eos: int) -> None:
        self.cfg, self.tok, self.split, self.eos = cfg, tgt_tok, val_split, eos
        self.n = min(cfg.eval.decode_samples, len(val_split))
        self.refs = [tgt_tok.decode(val_split.tgt(i).tolist()) for i in range(self.n)]

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        from trainer.evaluation.metrics import text_metrics

        cfg, dims = self.cfg, trainer.dims
        if cfg.parallel.zero_stage == 3:
            return {}  # parameters are sharded; decode the checkpoint with `seqtrain generate`
        mine = list(range(dims.dp_rank, self.n, dims.dp))
        src = [torch.from_numpy(self.split.src(i).astype("int64")) for i in mine]
        outs = translate_ids(trainer.module.model, src, cfg.model.pad_id, self.eos, cfg.data.seq_len,
                             cfg.eval.beam, cfg.eval.length_penalty, trainer.device)
        hyps = {i: self.tok.decode(o) for i, o in zip(mine, outs, strict=True)}
        if dist.is_initialized() and dims.dp > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, hyps)  # collective: every rank decodes its share
            hyps = {k: v for p in parts for k, v in p.items()}
        hyps_in_order = [hyps[i] for i in range(self.n)]
        return {f"val_{k}": v for k, v in text_metrics(hyps_in_order, self.refs, cfg.eval.bleu_tokenize).items()}


def evaluators(cfg: Config, data: Data) -> list:
    """The evaluations a run adds to its validation loss: accuracy of a classifier, character
    error rate of a text-line recognizer, decoding metrics of a sequence-to-sequence model
    with ``eval.decode_samples`` > 0."""
    if cfg.family.examples:
        return [ExampleValidation(cfg.family.examples)]
    if data.decodable is None or not cfg.eval.decode_samples:
        return []
    return [DecodeValidation(cfg, *data.decodable)]
