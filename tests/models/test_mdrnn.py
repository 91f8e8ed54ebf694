"""The 2D LSTM scanned by anti-diagonal wavefronts equals the cell applied pixel by pixel in
raster order (the definition), from each of the four corners; gradients too."""

from __future__ import annotations

import pytest
import torch

from models.mdrnn import GATES, MDLSTM


def raster_scan(layer: MDLSTM, k: int, x: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel from the top left, the predecessors' states (zero beyond the edges) read
    from the cells already done."""
    B, H, W, _ = x.shape
    d = layer.d
    Wk, bk, Uk, Vk = layer.direction(k)
    h = [[torch.zeros(B, d) for _ in range(W)] for _ in range(H)]
    c = [[torch.zeros(B, d) for _ in range(W)] for _ in range(H)]
    zero = torch.zeros(B, d)
    for i in range(H):
        for j in range(W):
            up_h, up_c = (h[i - 1][j], c[i - 1][j]) if i else (zero, zero)
            left_h, left_c = (h[i][j - 1], c[i][j - 1]) if j else (zero, zero)
            g = x[:, i, j] @ Wk + bk + up_h @ Uk + left_h @ Vk
            gi, go, gu, fu, fl = g.chunk(GATES, dim=-1)
            c[i][j] = torch.sigmoid(gi) * torch.tanh(gu) + torch.sigmoid(fu) * up_c + torch.sigmoid(fl) * left_c
            h[i][j] = torch.sigmoid(go) * torch.tanh(c[i][j])
    return torch.stack([torch.stack(row, 1) for row in h], 1)


def test_wavefront_scan_equals_raster_recursion_from_every_corner():
    torch.manual_seed(0)
    layer = MDLSTM(3, 8)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    for H, W in ((5, 9), (7, 3), (1, 4), (4, 4)):
        x = torch.randn(2, H, W, 3)
        got = layer(x)
        assert got.shape == (2, H, W, 32)
        want = []
        for k, flip in enumerate(MDLSTM.FLIPS):
            y = raster_scan(layer, k, x.flip(flip) if flip else x)
            want.append(y.flip(flip) if flip else y)
        want = torch.cat(want, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g = torch.autograd.grad(got.square().sum(), list(layer.parameters()))
        r = torch.autograd.grad(want.square().sum(), list(layer.parameters()))
        for a, b in zip(g, r, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _recognizer(encoder: str):
    from models.mdrnn import TextLineConfig, TextLineRecognizer

    return TextLineRecognizer(TextLineConfig(encoder=encoder, n_labels=5, height=8, patch=(2, 3), d_hidden=4,
                                             n_layers=2, init_std=0.3), seed=2)


@pytest.mark.parametrize("encoder", ["mdlstm", "bilstm"])
def test_each_line_of_a_padded_batch_reads_as_it_does_alone(encoder):
    """Frames of a line in a batch padded on the right are those of the line alone (every scan
    from the right starts at the line's own last column), and the loss is ``nn.CTCLoss``'s over
    the lines run one by one."""
    torch.manual_seed(0)
    model = _recognizer(encoder)
    widths = [17, 9, 12]
    images = torch.zeros(3, 8, 17)
    for r, w in enumerate(widths):
        images[r, :, :w] = torch.rand(8, w)
    labels = torch.tensor([[1, 2, 2, 3], [4, 1, -100, -100], [5, -100, -100, -100]])
    lengths = [4, 2, 1]
    batch = model(images, widths)
    frames = model.output_lengths(widths)
    assert frames == [6, 3, 4]
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True, reduction="none")
    per_line = []
    for r, (w, n, f) in enumerate(zip(widths, lengths, frames, strict=True)):
        alone = model(images[r: r + 1, :, :w], [w])
        torch.testing.assert_close(batch[r, :f], alone[0], rtol=1e-5, atol=1e-6)
        per_line.append(ctc(alone.transpose(0, 1), labels[r: r + 1, :n], [f], [n]) / n)
    loss = model(images, widths, labels, lengths)
    torch.testing.assert_close(loss, torch.cat(per_line).mean(), rtol=1e-5, atol=1e-6)


def test_best_path_merges_repeats_then_drops_blanks():
    from models.mdrnn import ctc_greedy

    frames = torch.tensor([[0, 1, 1, 0, 1, 2, 2, 0, 3], [2, 2, 0, 0, 0, 0, 0, 0, 0]])
    log_probs = torch.nn.functional.one_hot(frames, 4).float().log()
    assert ctc_greedy(log_probs, [9, 5]) == [[1, 1, 2, 3], [2]]
    assert ctc_greedy(log_probs, [1, 2]) == [[], [2]]
