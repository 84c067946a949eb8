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
    temperature_for_ess,
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
    n = TimestepNormalizer(buckets=10, momentum=0.5)
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


def test_memory_momentum_is_the_share_the_old_value_keeps():
    w = LoReUnWeighting(2, temperature=1.0, normalize=False, momentum=0.3)
    w.fill(torch.tensor([[1.0], [2.0]]), torch.tensor([500]))
    w.observe(torch.tensor([0]), torch.tensor([500]), torch.tensor([5.0]))
    assert w.memory[0].item() == pytest.approx(0.3 * 1.0 + 0.7 * 5.0)
    assert w.memory[1].item() == pytest.approx(2.0)


def test_normalizer_momentum_is_the_share_the_old_mean_keeps():
    n = TimestepNormalizer(buckets=10, momentum=0.8)
    n.update(torch.tensor([5]), torch.tensor([1.0]))
    n.update(torch.tensor([5]), torch.tensor([6.0]))
    assert n.means[0].item() == pytest.approx(0.8 * 1.0 + 0.2 * 6.0)


def test_fill_divides_each_timestep_by_its_mean():
    """Item 0 is the easier one at both timesteps, though its raw mean is higher."""
    w = LoReUnWeighting(2, temperature=1.0)
    w.fill(torch.tensor([[8.0, 0.1], [10.0, 0.01]]), torch.tensor([50, 950]))
    # raw means: 4.05 vs 5.005 -> item 0 easier; normalised: 8/9+0.1/0.055 vs 10/9+0.01/0.055
    assert w.all_weights()[1] > w.all_weights()[0]


def test_unseen_items_get_the_mean_difficulty():
    w = LoReUnWeighting(3, temperature=1.0, normalize=False, momentum=0.0)
    w.observe(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([1.0, 3.0]))
    expected = softmax_weights(torch.tensor([1.0, 3.0, 2.0]), 1.0)  # unseen item scores 2
    assert torch.allclose(w.all_weights(), expected)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8, 0.95])
def test_temperature_for_ess_hits_the_target(target):
    scores = torch.linspace(0.0, 3.0, 40) ** 2
    tau = temperature_for_ess(scores, target)
    ess = effective_sample_size(softmax_weights(scores, tau)) / 40
    assert ess == pytest.approx(target, abs=1e-4)


def test_temperature_for_ess_edge_cases():
    assert temperature_for_ess(torch.tensor([1.0, 2.0]), 1.0) == math.inf
    assert temperature_for_ess(torch.ones(4), 0.5) == math.inf  # no spread: any tau is uniform
    with pytest.raises(ValueError, match="below"):
        temperature_for_ess(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0.1)


def test_target_ess_sets_tau_at_fill_and_survives_a_reload():
    w = LoReUnWeighting(30, target_ess=0.6, normalize=False)
    w.fill(torch.rand(30, 1, generator=torch.Generator().manual_seed(0)), torch.tensor([1]))
    assert effective_sample_size(w.all_weights()) / 30 == pytest.approx(0.6, abs=1e-3)
    v = LoReUnWeighting(30, target_ess=0.6, normalize=False)
    v.load_state_dict(w.state_dict())
    assert v.temperature == w.temperature and v.summary()["temperature"] == w.temperature


def test_batch_variant_weighs_the_current_batch_only():
    w = LoReUnWeighting(10, temperature=0.5, variant="batch", normalize=False)
    ids = torch.tensor([7, 2, 4])
    w.observe(ids, torch.tensor([1, 1, 1]), torch.tensor([2.0, 0.5, 1.0]))
    got = w.weights(ids)
    assert torch.allclose(got, softmax_weights(torch.tensor([2.0, 0.5, 1.0]), 0.5))
    assert got[1] > got[2] > got[0] and got.mean().item() == pytest.approx(1.0)
    assert torch.equal(w.all_weights(), got)  # ESS is over the batch
    with pytest.raises(RuntimeError, match="observe"):
        w.weights(torch.tensor([1, 2, 3]))


