import pytest
import torch

from loreun.erase.config import EraseConfig
from loreun.erase.objective_esd import esd_loss, esd_target
from loreun.erase.objectives import ItemBatch, objective_for, per_sample_mse, teacher_predictions


def build_objective(name: str, eta: float = 1.0, ga_bound: float = 1.0):
    """The objective an erase run with these flags builds (``objective_for`` of its config)."""
    extra = {"anchor": "a dog"} if name == "remap" else {}
    cfg = EraseConfig.__new__(EraseConfig)  # unchecked: an unknown name reaches objective_for
    cfg.__dict__.update(objective=name, negative_guidance=eta, ga_bound=ga_bound, **extra)
    return objective_for(cfg)


def test_objective_for_reads_the_settings_of_a_checked_config():
    cfg = EraseConfig(model="m", out="o", concepts=["a"], objective="ga", ga_bound=0.25)
    student = lambda x, t, emb: torch.zeros_like(x)  # noqa: E731
    losses = objective_for(cfg)(student, None, _noised_batch())[0]
    assert torch.equal(losses, torch.tensor([-0.25, -0.25]))


def test_esd_target_by_hand():
    anchor = torch.tensor([[1.0, 2.0]])
    concept = torch.tensor([[3.0, 1.0]])
    uncond = torch.tensor([[1.0, 2.0]])
    # 1 - 2*(3-1) = -3 ; 2 - 2*(1-2) = 4
    assert torch.equal(esd_target(anchor, concept, uncond, 2.0), torch.tensor([[-3.0, 4.0]]))


def test_per_sample_mse_keeps_batch():
    pred = torch.zeros(3, 2, 2, 2)
    target = torch.stack([torch.full((2, 2, 2), v) for v in (0.0, 1.0, 2.0)])
    assert torch.equal(per_sample_mse(pred, target), torch.tensor([0.0, 1.0, 4.0]))


def _toy_eps():
    """eps(x, t, emb) = x * emb.mean over tokens; lets each conditioning differ."""
    return lambda x, t, emb: x * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _batch(anchor=None):
    b = 2
    return ItemBatch(
        xt=torch.arange(b * 4, dtype=torch.float32).view(b, 1, 2, 2),
        t=torch.tensor([5, 7]),
        cond=torch.full((b, 3, 4), 2.0),
        uncond=torch.full((b, 3, 4), 0.5),
        anchor=anchor,
        target=None,
        ids=torch.tensor([0, 1]),
    )


def test_teacher_calls_batched_once_and_match_separate_calls():
    calls = []
    eps = _toy_eps()

    def counting(x, t, emb):
        calls.append(len(x))
        return eps(x, t, emb)

    batch = _batch(anchor=torch.full((2, 3, 4), 1.5))
    e_c, e_u, e_a = teacher_predictions(counting, batch)
    assert calls == [6]
    assert torch.equal(e_c, batch.xt * 2.0)
    assert torch.equal(e_u, batch.xt * 0.5)
    assert torch.equal(e_a, batch.xt * 1.5)


def test_esd_loss_by_hand_per_sample():
    batch = _batch()
    student = lambda x, t, emb: torch.zeros_like(x)  # noqa: E731
    losses, pred = esd_loss(student, _toy_eps(), batch, eta=1.0)
    target = batch.xt * 0.5 - 1.0 * (batch.xt * 2.0 - batch.xt * 0.5)  # = -xt
    assert losses.shape == (2,)
    assert torch.allclose(losses, target.pow(2).flatten(1).mean(1))
    assert torch.equal(pred, torch.zeros_like(batch.xt))


def test_esd_erase_from_replaces_first_term():
    batch = _batch(anchor=torch.full((2, 3, 4), 3.0))
    student = lambda x, t, emb: torch.zeros_like(x)  # noqa: E731
    losses, _ = esd_loss(student, _toy_eps(), batch, eta=1.0)
    target = batch.xt * 3.0 - (batch.xt * 2.0 - batch.xt * 0.5)  # = 1.5 xt
    assert torch.allclose(losses, target.pow(2).flatten(1).mean(1))


def _noised_batch(anchor=None):
    batch = _batch(anchor)
    batch.target = torch.ones_like(batch.xt)
    return batch


def test_remap_loss_by_hand_per_sample():
    from loreun.erase.objective_remap import remap_loss

    batch = _noised_batch(anchor=torch.full((2, 3, 4), 3.0))
    student = lambda x, t, emb: torch.zeros_like(x)  # noqa: E731
    losses, pred = remap_loss(student, _toy_eps(), batch)
    # teacher under the anchor: 3 * xt; student: 0  ->  mean((3 xt)^2) per sample
    xt = batch.xt.flatten(1)
    assert torch.allclose(losses, (9 * xt.pow(2)).mean(1))
    assert losses.shape == (2,) and torch.equal(pred, torch.zeros_like(batch.xt))


def test_remap_target_carries_no_gradient():
    from loreun.erase.objective_remap import remap_loss

    w = torch.tensor(2.0, requires_grad=True)
    eps = lambda x, t, emb: x * w * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # noqa: E731
    losses, _ = remap_loss(eps, eps, _noised_batch(anchor=torch.full((2, 3, 4), 3.0)))
    losses.sum().backward()
    # d/dw mean((2w xt - 3*2 xt)^2) = mean(2 (2w - 6) xt * 2 xt) with the target held fixed
    xt = _batch().xt.flatten(1)
    expected = (4 * (2 * 2.0 - 6.0) * xt.pow(2)).mean(1).sum()
    assert torch.allclose(w.grad, expected)


