"""2D similarities (NCC, GC, NGI, gradient difference) against brute-force NumPy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.metrics.similarity2d import (gradient_correlation, gradient_difference, ncc, ngi,
                                                       sobel)


def _sobel_loops(img):
    h, w = img.shape
    gr = np.zeros((h - 2, w - 2))
    gc = np.zeros((h - 2, w - 2))
    for r in range(1, h - 1):
        for c in range(1, w - 1):
            gc[r - 1, c - 1] = ((img[r - 1, c + 1] + 2 * img[r, c + 1] + img[r + 1, c + 1])
                                - (img[r - 1, c - 1] + 2 * img[r, c - 1] + img[r + 1, c - 1])) / 8
            gr[r - 1, c - 1] = ((img[r + 1, c - 1] + 2 * img[r + 1, c] + img[r + 1, c + 1])
                                - (img[r - 1, c - 1] + 2 * img[r - 1, c] + img[r - 1, c + 1])) / 8
    return gr, gc


def _pearson(a, b):
    a, b = a.ravel(), b.ravel()
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


def _gi_loops(a, b):
    ar, ac = _sobel_loops(a)
    br, bc = _sobel_loops(b)
    total = 0.0
    for i in range(ar.shape[0]):
        for j in range(ar.shape[1]):
            na, nb = math.hypot(ar[i, j], ac[i, j]), math.hypot(br[i, j], bc[i, j])
            if na == 0 or nb == 0:
                continue
            alpha = math.acos(max(-1.0, min(1.0, (ar[i, j] * br[i, j] + ac[i, j] * bc[i, j]) / (na * nb))))
            total += (math.cos(2 * alpha) + 1) / 2 * min(na, nb)
    return total / ar.size


def _gd_loops(a, b):
    ar, ac = _sobel_loops(a)
    br, bc = _sobel_loops(b)
    s = (ar * br + ac * bc).sum() / (br * br + bc * bc).sum()
    out = 0.0
    for ga, gb in ((ar, br), (ac, bc)):
        var = ga.var()
        out += sum(var / (var + (x - s * y) ** 2) for x, y in zip(ga.ravel(), gb.ravel())) / ga.size
    return out / 2


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:20, 0:23]
    a = np.sin(x / 3.0) + np.cos(y / 4.0) + 0.3 * rng.normal(size=x.shape)
    b = 2.0 * np.roll(a, 1, axis=1) + 0.5 * rng.normal(size=x.shape) + 7
    return a, b


def test_sobel_matches_loops(pair):
    a, _ = pair
    gr, gc = sobel(torch.from_numpy(a))
    er, ec = _sobel_loops(a)
    np.testing.assert_allclose(gr.numpy(), er, atol=1e-12)
    np.testing.assert_allclose(gc.numpy(), ec, atol=1e-12)


def test_metrics_match_bruteforce_numpy(pair):
    a, b = pair
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert ncc(ta, tb).item() == pytest.approx(_pearson(a, b), abs=1e-9)
    ar, ac = _sobel_loops(a)
    br, bc = _sobel_loops(b)
    assert gradient_correlation(ta, tb).item() == pytest.approx(0.5 * (_pearson(ar, br) + _pearson(ac, bc)), abs=1e-9)
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    assert ngi(ta, tb).item() == pytest.approx(_gi_loops(za, zb) / _gi_loops(za, za), rel=1e-5)
    assert gradient_difference(ta, tb).item() == pytest.approx(_gd_loops(a, b), rel=1e-6)  # EPS in the variance


def test_metrics_on_identical_and_unrelated_images(pair):
    a, _ = pair
    ta = torch.from_numpy(a)
    noise = torch.from_numpy(np.random.default_rng(9).normal(size=a.shape))
    for metric in (ncc, gradient_correlation, ngi, gradient_difference):
        same = metric(ta, 3 * ta + 1).item()
        assert same == pytest.approx(1.0, abs=1e-6), metric.__name__  # invariant to a positive linear map
        assert metric(ta, noise).item() < 0.7, metric.__name__  # (GD of unrelated images is ≈ 0.6)


def test_metrics_batch_mask_and_gradients(pair):
    a, b = pair
    ta = torch.from_numpy(a)
    tb = torch.from_numpy(np.stack([b, a])).requires_grad_(True)
    for metric in (ncc, gradient_correlation, ngi, gradient_difference):
        values = metric(ta, tb)
        assert values.shape == (2,)
        assert values[1].item() == pytest.approx(1.0, abs=1e-6)
        (g,) = torch.autograd.grad(values[0], tb)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    mask = np.zeros(a.shape, dtype=bool)
    mask[:, :11] = True
    masked = ncc(ta, torch.from_numpy(b), mask=torch.from_numpy(mask)).item()
    assert masked == pytest.approx(_pearson(a[:, :11], b[:, :11]), abs=1e-9)
