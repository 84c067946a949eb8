import torch

from loreun.erase.objectives import (
    ForgetBatch,
    esd_loss,
    esd_target,
    per_sample_mse,
    teacher_predictions,
)


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
    return ForgetBatch(
        xt=torch.arange(b * 4, dtype=torch.float32).view(b, 1, 2, 2),
        t=torch.tensor([5, 7]),
        cond=torch.full((b, 3, 4), 2.0),
        uncond=torch.full((b, 3, 4), 0.5),
        anchor=anchor,
        noise=None,
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
