"""Decoding shared by the encoder-decoder families: greedy and beam search.

Both take ``step_fn(prefix) -> log-probabilities of the next token`` for a batch of prefixes, so
one implementation serves the Transformer and the RNN with attention (each re-runs its decoder
over the prefix; decoding is not the training hot path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(row indices into the source batch, prefixes (N, t)) -> next-token log-probs (N, V)."""


@torch.no_grad()
def greedy(step_fn: StepFn, batch: int, bos: int, eos: int, max_len: int, device=None) -> list[list[int]]:
    prefix = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_len):
        nxt = step_fn(rows, prefix).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return [_strip(p[1:].tolist(), eos) for p in prefix]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def beam_search(
    step_fn: StepFn, batch: int, bos: int, eos: int, max_len: int, beam: int = 4,
    length_penalty: float = 1.0, device=None,
) -> list[list[int]]:
    """Best hypothesis per source row by score = sum log p / len^length_penalty (GNMT-style
    normalisation with alpha = length_penalty; 0 means raw log-probability).

    Finished hypotheses (ending in EOS) are kept aside; search stops when every row has ``beam``
    finished ones that no live hypothesis can still beat, or at ``max_len``.
    """
    rows = torch.arange(batch, device=device).repeat_interleave(beam)
    prefix = torch.full((batch * beam, 1), bos, dtype=torch.long, device=device)
    # Only the first beam of each row is live at the start (the others would duplicate it).
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]

    def norm(score: float, length: int) -> float:
        return score / (max(length, 1) ** length_penalty)

    for t in range(1, max_len + 1):
        logp = step_fn(rows, prefix)  # (batch*beam, V)
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(batch, beam * vocab)
        top, idx = cand.topk(2 * beam, dim=-1)  # room to replace beams that finish
        new_prefix, new_scores = [], torch.full((batch, beam), float("-inf"), device=device)
        for b in range(batch):
            kept = 0
            for j, (s, i) in enumerate(zip(top[b].tolist(), idx[b].tolist(), strict=True)):
                if s == float("-inf"):
                    break
                src_beam, tok = divmod(i, vocab)
                seq = prefix[b * beam + src_beam]
                if tok == eos:
                    # Only an EOS among the top ``beam`` candidates ends a hypothesis (as in
                    # fairseq): with beam 1 the search is then exactly greedy.
                    if j < beam:
                        finished[b].append((norm(s, t), seq[1:].tolist()))
                    continue
                if kept < beam:
                    new_prefix.append(torch.cat([seq, seq.new_tensor([tok])]))
                    new_scores[b, kept] = s
                    kept += 1
            while kept < beam:  # pad a row whose candidates ran out
                new_prefix.append(torch.cat([prefix[b * beam], prefix.new_tensor([eos])]))
                kept += 1
        prefix = torch.stack(new_prefix)
        scores = new_scores

        if all(_settled(finished[b], scores[b], beam, norm, t) for b in range(batch)):
            break
    out = []
    for b in range(batch):
        if not finished[b]:  # nothing ended in EOS: take the best live prefix
            best = int(scores[b].argmax())
            finished[b].append((0.0, prefix[b * beam + best][1:].tolist()))
        out.append(max(finished[b], key=lambda f: f[0])[1])
    return out


def _settled(finished: list[tuple[float, list[int]]], live_scores: torch.Tensor, beam: int,
             norm: Callable[[float, int], float], best_len: int) -> bool:
    """True when ``beam`` finished hypotheses exist and the best live one, scored at its
    current length, is no better than the worst of them.

    Exact without length normalisation (log-probs only fall as hypotheses grow); with it, the
    same early-stopping heuristic as Hugging Face's beam search (a longer hypothesis could in
    principle still overtake, but waiting for that means decoding to max_len every time).
    """
    if len(finished) < beam:
        return False
    worst_kept = sorted(f[0] for f in finished)[-beam]
    return max(norm(float(s), best_len) for s in live_scores) <= worst_kept


@torch.no_grad()
def decode(step_fn: StepFn, batch: int, bos: int, eos: int, max_len: int, beam: int = 1,
           length_penalty: float = 1.0, device=None) -> list[list[int]]:
    """Greedy for ``beam == 1``, else beam search."""
    if beam == 1:
        return greedy(step_fn, batch, bos, eos, max_len, device)
    return beam_search(step_fn, batch, bos, eos, max_len, beam, length_penalty, device)