def test_drift_tracks_how_far_the_memory_moved():
    w = LoReUnWeighting(4, temperature=1.0, normalize=False, momentum=0.0)
    w.fill(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([1]))
    assert w.drift() == pytest.approx(1.0)
    w.observe(torch.arange(4), torch.ones(4), torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert w.drift() == pytest.approx(-1.0)
    assert LoReUnWeighting(4, variant="static").drift() is None


def test_fewer_than_two_items_are_refused():
    with pytest.raises(ValueError, match="at least 2 forget items"):
        build_weighting("loreun", 1)
    assert build_weighting("uniform", 1).weights(torch.tensor([0])).item() == 1.0


def test_a_target_below_reach_names_the_flag():
    w = LoReUnWeighting(4, target_ess=0.1, normalize=False)
    with pytest.raises(ValueError, match="--target-ess: target ESS 0.1 is below 0.25"):
        w.fill(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), None)


# --- behaviour a plausible bug would change (docs/reliability.md, mutation testing) ---


def test_timestep_buckets_and_their_defaults():
    from loreun.erase.weighting import TimestepNormalizer
    from loreun.pipelines.schedule import DDPMSchedule

    norm = TimestepNormalizer()  # 1000 training steps, 10 buckets
    t = torch.tensor([-5, 0, 99, 100, 900, 999, 1500])
    assert norm.bucket(t).tolist() == [0, 0, 0, 1, 9, 9, 9]
    assert DDPMSchedule(torch.ones(1000)).bucket(t, 10).tolist() == norm.bucket(t).tolist()
    by_500 = DDPMSchedule(torch.ones(500)).bucket
    assert TimestepNormalizer(by_500, buckets=4).bucket(t).tolist() == [
        0,
        0,
        0,
        0,
        3,
        3,
        3,
    ]
    norm.update(torch.tensor([950, 950]), torch.tensor([1.0, 3.0]))  # momentum 0.9
    assert norm.means[9].item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)


def test_normalize_falls_back_to_the_known_means_then_to_one():
    from loreun.erase.weighting import TimestepNormalizer

    norm = TimestepNormalizer()
    loss = torch.tensor([2.0, 4.0])
    assert torch.equal(norm.normalize(torch.tensor([10, 990]), loss), loss)  # nothing seen yet
    norm.update(torch.tensor([10]), torch.tensor([0.5]))
    # bucket 0 is known (0.5); bucket 9 is not and takes the mean of known buckets (0.5)
    assert norm.normalize(torch.tensor([10, 990]), loss).tolist() == [4.0, 8.0]


def test_batch_variant_solves_tau_per_batch_for_the_target_ess():
    from loreun.erase.weighting import effective_sample_size

    w = LoReUnWeighting(6, variant="batch", normalize=False, target_ess=0.5)
    ids = torch.tensor([4, 1, 2, 0])
    w.observe(ids, torch.tensor([1, 1, 1, 1]), torch.tensor([0.1, 0.5, 0.9, 2.0]))
    got = w.weights(ids)
    assert effective_sample_size(got) / 4 == pytest.approx(0.5, abs=1e-3)
    assert got.mean().item() == pytest.approx(1.0) and got[0] > got[1] > got[2] > got[3]
    assert torch.equal(w.all_weights(), got)
    # two items tie for easiest: ESS 0.5 is the floor; tau stays just above it
    w.observe(ids, torch.tensor([1, 1, 1, 1]), torch.tensor([0.1, 0.1, 0.9, 2.0]))
    ess = effective_sample_size(w.weights(ids)) / 4
    assert 0.5 < ess < 0.51
    two = torch.tensor([3, 5])  # the smallest batch still gets its own tau
    w.observe(two, torch.tensor([1, 1]), torch.tensor([0.2, 0.6]))
    assert effective_sample_size(w.weights(two)) / 2 == pytest.approx(0.5 + 1e-6, abs=1e-3)


def test_batch_weights_before_observing_are_an_error_and_ones_overall():
    w = LoReUnWeighting(3, variant="batch")
    assert torch.equal(w.all_weights(), torch.ones(3))
    with pytest.raises(RuntimeError, match="^batch LoReUn: observe\\(\\) the batch before"):
        w.weights(torch.tensor([0, 1]))


