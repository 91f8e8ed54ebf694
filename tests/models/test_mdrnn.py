"""The 2D LSTM scanned by anti-diagonal wavefronts equals the cell applied pixel by pixel in
raster order (the definition), from each of the four corners; gradients too."""

from __future__ import annotations

import torch

from models.mdrnn import GATES, MDLSTM, MDLSTMDirection


def raster_scan(scan: MDLSTMDirection, x: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel from the top left, the predecessors' states (zero beyond the edges) read
    from the cells already done."""
    B, H, W, _ = x.shape
    d = scan.d
    h = [[torch.zeros(B, d) for _ in range(W)] for _ in range(H)]
    c = [[torch.zeros(B, d) for _ in range(W)] for _ in range(H)]
    zero = torch.zeros(B, d)
    for i in range(H):
        for j in range(W):
            up_h, up_c = (h[i - 1][j], c[i - 1][j]) if i else (zero, zero)
            left_h, left_c = (h[i][j - 1], c[i][j - 1]) if j else (zero, zero)
            g = scan.W(x[:, i, j]) + scan.U(up_h) + scan.V(left_h)
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
        for flip, scan in zip(MDLSTM.FLIPS, layer.directions, strict=True):
            y = raster_scan(scan, x.flip(flip) if flip else x)
            want.append(y.flip(flip) if flip else y)
        want = torch.cat(want, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g = torch.autograd.grad(got.square().sum(), list(layer.parameters()))
        r = torch.autograd.grad(want.square().sum(), list(layer.parameters()))
        for a, b in zip(g, r, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
