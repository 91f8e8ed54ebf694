"""Multidimensional recurrent networks (Graves, Fernández & Schmidhuber 2007): a 2D LSTM over
an image, scanning from each of its four corners.

The cell at (i, j) reads its input x_ij and the states of its two predecessors, above
(i−1, j) and to the left (i, j−1), with a forget gate for each:

    i, o, u = σ(W_i x + U_i h↑ + V_i h← + b_i), σ(…_o), tanh(…_u)
    f↑, f← = σ(W_f↑ x + U_f↑ h↑ + V_f↑ h← + b_f↑), σ(…_f←)
    c_ij = i ⊙ u + f↑ ⊙ c↑ + f← ⊙ c←,   h_ij = o ⊙ tanh(c_ij)

Both predecessors of a cell on the anti-diagonal i + j = k lie on diagonal k − 1, so the scan
runs **by wavefront**: every cell of one diagonal, across the batch and the four directions, in
one batched matmul, H + W − 1 steps for an H × W image. Each diagonal is computed for all H rows (the rows it does not cross
masked to zero, which also gives the zero state beyond the image's edges): about H·(H + W)
cell evaluations instead of H·W, little more for text lines (W ≫ H). The other three corners
scan the flipped image with weights of their own; ``MDLSTM`` returns the four directions'
states side by side (4 × ``d_hidden`` features per pixel).

``TextLineRecognizer`` (family ``mdrnn``) reads a grey text-line image: cut into ``patch``
blocks of pixels (Graves' input blocks), through ``n_layers`` four-corner MD-LSTM layers, summed
over the height (the collapse: one vector per block column), then a CTC output layer over the
label alphabet plus blank (``nn.CTCLoss``). Its baseline encoder, ``bilstm``, reads the same
block columns with a bidirectional ``nn.LSTM``: a 1D network that sees the height only as input
features.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.init import count_params, init_matrices_

GATES = 5  # i, o, u, f↑, f←


def _flip(x: torch.Tensor, dims: tuple[int, ...], widths: list[int] | None) -> torch.Tensor:
    """``x`` (B, H, W, F) flipped along ``dims`` (1: rows, 2: columns); with ``widths``, each
    image's columns reversed within its own width (padding stays on the right). An involution."""
    if 1 in dims:
        x = x.flip(1)
    if 2 not in dims:
        return x
    if widths is None:
        return x.flip(2)
    B, H, W, F_ = x.shape
    j = torch.arange(W, device=x.device).view(1, W)
    w = torch.as_tensor(widths, device=x.device).view(B, 1)  # host list: no read of the device
    idx = torch.where(j < w, w - 1 - j, j)
    return x.gather(2, idx.view(B, 1, W, 1).expand(B, H, W, F_))