def test_dynamic_memory_moves_by_its_momentum_from_values_other_than_one():
    w = LoReUnWeighting(2, variant="dynamic", normalize=False, momentum=0.25)
    w.fill(torch.tensor([[4.0], [2.0]]), torch.tensor([500]))
    w.observe(torch.tensor([0]), torch.tensor([500]), torch.tensor([8.0]))
    assert w.memory.tolist() == [0.25 * 4.0 + 0.75 * 8.0, 2.0]


def test_unseen_items_take_the_mean_and_none_seen_is_uniform():
    w = LoReUnWeighting(3, variant="dynamic", normalize=False, temperature=0.5)
    assert torch.equal(w.weights(torch.tensor([0, 1, 2])), torch.ones(3))
    w.observe(torch.tensor([0]), torch.tensor([1]), torch.tensor([2.0]))
    assert torch.allclose(w.all_weights(), torch.ones(3))  # the one seen value is the mean


def test_state_dict_round_trip_restores_every_part():
    a = LoReUnWeighting(3, variant="dynamic", target_ess=0.6)
    a.fill(torch.tensor([[1.0, 3.0], [2.0, 1.0], [0.5, 4.0]]), torch.tensor([100, 800]))
    a.observe(torch.tensor([1]), torch.tensor([400]), torch.tensor([7.0]))
    b = LoReUnWeighting(3, variant="dynamic")
    b.load_state_dict(a.state_dict())
    assert b.temperature == a.temperature and b.memory.dtype == torch.float32
    assert torch.equal(b.memory, a.memory) and torch.equal(b.filled, a.filled)
    torch.testing.assert_close(
        b.normalizer.means, a.normalizer.means, equal_nan=True, rtol=0, atol=0
    )
    assert b.drift() == a.drift() and torch.equal(b.all_weights(), a.all_weights())
    c = LoReUnWeighting(3, variant="dynamic", normalize=False)  # no normalizer to restore
    c.load_state_dict(a.state_dict())
    assert c.normalizer is None and c.filled is not None
    d = LoReUnWeighting(3, variant="dynamic", temperature=2.0)
    d.load_state_dict({"memory": [1.0, 2.0, 3.0]})  # a state from before tau and fill were saved
    assert d.temperature == 2.0 and d.filled is None


def test_summary_is_strict_json():
    import json

    w = LoReUnWeighting(4, variant="static", temperature=math.inf)
    assert w.summary() == {"variant": "static", "temperature": "inf", "num_items": 4}
    assert json.loads(json.dumps(w.summary(), allow_nan=False))["temperature"] == "inf"
    assert LoReUnWeighting(2, temperature=0.5).summary()["temperature"] == 0.5


def test_rank_correlation_gives_ties_their_average_rank():
    """Spearman's rho as scipy computes it, ties included; nothing to rank is nan, not a
    perfect correlation (ties broken by position made two constant vectors correlate 1)."""
    from scipy.stats import spearmanr

    from loreun.erase.weighting import rank_correlation

    assert math.isnan(rank_correlation(torch.tensor([2.0]), torch.tensor([5.0])))
    assert math.isnan(rank_correlation(torch.ones(5), torch.arange(5.0)))
    assert rank_correlation(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(
        -1
    )
    assert rank_correlation(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 2])) == pytest.approx(
        0.5
    )
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (40,), generator=g)
    want = spearmanr(a.numpy(), b.numpy()).statistic
    assert rank_correlation(a.float(), b.float()) == pytest.approx(want)


def test_a_target_that_near_ties_put_out_of_reach_is_refused_by_name():
    from loreun.erase.weighting import temperature_for_ess

    scores = torch.tensor([0.0, 1.0, 1e-9])  # two items all but tied for easiest
    with pytest.raises(ValueError, match="^target ESS 0.5 is below 0.66[67], reached only as tau"):
        temperature_for_ess(scores, 0.5)
    with pytest.raises(ValueError, match="^target ESS 0.3 is below 0.333, reached only as tau"):
        temperature_for_ess(torch.tensor([0.0, 1.0, 2.0]), 0.3)
    with pytest.raises(ValueError, match="^unknown LoReUn variant 'x'; choose one of"):
        LoReUnWeighting(3, variant="x")
    assert LoReUnWeighting(2).normalizer.bucket(torch.tensor([999])).item() == 9
