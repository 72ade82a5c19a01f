"""The eager step's CPU clipping is torch's ``clip_grad_norm_`` bit for bit, and leaves the
gradients untouched (no pass over them) when their norm is within the limit."""

from __future__ import annotations

import math

import pytest
import torch

from lstm.step import clip_cpu_gradients


def params_with_grads(scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(50, 8), (8,), (3, 4, 5)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


# Gradient norms: scale 1 gives 22.2, so 0.2 gives 4.4 (just within 5) and 0.25 gives 5.6 (just over).
CASES = [(1e-3, 5.0), (0.2, 5.0), (0.25, 5.0), (1.0, 5.0), (1e3, 5.0), (1e3, math.inf), (math.nan, 5.0)]


@pytest.mark.parametrize("scale,max_norm", CASES)
def test_cpu_clipping_is_torchs_bit_for_bit(scale, max_norm):
    ours, torchs = params_with_grads(scale), params_with_grads(scale)
    norm = clip_cpu_gradients(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(torchs, max_norm)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "scale,max_norm,scaled", [(1e-3, 5.0, False), (0.2, 5.0, False), (1e3, math.inf, False), (0.25, 5.0, True)]
)
def test_gradients_within_the_limit_are_not_written(scale, max_norm, scaled):
    params = params_with_grads(scale)
    versions = [p.grad._version for p in params]  # an in-place op on a tensor bumps its version
    clip_cpu_gradients(params, max_norm)
    assert [p.grad._version != v for p, v in zip(params, versions, strict=True)] == [scaled] * len(params)
    if scaled:
        assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))) == pytest.approx(5.0)