class MDLSTM(nn.Module):
    """A 2D LSTM layer scanning from all four corners: (B, H, W, d_in) ► (B, H, W, 4 d_hidden).

    The four directions run together: each scans its flip of the image (a corner's scan is the
    top-left scan of the image flipped so that corner comes first) with weights of its own,
    stacked on a leading axis of 4, so one diagonal of all four is one batched matmul.
    """

    FLIPS = ((), (1,), (2,), (1, 2))  # from the top left, bottom left, top right, bottom right

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        d, k = d_hidden, len(self.FLIPS)
        self.d = d
        self.W = nn.Parameter(torch.empty(k, d_in, GATES * d))  # from each pixel's input
        self.b = nn.Parameter(torch.zeros(k, 1, GATES * d))
        # From the states above and to the left, [U; V] in one matrix per direction. All are
        # this module's own parameters: ZeRO-3 gathers a module's parameters each time it is
        # called, and the scan uses them once per diagonal, a count that differs between ranks.
        self.UV = nn.Parameter(torch.empty(k, 2 * d, GATES * d))
        for w in (self.W, self.UV):
            nn.init.normal_(w, std=w.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor, widths: list[int] | None = None) -> torch.Tensor:
        """``widths``: each image's own width in a batch padded on the right; the scans from the
        right start at its last real column, so padding changes no real cell's state."""
        B, H, W, d_in = x.shape
        d, k = self.d, len(self.FLIPS)
        xs = torch.stack([_flip(x, f, widths) for f in self.FLIPS])  # (4, B, H, W, d_in)
        wx = torch.baddbmm(self.b, xs.view(k, -1, d_in), self.W).view(k, B, H, W, GATES * d)
        rows = torch.arange(H, device=x.device)
        # Skewed once into diagonal order, (4, B, H + W − 1, H, gates): step s reads its own
        # slice of an unbind, whose backward is one stack. Indexing the unskewed input per step
        # would scatter each step's gradient into a zero tensor of the whole input's size.
        cols = torch.arange(H + W - 1, device=x.device).view(-1, 1) - rows.view(1, H)  # (steps, H)
        valid = ((cols >= 0) & (cols < W)).view(1, 1, -1, H, 1).to(x.dtype)
        wx_by_step = wx[:, :, rows.view(1, H), cols.clamp(0, W - 1)].unbind(2)
        valid_by_step = valid.unbind(2)
        h = x.new_zeros(k, B, H, d)  # the previous diagonal's states, by row
        c = x.new_zeros(k, B, H, d)
        zero = x.new_zeros(k, B, 1, d)
        out = []
        for wx_s, on in zip(wx_by_step, valid_by_step, strict=True):
            up_h, up_c = torch.cat([zero, h[:, :, :-1]], 2), torch.cat([zero, c[:, :, :-1]], 2)  # row i−1
            # h[:, :, i] is row i, column j−1: the left neighbour.
            rec = torch.bmm(torch.cat([up_h, h], -1).view(k, B * H, 2 * d), self.UV).view(k, B, H, GATES * d)
            i, o, u, f_up, f_left = (wx_s + rec).chunk(GATES, dim=-1)
            c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(f_up) * up_c + torch.sigmoid(f_left) * c
            c = c * on  # rows off this diagonal: zero (the state beyond the image's edge)
            h = torch.sigmoid(o) * torch.tanh(c) * on
            out.append(h)
        # Diagonal s holds (i, s − i) at row i: cell (i, j) is diagonal i + j, row i.
        diag = torch.stack(out, 2)  # (4, B, H + W − 1, H, d)
        i_idx = rows.view(H, 1).expand(H, W)
        j_idx = torch.arange(W, device=x.device).view(1, W).expand(H, W)
        ys = diag[:, :, i_idx + j_idx, i_idx]  # (4, B, H, W, d)
        return torch.cat([_flip(y, f, widths) for f, y in zip(self.FLIPS, ys, strict=True)], dim=-1)

    def direction(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Corner ``k``'s (W, b, U, V): ``gates = x W + b + h↑ U + h← V``."""
        return self.W[k], self.b[k, 0], self.UV[k, : self.d], self.UV[k, self.d:]


class TextLineConfig(BaseModel):
    """A text-line recognizer: MD-LSTM (or a 1D BiLSTM baseline) over the image, CTC output."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    family: Literal["mdrnn"] = "mdrnn"
    """Model family."""
    encoder: Literal["mdlstm", "bilstm"] = "mdlstm"
    """``mdlstm``: four-corner 2D LSTM layers, collapsed over the height; ``bilstm``: the 1D
    baseline, a bidirectional LSTM over the block columns."""
    n_labels: int | None = Field(None, ge=1)
    """Label alphabet (CTC's blank is one more output); null: the task's."""
    height: int = Field(32, ge=1)
    """Image rows (the task renders at this height)."""
    patch: tuple[int, int] = (4, 4)
    """Input block (rows, columns) of pixels: one cell of the grid the encoder scans."""
    d_hidden: int = Field(16, ge=1)
    """MD-LSTM state size per direction (four directions), or the BiLSTM's per direction."""
    n_layers: int = Field(1, ge=1)
    """Stacked MD-LSTM layers or BiLSTM layers."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before the output layer."""
    init_std: float = Field(0.1, gt=0)
    """Std of the normal init of the weight matrices."""


def ctc_greedy(log_probs: torch.Tensor, lengths: list[int]) -> list[list[int]]:
    """Best path: the most likely output per frame, repeats merged, blanks (0) dropped."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths, strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != 0])
    return out


class TextLineRecognizer(nn.Module):
    def __init__(self, cfg: TextLineConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.n_labels is None:
            raise ValueError("TextLineConfig.n_labels must be resolved first")
        if cfg.height % cfg.patch[0]:
            raise ValueError(f"model.height={cfg.height} is not a multiple of model.patch rows {cfg.patch[0]}")
        self.cfg = cfg
        ph, pw = cfg.patch
        rows, d = cfg.height // ph, cfg.d_hidden
        if cfg.encoder == "mdlstm":
            self.layers = nn.ModuleList(MDLSTM(ph * pw if i == 0 else 4 * d, d) for i in range(cfg.n_layers))
            features = 4 * d
        else:
            self.rnn = nn.LSTM(rows * ph * pw, d, cfg.n_layers, batch_first=True, bidirectional=True)
            features = 2 * d
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(features, cfg.n_labels + 1)
        init_matrices_(self, seed, cfg.init_std)

    def num_params(self) -> int:
        return count_params(self)

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per pixel column (a line's "tokens"): 6 × every weight × the cells of
        one block column that use it (``height / patch`` rows per MD-LSTM direction, one step
        per LSTM direction), over the ``patch`` columns of a block. The wavefront also runs the
        rows a diagonal does not cross (masked), about (H + W) / W times the cells, not
        counted. ``seq_len`` plays no part."""
        rows = self.cfg.height // self.cfg.patch[0]
        if self.cfg.encoder == "mdlstm":
            n = sum(layer.W.numel() + layer.UV.numel() for layer in self.layers) * rows
        else:
            n = sum(p.numel() for p in self.rnn.parameters() if p.dim() > 1)
        pw = self.cfg.patch[1]
        return float(6 * (n + self.head.weight.numel()) / pw), float(6 * self.num_params() / pw)

    def output_lengths(self, widths: list[int]) -> list[int]:
        """Frames of each line: its width in block columns."""
        return [math.ceil(w / self.cfg.patch[1]) for w in widths]

    def features(self, images: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """(B, H, W) ► (B, W / patch columns, features). Each line is read to its own width:
        the padding on the right of a batch changes none of its frames."""
        ph, pw = self.cfg.patch
        B, H, W = images.shape
        frames = self.output_lengths(widths)
        x = F.pad(images, (0, -W % pw))  # whole blocks: paper (0) on the right
        x = x.unfold(1, ph, ph).unfold(2, pw, pw).flatten(3)  # (B, H/ph, W/pw, ph·pw)
        if self.cfg.encoder == "bilstm":
            cols = x.transpose(1, 2).flatten(2)  # each column's blocks as one input
            packed = pack_padded_sequence(cols, torch.as_tensor(frames), batch_first=True, enforce_sorted=False)
            return pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=cols.shape[1])[0]
        for layer in self.layers:
            x = layer(x, frames)
        return x.sum(1)  # the collapse over the height

    def forward(self, images: torch.Tensor, widths: list[int], labels: torch.Tensor | None = None,
                label_lengths: list[int] | None = None) -> torch.Tensor:
        """Log-probabilities (B, frames, labels + blank), or with ``labels`` the CTC loss
        (mean over lines of the loss per target character, as ``nn.CTCLoss`` reduces it)."""
        log_probs = F.log_softmax(self.head(self.drop(self.features(images, widths))).float(), -1)
        if labels is None:
            return log_probs
        return F.ctc_loss(log_probs.transpose(0, 1), labels.clamp(min=0), self.output_lengths(widths),
                          label_lengths, blank=0, zero_infinity=True)
