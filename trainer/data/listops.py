"""ListOps (Nangia & Bowman 2018): nested list operations over digits, label = the value.

``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 9. Operators: ``[MAX``, ``[MIN``, ``[MED`` (the median, as
``int(numpy.median)``: the mean of the two middle values rounded down for an even count) and
``[SM`` (sum modulo 10); ``]`` closes a list.

Generated locally and deterministically from a seed with the settings of the authors' released
generator: an argument is a list with probability 0.25 (else a digit), a list has 2 to 5
arguments, the depth is at most 20; the root is always a list. Expressions longer than
``max_tokens`` are drawn again. Splits by a hash of the expression's text, so a given expression
always lands in the same split.

Parsed into trees for the recursive network: every node is a token (an operator or a digit);
an operator's children are its arguments in order.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import DataConfig
from trainer.data.corpus import name_key
from trainer.errors import DataError

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
DIGITS = tuple(str(d) for d in range(10))
VOCAB = (*OPERATORS, *DIGITS)
"""Token ids of tree nodes (``]`` only closes a list: it is no node)."""
SEQ_VOCAB = (*VOCAB, CLOSE)
"""Token ids of the expression read as a sequence (brackets included); padding is one more."""
SEQ_PAD = len(SEQ_VOCAB)
N_CLASSES = 10
LIST_P, MAX_ARGS, MAX_DEPTH = 0.25, 5, 20


@dataclass
class Node:
    token: str
    children: list[Node] = field(default_factory=list)

    def value(self) -> int:
        """What the expression evaluates to."""
        if not self.children:
            return int(self.token)
        args = [c.value() for c in self.children]
        if self.token == "[MAX":
            return max(args)
        if self.token == "[MIN":
            return min(args)
        if self.token == "[MED":
            return int(statistics.median(args))
        return sum(args) % 10

    def text(self) -> str:
        if not self.children:
            return self.token
        return " ".join([self.token, *(c.text() for c in self.children), CLOSE])

    def height(self) -> int:
        """0 for a digit, else one more than its highest argument."""
        return 1 + max(c.height() for c in self.children) if self.children else 0


def _draw(rng: random.Random, depth: int) -> Node:
    if depth > 1 and (depth >= MAX_DEPTH or rng.random() >= LIST_P):
        return Node(rng.choice(DIGITS))
    op = rng.choice(OPERATORS)
    return Node(op, [_draw(rng, depth + 1) for _ in range(rng.randint(2, MAX_ARGS))])


def generate(n: int, seed: int, max_tokens: int = 100) -> list[Node]:
    """``n`` expressions of at most ``max_tokens`` tokens, the same for the same seed."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        tree = _draw(rng, 1)
        if len(tree.text().split()) <= max_tokens:
            out.append(tree)
    return out


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` by a hash of the expression."""
    k = name_key(text, "listops")
    return "test" if k < test_fraction else "val" if k < test_fraction + val_fraction else "train"


def parse(text: str, where: str = "expression") -> Node:
    """An expression's tree; a malformed one is a ``DataError`` naming ``where`` (file:line)."""
    tokens = text.split()
    stack: list[Node] = []
    root = None
    for i, tok in enumerate(tokens):
        if tok in OPERATORS:
            node = Node(tok)
            if stack:
                stack[-1].children.append(node)
            elif root is not None:
                raise DataError(f"{where}: a second expression starts at token {i + 1} ({tok!r})")
            stack.append(node)
        elif tok == CLOSE:
            if not stack:
                raise DataError(f"{where}: unbalanced ']' at token {i + 1}")
            node = stack.pop()
            if len(node.children) < 1:
                raise DataError(f"{where}: {node.token} at token {i + 1} closes with no arguments")
            root = node if not stack else root
        elif tok in DIGITS:
            if not stack:
                raise DataError(f"{where}: digit {tok!r} at token {i + 1} outside any list")
            stack[-1].children.append(Node(tok))
        else:
            raise DataError(f"{where}: unknown token {tok!r} at token {i + 1} (valid: {', '.join(VOCAB)}, ])")
    if stack:
        raise DataError(f"{where}: {len(stack)} list(s) left open ({stack[-1].token} is missing its ']')")
    if root is None:
        raise DataError(f"{where}: no expression")
    return root


def read_file(path, max_rows: int | None = None) -> Iterator[tuple[Node, int | None]]:
    """(tree, label or None) per line of a ListOps file: ``EXPRESSION`` or, as the released
    TSV files have it, ``LABEL<TAB>EXPRESSION`` (checked against the expression's value)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_rows is not None and lineno > max_rows:
                return
            if not line.strip():
                continue
            label, _, expr = line.rstrip("\n").rpartition("\t")
            where = f"{path}:{lineno}"
            tree = parse(expr, where)
            if label and (not label.strip().isdigit() or int(label) != tree.value()):
                raise DataError(f"{where}: label {label.strip()!r} is not the expression's value {tree.value()}")
            yield tree, int(label) if label else None


def sequence_batch(trees: Sequence[Node], labels: Sequence[int] | None = None) -> dict:
    """Expressions as token sequences for ``models.seq_classifier``: ids (``SEQ_VOCAB``) padded
    with ``SEQ_PAD``, the lengths (a host list) and the labels."""
    rows = [[SEQ_VOCAB.index(t) for t in tree.text().split()] for tree in trees]
    ids = torch.full((len(rows), max(map(len, rows))), SEQ_PAD, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "lengths": [len(r) for r in rows],
            "labels": torch.tensor(list(labels) if labels is not None else [t.value() for t in trees])}


Split = tuple[list[Node], list[int]]
"""Trees and their labels."""


def read_splits(cfg: DataConfig, seed: int) -> dict[str, Split]:
    """``train``, ``val`` and ``test``: hash slices of ``data.source`` (``listops``:
    ``data.num_pairs`` expressions generated from ``seed``, at most ``data.seq_len`` tokens each;
    else a ListOps file), or the files ``data.val_source`` / ``data.test_source`` where given
    (then that slice of the source trains)."""
    if cfg.source == "listops":
        rows = [(t, t.value()) for t in generate(cfg.num_pairs, seed, cfg.seq_len)]
    else:
        rows = _labelled(cfg.source, "data.source", cfg.seq_len)
    out: dict[str, Split] = {k: ([], []) for k in ("train", "val", "test")}
    for tree, label in rows:
        k = split_of(tree.text(), cfg.val_fraction, cfg.val_fraction)
        k = "train" if k != "train" and getattr(cfg, f"{k}_source") else k  # a file holds that split
        out[k][0].append(tree)
        out[k][1].append(label)
    for k in ("val", "test"):
        path = getattr(cfg, f"{k}_source")
        if path:
            rows = _labelled(path, f"data.{k}_source", cfg.seq_len)
            out[k] = ([t for t, _ in rows], [y for _, y in rows])
    for k in ("train", "val"):
        if not out[k][0]:
            raise DataError(f"data.source={cfg.source!r}: its {len(rows)} expressions leave the {k} split "
                            f"empty with data.val_fraction={cfg.val_fraction}; use more (data.num_pairs) "
                            "or give data.val_source")
    return out


def _labelled(path: str, key: str, max_tokens: int) -> list[tuple[Node, int]]:
    """A ListOps file's (tree, label) rows, each no longer than ``data.seq_len`` tokens."""
    if not Path(path).is_file():
        hint = " (or 'listops', the embedded generator)" if key == "data.source" else ""
        raise DataError(f"{key}={path!r}: no such file{hint}")
    rows = []
    for lineno, (tree, label) in enumerate(read_file(path), 1):
        if len(tree.text().split()) > max_tokens:
            raise DataError(f"{path}: expression {lineno} has {len(tree.text().split())} tokens, more than "
                            f"data.seq_len={max_tokens}; raise data.seq_len")
        rows.append((tree, tree.value() if label is None else label))
    if not rows:
        raise DataError(f"{key}={path!r}: no expressions")
    return rows


JOIN = "·"
"""The token of an inner node of a binarized tree (its embedding acts as a learned bias)."""
BINARY_VOCAB = (*SEQ_VOCAB, JOIN)
"""Node tokens of binarized trees."""


def binarized(node: Node) -> Node:
    """The tree of the authors' released parses, ``( ( ( [MAX 2 ) 9 ) ] )``: each list a
    left-branching chain that joins its operator with its arguments one by one, then with ``]``;
    the tokens (operators, digits, ``]``) are the leaves, every inner node (``JOIN``) has two
    children."""
    if not node.children:
        return Node(node.token)
    acc = Node(node.token)
    for child in node.children:
        acc = Node(JOIN, [acc, binarized(child)])
    return Node(JOIN, [acc, Node(CLOSE)])


def batch_of(trees: Sequence[Node], labels: Sequence[int] | None = None, binary: bool = False) -> dict[str, torch.Tensor]:
    """Trees as flat node tensors for ``models.tree_rnn``: each node's token id (``VOCAB``;
    ``BINARY_VOCAB`` with ``binary``: the trees binarized first), its parent's index (-1 at a
    root), its height (leaves 0), which child of its parent it is (``side``: 0 first), each
    tree's root index, and the labels (each tree's value when not given)."""
    vocab = BINARY_VOCAB if binary else VOCAB
    tokens, parent, level, side, roots = [], [], [], [], []

    def visit(node: Node, up: int, k: int) -> int:
        me = len(tokens)
        tokens.append(vocab.index(node.token))
        parent.append(up)
        side.append(k)
        level.append(0)
        level[me] = 1 + max(visit(c, me, i) for i, c in enumerate(node.children)) if node.children else 0
        return level[me]

    for tree in trees:
        roots.append(len(tokens))
        visit(binarized(tree) if binary else tree, -1, 0)
    out = {"tokens": torch.tensor(tokens), "parent": torch.tensor(parent), "level": torch.tensor(level),
           "side": torch.tensor(side), "roots": torch.tensor(roots)}
    out["labels"] = torch.tensor(list(labels) if labels is not None else [t.value() for t in trees])
    return out


def batcher(kind: str, binary: bool = False):
    """How an example family's batches are built: ``trees`` (binarized with ``binary``, the
    binary Tree-LSTM's input) or ``sequences``."""
    if kind == "sequences":
        return sequence_batch
    return lambda trees, labels=None: batch_of(trees, labels, binary)
