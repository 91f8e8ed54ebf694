"""Recursive networks over trees: the child-sum and the binary (N-ary, N = 2) Tree-LSTM (Tai,
Socher & Manning 2015) and the plain recursive tanh cell (Socher et al. 2011, child-sum form), as
a classifier of each tree's root.

A batch is a forest flattened into nodes (``trainer/data/listops.py``'s ``batch_of``): each
node's token, its parent's index (-1 at a root), its height (0 at a leaf) and each tree's root.
Nodes are composed bottom-up **by height**: every node of one height, across the whole batch,
in one matmul, its children (all lower, so already computed) gathered by index and summed with
``index_add_``. A step therefore costs one pass per height level, whatever the batch size:
Python runs ``max height + 1`` iterations, not one per node.

Child-sum Tree-LSTM, node j with children C(j), input x_j (its token's embedding):

    h̃_j = Σ_{k∈C(j)} h_k
    i_j, o_j, u_j = σ(W_i x_j + U_i h̃_j + b_i), σ(W_o x_j + U_o h̃_j + b_o), tanh(W_u x_j + U_u h̃_j + b_u)
    f_jk = σ(W_f x_j + U_f h_k + b_f)            (a forget gate per child)
    c_j = i_j ⊙ u_j + Σ_k f_jk ⊙ c_k,   h_j = o_j ⊙ tanh(c_j)

Binary Tree-LSTM, on binarized trees (every inner node has a left child L and a right child R;
``batch_of(..., binary=True)``): the children's states are concatenated, not summed, so the
cell knows which is which, with a forget gate for each:

    i, o, u, f_L, f_R = σ/tanh(W x_j + U [h_L; h_R] + b)
    c_j = i ⊙ u + f_L ⊙ c_L + f_R ⊙ c_R,   h_j = o ⊙ tanh(c_j)

Recursive tanh cell: h_j = tanh(W x_j + U h̃_j + b).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.init import count_params, init_matrices_


class TreeRNNConfig(BaseModel):
    """A recursive network classifying trees by their root."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    family: Literal["tree_rnn"] = "tree_rnn"
    """Model family."""
    cell: Literal["tree_lstm", "binary_lstm", "tanh"] = "tree_lstm"
    """``tree_lstm``: child-sum Tree-LSTM over the trees as given; ``binary_lstm``: binary
    Tree-LSTM over the binarized trees; ``tanh``: plain recursive cell (child sum)."""
    vocab_size: int | None = Field(None, ge=2)
    """Node tokens (ListOps: 4 operators and 10 digits); null: the task's."""
    n_classes: int | None = Field(None, ge=2)
    """Classes of a tree (ListOps: its value, 0 to 9); null: the task's."""
    d_model: int = Field(128, ge=1)
    """Embedding and state size."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the root state before the classifier."""
    init_std: float = Field(0.1, gt=0)
    """Std of the normal init of the weights."""

    @property
    def binary(self) -> bool:
        """Reads binarized trees (``trainer/data/listops.py``'s ``batch_of(binary=True)``)."""
        return self.cell == "binary_lstm"