def test_ga_loss_is_bounded_and_stops_pushing_past_the_bound():
    from loreun.erase.objective_ga import ga_loss

    batch = _noised_batch()  # noise = 1
    # predictions 1 + 0.5 (error 0.25) and 1 + 3 (error 9, past the bound of 1)
    scale = torch.tensor([0.5, 3.0], requires_grad=True)
    student = lambda x, t, emb: torch.ones_like(x) + scale.view(-1, 1, 1, 1)  # noqa: E731
    losses, _ = ga_loss(student, None, batch, bound=1.0)
    assert torch.allclose(losses, torch.tensor([-0.25, -1.0]))
    losses.sum().backward()
    assert scale.grad[0] == pytest.approx(-1.0)  # d(-s^2)/ds at 0.5
    assert scale.grad[1] == 0.0  # past the bound: no more ascent


def test_denoising_loss_needs_known_noise():
    from loreun.erase.objectives import denoising_loss

    with pytest.raises(ValueError, match="forward-noised"):
        denoising_loss(lambda x, t, e: x, _batch())


def test_teacher_keeps_each_item_with_its_own_timestep():
    """A teacher that depends on t catches a batched layout that pairs x_t with another t."""
    batch = _batch(anchor=torch.full((2, 3, 4), 1.5))
    eps = lambda x, t, emb: x * t.view(-1, 1, 1, 1) * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # noqa: E731
    e_c, e_u, e_a = teacher_predictions(eps, batch)
    t = batch.t.view(-1, 1, 1, 1).float()
    assert torch.equal(e_c, batch.xt * t * 2.0)
    assert torch.equal(e_u, batch.xt * t * 0.5)
    assert torch.equal(e_a, batch.xt * t * 1.5)


def test_build_objective_binds_eta_to_esd_and_the_bound_to_ga():
    from loreun.erase.objective_ga import ga_loss

    student = lambda x, t, emb: torch.zeros_like(x)  # noqa: E731
    batch = _noised_batch()  # noise = 1, so the student's error is 1 per element
    esd = build_objective("esd", eta=3.0, ga_bound=0.25)
    torch.testing.assert_close(
        esd(student, _toy_eps(), batch)[0], esd_loss(student, _toy_eps(), batch, eta=3.0)[0]
    )
    assert not torch.allclose(
        esd(student, _toy_eps(), batch)[0], esd_loss(student, _toy_eps(), batch, eta=0.25)[0]
    )
    ga = build_objective("ga", eta=3.0, ga_bound=0.25)
    assert torch.equal(ga(student, None, batch)[0], torch.tensor([-0.25, -0.25]))
    assert torch.equal(ga(student, None, batch)[0], ga_loss(student, None, batch, bound=0.25)[0])
    with pytest.raises(ValueError, match="choose one of"):
        build_objective("esd-x")


def test_objectives_that_lack_their_input_say_which():
    from loreun.erase.objective_remap import remap_loss
    from loreun.erase.objectives import denoising_loss

    student = lambda x, t, emb: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="^the remap objective needs an anchor prompt$"):
        remap_loss(student, _toy_eps(), _noised_batch())
    with pytest.raises(ValueError, match="^the denoising loss needs forward-noised items"):
        denoising_loss(student, _batch())


def _t_and_prompt_eps():
    """A predictor that depends on x, t and the prompt, so a dropped argument shows."""
    return lambda x, t, emb: x * t.view(-1, 1, 1, 1) * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_every_objective_passes_the_student_its_timestep_and_prompt():
    from loreun.erase.objective_ga import ga_loss
    from loreun.erase.objective_remap import remap_loss
    from loreun.erase.objectives import denoising_loss

    batch = _noised_batch(anchor=torch.full((2, 3, 4), 3.0))
    eps, t = _t_and_prompt_eps(), batch.t.view(-1, 1, 1, 1).float()
    student_pred = batch.xt * t * 2.0  # under the concept prompt
    _, pred = esd_loss(eps, eps, batch, eta=1.0)
    assert torch.equal(pred, student_pred)
    assert torch.equal(denoising_loss(eps, batch)[1], student_pred)
    losses, pred = remap_loss(eps, eps, batch)
    assert torch.equal(pred, student_pred)
    target = batch.xt * t * 3.0  # the teacher under the anchor, at the item's own t
    assert torch.allclose(losses, (student_pred - target).pow(2).flatten(1).mean(1))
    # defaults: eta 1 and bound 1; remap takes no setting
    assert torch.equal(
        build_objective("esd")(eps, eps, batch)[0], esd_loss(eps, eps, batch, 1.0)[0]
    )
    assert torch.equal(
        build_objective("ga")(eps, None, batch)[0], ga_loss(eps, None, batch, 1.0)[0]
    )
    assert torch.equal(build_objective("remap")(eps, eps, batch)[0], losses)
    with pytest.raises(ValueError, match="; choose one of esd, remap, ga, uce$"):
        build_objective("nope")
