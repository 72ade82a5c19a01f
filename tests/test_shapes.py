"""Shape families, the consistency error and the mixture density head."""

import numpy as np
import pytest
import torch

from lstm.data import shapes
from lstm.models.shape import ShapeLSTM


def test_rectangle_points_follow_the_chapter():
    pts = shapes.FAMILIES["rectangle"].outline(np.array([[0.3, 0.7]]))
    np.testing.assert_allclose(pts[0], [[0, 0], [0.3, 0], [0.3, 0.7], [0, 0.7]])


def test_mid_edge_points():
    pts = shapes.FAMILIES["rectangle"].outline(np.array([[0.4, 0.2]]), points_per_edge=2)
    np.testing.assert_allclose(
        pts[0], [[0, 0], [0.2, 0], [0.4, 0], [0.4, 0.1], [0.4, 0.2], [0.2, 0.2], [0, 0.2], [0, 0.1]]
    )


@pytest.mark.parametrize("name", list(shapes.FAMILIES))
@pytest.mark.parametrize("per_edge", [1, 2])
def test_consistency_error_is_small_for_true_shapes_and_grows_with_noise(name, per_edge):
    family = shapes.FAMILIES[name]
    rng = np.random.default_rng(0)
    pts = family.outline(family.sample_params(rng, 20), per_edge)
    assert np.all(pts[:, 0] == 0), "every shape starts at the origin"
    exact = shapes.consistency_error(family, pts, per_edge).mean()
    noisy = shapes.consistency_error(family, pts + rng.normal(0, 0.05, pts.shape), per_edge).mean()
    assert exact < 0.01
    assert noisy > 3 * exact + 0.02


def test_chapter_rectangle_terms():
    skewed = np.array([[[0, 0], [0.5, 0.1], [0.6, 0.5], [0.05, 0.4]]])
    np.testing.assert_allclose(shapes.rectangle_terms(skewed)[0], [0.1, 0.05, 0.1, -0.1])


def test_mdn_nll_prefers_the_data_and_sampling_varies():
    torch.manual_seed(0)
    model = ShapeLSTM(8, head="mdn", mixtures=3)
    out, _ = model(torch.zeros(4, 1, 2))
    near = model.head.nll(out, model.head.mean(out))
    far = model.head.nll(out, model.head.mean(out) + 5.0)
    assert torch.all(near < far)
    g = torch.Generator().manual_seed(1)
    drawn = model.generate(16, 4, sample=True, generator=g)
    assert drawn.shape == (16, 4, 2)
    assert torch.all(drawn[:, 0] == 0)
    assert drawn[:, 1:].std(0).min() > 0, "an MDN draws different shapes from the same seed"


def test_dense_head_is_deterministic_from_the_seed():
    model = ShapeLSTM(10)
    a, b = model.generate(3, 4), model.generate(3, 4)
    assert torch.equal(a, b)
    torch.testing.assert_close(a[0], a[1])
