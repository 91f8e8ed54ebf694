"""Multidimensional recurrent networks (Graves, Fernández & Schmidhuber 2007): a 2D LSTM over
an image, scanning from each of its four corners.

The cell at (i, j) reads its input x_ij and the states of its two predecessors, above
(i−1, j) and to the left (i, j−1), with a forget gate for each:

    i, o, u = σ(W_i x + U_i h↑ + V_i h← + b_i), σ(…_o), tanh(…_u)
    f↑, f← = σ(W_f↑ x + U_f↑ h↑ + V_f↑ h← + b_f↑), σ(…_f←)
    c_ij = i ⊙ u + f↑ ⊙ c↑ + f← ⊙ c←,   h_ij = o ⊙ tanh(c_ij)

Both predecessors of a cell on the anti-diagonal i + j = k lie on diagonal k − 1, so the scan
runs **by wavefront**: every cell of one diagonal, across the batch, in one matmul, H + W − 1
steps for an H × W image. Each diagonal is computed for all H rows (the rows it does not cross
masked to zero, which also gives the zero state beyond the image's edges): about H·(H + W)
cell evaluations instead of H·W, little more for text lines (W ≫ H). The other three corners
scan the flipped image with weights of their own; ``MDLSTM`` returns the four directions'
states side by side (4 × ``d_hidden`` features per pixel).
"""

from __future__ import annotations

import torch
from torch import nn

GATES = 5  # i, o, u, f↑, f←


class MDLSTMDirection(nn.Module):
    """One corner's scan (from the top left; the caller flips the image for the others)."""

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.d = d_hidden
        self.W = nn.Linear(d_in, GATES * d_hidden)
        self.U = nn.Linear(d_hidden, GATES * d_hidden, bias=False)  # from the state above
        self.V = nn.Linear(d_hidden, GATES * d_hidden, bias=False)  # from the state to the left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, d_in) ► states (B, H, W, d_hidden)."""
        B, H, W, _ = x.shape
        wx = self.W(x)  # every pixel's input term at once
        rows = torch.arange(H, device=x.device)
        h = x.new_zeros(B, H, self.d)  # the previous diagonal's states, by row
        c = x.new_zeros(B, H, self.d)
        zero = x.new_zeros(B, 1, self.d)
        out = []
        for k in range(H + W - 1):
            cols = k - rows
            valid = ((cols >= 0) & (cols < W)).view(1, H, 1)
            up_h, up_c = torch.cat([zero, h[:, :-1]], 1), torch.cat([zero, c[:, :-1]], 1)  # row i−1
            gates = wx[:, rows, cols.clamp(0, W - 1)] + self.U(up_h) + self.V(h)  # h[:, i]: row i, col j−1
            i, o, u, f_up, f_left = gates.chunk(GATES, dim=-1)
            c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(f_up) * up_c + torch.sigmoid(f_left) * c
            c = c * valid  # rows off this diagonal: zero (the state beyond the image's edge)
            h = torch.sigmoid(o) * torch.tanh(c) * valid
            out.append(h)
        # Diagonal k holds (i, k − i) at row i: cell (i, j) is diagonal i + j, row i.
        diag = torch.stack(out, 1)  # (B, H + W − 1, H, d)
        i_idx = rows.view(H, 1).expand(H, W)
        j_idx = torch.arange(W, device=x.device).view(1, W).expand(H, W)
        return diag[:, i_idx + j_idx, i_idx]


class MDLSTM(nn.Module):
    """A 2D LSTM layer scanning from all four corners: (B, H, W, d_in) ► (B, H, W, 4 d_hidden)."""

    FLIPS = ((), (1,), (2,), (1, 2))  # from the top left, bottom left, top right, bottom right

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.directions = nn.ModuleList(MDLSTMDirection(d_in, d_hidden) for _ in self.FLIPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for flip, scan in zip(self.FLIPS, self.directions, strict=True):
            y = scan(x.flip(flip) if flip else x)
            outs.append(y.flip(flip) if flip else y)
        return torch.cat(outs, dim=-1)
