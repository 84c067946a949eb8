import math

import pytest
import torch

from loreun.erase.weighting import (
    LoReUnWeighting,
    TimestepNormalizer,
    UniformWeighting,
    build_weighting,
    effective_sample_size,
    softmax_weights,
)


def test_infinite_temperature_is_exactly_uniform():
    scores = torch.tensor([0.3, 2.0, 0.01, 7.0])
    assert torch.equal(softmax_weights(scores, math.inf), torch.ones(4))
    w = LoReUnWeighting(4, math.inf)
    w.fill(torch.rand(4, 3), torch.tensor([10, 500, 900]))
    assert torch.equal(w.weights(torch.tensor([0, 3])), UniformWeighting().weights([0, 3]))


def test_large_temperature_approaches_uniform():
    w = softmax_weights(torch.tensor([0.1, 5.0, 2.0]), 1e9)
    assert torch.allclose(w, torch.ones(3), atol=1e-6)


def test_lower_loss_gets_more_weight_and_mean_is_one():
    w = softmax_weights(torch.tensor([0.5, 1.0, 2.0, 4.0]), 1.0)
    assert torch.all(w[:-1] > w[1:])
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_weights_carry_no_gradient():
    scores = torch.tensor([0.2, 0.4], requires_grad=True)
    assert not softmax_weights(scores, 0.5).requires_grad


def test_effective_sample_size_bounds():
    assert effective_sample_size(torch.ones(5)) == pytest.approx(5.0)
    assert effective_sample_size(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)


def test_memory_works_at_batch_size_one():
    """A softmax over one item is a no-op; the memory still tells items apart."""
    w = LoReUnWeighting(3, temperature=0.5, normalize=False, momentum=0.0)
    w.observe(torch.tensor([0]), torch.tensor([100]), torch.tensor([0.1]))
    w.observe(torch.tensor([1]), torch.tensor([100]), torch.tensor([1.0]))
    w.observe(torch.tensor([2]), torch.tensor([100]), torch.tensor([2.0]))
    single = [w.weights(torch.tensor([i])).item() for i in range(3)]
    assert single[0] > single[1] > single[2]
    assert sum(single) / 3 == pytest.approx(1.0, abs=1e-6)


def test_static_variant_ignores_observations():
    w = LoReUnWeighting(2, temperature=1.0, variant="static")
    w.fill(torch.tensor([[1.0], [2.0]]), torch.tensor([500]))
    before = w.all_weights().clone()
    w.observe(torch.tensor([0]), torch.tensor([500]), torch.tensor([100.0]))
    assert torch.equal(w.all_weights(), before)


def test_timestep_normalisation_removes_the_timestep_confound():
    """Item 0 is seen at a high-loss timestep, item 1 at a low one; both are average there."""
    w = LoReUnWeighting(2, temperature=1.0, momentum=0.0)
    grid = torch.tensor([[0.9, 0.1], [0.9, 0.1]])  # equal items: loss only depends on t
    w.fill(grid, torch.tensor([50, 950]))
    w.observe(torch.tensor([0, 1]), torch.tensor([50, 950]), torch.tensor([0.9, 0.1]))
    assert torch.allclose(w.all_weights(), torch.ones(2), atol=1e-5)
    raw = LoReUnWeighting(2, temperature=1.0, momentum=0.0, normalize=False)
    raw.observe(torch.tensor([0, 1]), torch.tensor([50, 950]), torch.tensor([0.9, 0.1]))
    assert raw.all_weights()[1] > 1.3  # without normalisation t alone decides


def test_normalizer_buckets_and_fallback():
    n = TimestepNormalizer(1000, buckets=10, momentum=0.5)
    n.update(torch.tensor([5, 15]), torch.tensor([2.0, 4.0]))
    assert n.means[0].item() == pytest.approx(3.0)
    out = n.normalize(torch.tensor([5, 995]), torch.tensor([3.0, 6.0]))
    assert torch.allclose(out, torch.tensor([1.0, 2.0]))  # unseen bucket uses the seen mean


def test_state_round_trip():
    w = LoReUnWeighting(3, temperature=0.7)
    w.fill(torch.rand(3, 4), torch.tensor([50, 350, 650, 950]))
    w.observe(torch.tensor([1]), torch.tensor([300]), torch.tensor([0.3]))
    v = LoReUnWeighting(3, temperature=0.7)
    v.load_state_dict(w.state_dict())
    assert torch.equal(v.all_weights(), w.all_weights())


def test_unknown_weighting_lists_choices():
    with pytest.raises(ValueError, match="uniform, loreun"):
        build_weighting("focal", 3)
