"""Properties that hold for any input, checked on inputs hypothesis draws.

The prompt reader's property (it reads a file or raises loreun's own error) is in
tests/test_prompt_fuzz.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loreun.erase.saliency import top_fraction_mask
from loreun.erase.weighting import effective_sample_size, softmax_weights, temperature_for_ess

LOSSES = st.lists(st.floats(min_value=-50, max_value=50, allow_nan=False), min_size=1, max_size=40)
TAUS = st.one_of(st.floats(min_value=0.05, max_value=1e3), st.just(math.inf))


@given(LOSSES, TAUS)
def test_weights_have_mean_one_and_favour_lower_scores(losses, tau):
    """LoReUn's weights: mean 1 (the learning rate keeps its meaning) and a lower difficulty
    never gets a lower weight."""
    scores = torch.tensor(losses)
    w = softmax_weights(scores, tau)
    assert w.shape == scores.shape and torch.isfinite(w).all() and (w >= 0).all()
    assert abs(w.mean().item() - 1.0) < 1e-4
    order = torch.argsort(scores)
    ranked = w[order]
    assert (ranked[:-1] >= ranked[1:] - 1e-5).all()  # non-increasing with the score


@given(
    st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=3, max_size=30),
    st.floats(min_value=0.3, max_value=0.95),
)
@settings(deadline=None)
def test_the_temperature_for_a_target_ess_reaches_it(losses, target):
    """--target-ess: the chosen tau gives that ESS, or the target is refused as unreachable."""
    scores = torch.tensor(losses, dtype=torch.float64)
    try:
        tau = temperature_for_ess(scores, target)
    except ValueError as e:
        assert "below" in str(e)
        spread = float(scores.max() - scores.min())
        sharpest = effective_sample_size(softmax_weights(scores, spread * 1e-6)) / len(scores)
        assert sharpest >= target - 1e-9  # out of reach: the floor, or near-ties with the minimum
        return
    ess = effective_sample_size(softmax_weights(scores, tau)) / len(scores)
    assert ess == pytest.approx(target, abs=1e-3) or (math.isinf(tau) and ess == 1.0)


@given(
    st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=4),
    st.floats(min_value=0.001, max_value=1.0),
    st.integers(0, 2**31 - 1),
)
def test_a_saliency_mask_keeps_round_k_n_weights_and_the_largest(shapes, fraction, seed):
    """Exactly round(k N) weights (at least one, or the mask would train nothing), and no kept
    weight scores below a dropped one, ties included."""
    g = torch.Generator().manual_seed(seed)
    scores = {
        f"t{i}": torch.rand(shape, generator=g).round(decimals=1) for i, shape in enumerate(shapes)
    }
    mask = top_fraction_mask(scores, fraction)
    flat_s = torch.cat([scores[n].flatten() for n in scores])
    flat_m = torch.cat([mask[n].flatten() for n in scores])
    assert all(mask[n].shape == scores[n].shape and mask[n].dtype == torch.bool for n in scores)
    assert int(flat_m.sum()) == max(1, round(fraction * flat_s.numel()))
    if flat_m.any() and (~flat_m).any():
        assert flat_s[flat_m].min() >= flat_s[~flat_m].max()


@given(
    st.dictionaries(
        st.from_regex(r"down_blocks\.[0-9]\.attn2\.to_[kv]\.weight", fullmatch=True),
        st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1)),
        min_size=1,
        max_size=4,
    )
)
@settings(deadline=None, max_examples=25)
def test_export_then_read_is_the_identity(specs):
    """Any trained tensors written as an erased file read back to the same values, bit for bit."""
    import tempfile
    from pathlib import Path

    from loreun.erase.config import EraseConfig
    from loreun.erase.export import export_erased
    from loreun.pipelines.loading import read_erased_file

    tensors = {
        name: torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
        for name, (rows, cols, seed) in specs.items()
    }
    with tempfile.TemporaryDirectory() as d:
        cfg = EraseConfig(model="m", out=d, concepts=["a cat"])
        path = export_erased(
            Path(d), tensors, cfg, {"base_fingerprint": "sha256:base"}, steps_done=3
        )
        back, meta = read_erased_file(path)
    assert set(back) == set(tensors) and meta["steps_done"] == 3
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
