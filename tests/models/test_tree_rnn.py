"""The recursive network batched by height equals the same cells applied node by node in
plain recursion (the definition), for both cells: logits and gradients."""

from __future__ import annotations

import pytest
import torch

from models.tree_rnn import TreeRNN, TreeRNNConfig
from trainer.data.listops import (
    BINARY_VOCAB,
    JOIN,
    VOCAB,
    Node,
    batch_of,
    binarized,
    generate,
    parse,
)


def recursive_state(m: TreeRNN, node: Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, c) of ``node`` by the equations in ``models/tree_rnn.py``'s docstring, one node at a time."""
    d = m.cfg.d_model
    kids = [recursive_state(m, k) for k in node.children]
    x = m.embed.weight[(BINARY_VOCAB if m.cfg.binary else VOCAB).index(node.token)]
    W, b = m.W.weight, m.W.bias
    if m.cfg.binary:  # left and right child, zero states at a leaf
        (hl, cl), (hr, cr) = kids if kids else [(torch.zeros(d), torch.zeros(d))] * 2
        i, o, u, fl, fr = (W @ x + b + m.U @ torch.cat([hl, hr])).chunk(5)
        c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(fl) * cl + torch.sigmoid(fr) * cr
        return torch.sigmoid(o) * torch.tanh(c), c
    h_sum = sum((h for h, _ in kids), torch.zeros(d))
    if m.cfg.cell == "tanh":
        return torch.tanh(W @ x + b + m.U @ h_sum), None
    Wi, Wo, Wu, Wf = W.chunk(4, 0)
    bi, bo, bu, bf = b.chunk(4, 0)
    Ui, Uo, Uu = m.U.chunk(3, 0)
    i = torch.sigmoid(Wi @ x + bi + Ui @ h_sum)
    o = torch.sigmoid(Wo @ x + bo + Uo @ h_sum)
    u = torch.tanh(Wu @ x + bu + Uu @ h_sum)
    c = i * u + sum((torch.sigmoid(Wf @ x + bf + m.U_f @ hk) * ck for hk, ck in kids), torch.zeros(d))
    return o * torch.tanh(c), c


def test_binarized_trees_are_the_released_parses():
    """Nangia & Bowman's TSV parse of ``[MAX 2 9 [MIN 4 7 ] 0 ]``: each list a left-branching
    chain of its operator and arguments, closed by ``]``."""
    def parens(n: Node) -> str:
        return n.token if not n.children else f"( {parens(n.children[0])} {parens(n.children[1])} )"

    tree = binarized(parse("[MAX 2 9 [MIN 4 7 ] 0 ]"))
    assert parens(tree) == "( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"
    assert tree.token == JOIN and all(len(n.children) in (0, 2) for n in _nodes(tree))


def _nodes(n: Node):
    yield n
    for c in n.children:
        yield from _nodes(c)


@pytest.mark.parametrize("cell", ["tree_lstm", "binary_lstm", "tanh"])
def test_batched_by_height_equals_node_by_node_recursion(cell):
    trees = generate(24, seed=3, max_tokens=60)
    assert len({t.height() for t in trees}) > 2  # several shapes in one batch
    m = TreeRNN(TreeRNNConfig(cell=cell, vocab_size=16 if cell == "binary_lstm" else 14, n_classes=10, d_model=16, init_std=0.3), seed=1)
    batch = batch_of(trees, binary=m.cfg.binary)
    logits = m(**{k: v for k, v in batch.items() if k != "labels"})
    want = torch.stack([m.head(recursive_state(m, binarized(t) if m.cfg.binary else t)[0]) for t in trees])
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)

    loss = m(**batch)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref = torch.nn.functional.cross_entropy(want, batch["labels"])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, list(m.parameters())), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