class TreeRNN(nn.Module):
    def __init__(self, cfg: TreeRNNConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.vocab_size is None or cfg.n_classes is None:
            raise ValueError("TreeRNNConfig.vocab_size and n_classes must be resolved first")
        self.cfg = cfg
        d, gates = cfg.d_model, {"tree_lstm": 4, "binary_lstm": 5, "tanh": 1}[cfg.cell]
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.W = nn.Linear(d, gates * d)  # i, o, u, f (Tree-LSTM; f_L, f_R binary) from the node's own input
        # The recurrent weights are used once per height level. They are this module's own
        # parameters, not submodules called per level, so that ZeRO-3 gathers them once per
        # forward (and once per backward) whatever the number of levels, which differs between
        # ranks: it gathers a module's parameters each time that module is called.
        if cfg.binary:  # i, o, u, f_L, f_R from [h_L; h_R]
            self.U = nn.Parameter(torch.empty(gates * d, 2 * d))
        else:  # i, o, u from the child sum (tanh: the state)
            self.U = nn.Parameter(torch.empty((gates - 1 if gates > 1 else 1) * d, d))
        self.U_f = nn.Parameter(torch.empty(d, d)) if gates == 4 else None  # f from each child
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d, cfg.n_classes)
        init_matrices_(self, seed, cfg.init_std)

    def num_params(self) -> int:
        return count_params(self)

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per node (a tree's "tokens" are its nodes): 6 × the cell's weights,
        each node multiplying W once, U once (its children's sum, or pair) and, as a child, U_f
        once (child-sum).
        An upper bound by a few percent: a leaf's U runs forward on its zero child sum, but
        autograd skips that product's input gradient (a constant has none), and a root is no
        child. The classifier runs once per tree and is not counted; ``seq_len`` plays no part."""
        n = self.W.weight.numel() + sum(p.numel() for p in (self.U, self.U_f) if p is not None)
        return float(6 * n), float(6 * self.num_params())

    def node_states(self, tokens: torch.Tensor, parent: torch.Tensor, level: torch.Tensor,
                    side: torch.Tensor) -> torch.Tensor:
        """Every node's state h, composed bottom-up one height level at a time."""
        n, d = len(tokens), self.cfg.d_model
        wx = self.W(self.embed(tokens))  # every node's input term at once
        h = wx.new_zeros(n, d)
        c = wx.new_zeros(n, d) if self.cfg.cell != "tanh" else None
        parent_level = torch.where(parent >= 0, level[parent.clamp(min=0)], -1)  # -1 at a root
        for lv in range(int(level.max()) + 1):
            idx = (level == lv).nonzero().squeeze(1)
            # Children of this level's nodes: the nodes whose parent is at this level.
            kids = (parent_level == lv).nonzero().squeeze(1)
            slot = torch.full((n,), -1, dtype=torch.long, device=tokens.device)
            slot[idx] = torch.arange(len(idx), device=tokens.device)
            into = slot[parent[kids]]  # each child's parent, as a row of this level
            if self.cfg.binary:
                h, c = self._binary_level(wx, h, c, idx, kids, into, side[kids])
                continue
            h_sum = h.new_zeros(len(idx), d).index_add(0, into, h[kids])
            if self.U_f is None:
                new_h = torch.tanh(wx[idx] + F.linear(h_sum, self.U))
            else:
                wi, wo, wu, wf = wx[idx].chunk(4, dim=1)
                ui, uo, uu = F.linear(h_sum, self.U).chunk(3, dim=1)
                f = torch.sigmoid(wf[into] + F.linear(h[kids], self.U_f))  # a forget gate per child
                new_c = torch.sigmoid(wi + ui) * torch.tanh(wu + uu) + \
                    h.new_zeros(len(idx), d).index_add(0, into, f * c[kids])
                new_h = torch.sigmoid(wo + uo) * torch.tanh(new_c)
                c = c.index_copy(0, idx, new_c)  # out of place: earlier levels' reads stay valid
            h = h.index_copy(0, idx, new_h)
        return h

    def _binary_level(self, wx, h, c, idx, kids, into, side):
        """One level of the binary Tree-LSTM: each node's left and right child (none at a leaf)."""
        n_lv, d = len(idx), self.cfg.d_model
        pair_h = h.new_zeros(n_lv, 2, d).index_put((into, side), h[kids])  # [h_L; h_R] per node
        pair_c = c.new_zeros(n_lv, 2, d).index_put((into, side), c[kids])
        i, o, u, f_l, f_r = (wx[idx] + F.linear(pair_h.flatten(1), self.U)).chunk(5, dim=1)
        new_c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(f_l) * pair_c[:, 0] + torch.sigmoid(f_r) * pair_c[:, 1]
        new_h = torch.sigmoid(o) * torch.tanh(new_c)
        return h.index_copy(0, idx, new_h), c.index_copy(0, idx, new_c)

    def forward(self, tokens: torch.Tensor, parent: torch.Tensor, level: torch.Tensor, side: torch.Tensor,
                roots: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits per tree, or with ``labels`` the mean cross-entropy. ``side``: which child of
        its parent each node is (the binary cell's left 0 and right 1)."""
        logits = self.head(self.drop(self.node_states(tokens, parent, level, side)[roots]))
        return logits if labels is None else F.cross_entropy(logits.float(), labels)
