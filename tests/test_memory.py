"""The low-memory options: each keeps the semantics of the default recipe, tested on tiny models."""

import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase.optim import Adafactor, StepInBackward, build_optimizer
from loreun.erase.presets import select_parameters
from loreun.erase.teachers import FrozenTeacher
from loreun.pipelines.family import FAMILIES, UNET_PRESETS

from .conftest import erase_args

SD = FAMILIES["StableDiffusionPipeline"]


def _linear_pair(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Linear(6, 4)
    return a, copy.deepcopy(a)


def test_adafactor_equals_transformers_on_matrices_and_vectors():
    from transformers.optimization import Adafactor as Reference

    ours_m, ref_m = _linear_pair()
    ours = Adafactor(ours_m.parameters(), lr=1e-2, weight_decay=0.3)
    ref = Reference(
        ref_m.parameters(),
        lr=1e-2,
        weight_decay=0.3,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        beta1=None,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # the decay 1 - step^-0.8 changes every step
        x = torch.randn(5, 6, generator=g)
        for m, opt in ((ours_m, ours), (ref_m, ref)):
            opt.zero_grad()
            (m(x) ** 3).sum().backward()
            opt.step()
    for p, q in zip(ours_m.parameters(), ref_m.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours_m.weight, _linear_pair()[0].weight)


def test_adafactor_factors_a_convolution_over_out_and_fan_in():
    conv = torch.nn.Conv2d(8, 16, 3)
    opt = Adafactor([conv.weight], lr=1e-3)
    conv(torch.randn(1, 8, 5, 5)).sum().backward()
    opt.step()
    state = opt.state[conv.weight]
    assert state["row"].shape == (16,) and state["col"].shape == (8 * 9,)
    kept = sum(v.numel() for v in state.values())
    assert kept < 0.1 * conv.weight.numel()


def test_adafactor_update_rms_is_clipped_to_lr():
    w = torch.nn.Parameter(torch.zeros(30, 20))
    opt = Adafactor([w], lr=1e-3)
    w.grad = torch.randn(30, 20) * 1e4  # a huge gradient still moves each weight by ~lr
    opt.step()
    rms = w.detach().norm() / w.numel() ** 0.5
    assert rms.item() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_step_in_backward_gives_the_same_updates(tiny_unet, name):
    """Two steps with hooks equal two plain optimizer steps, to the bit, with a mask."""
    other = copy.deepcopy(tiny_unet)
    runs = []
    for unet in (tiny_unet, other):
        trained = select_parameters(unet, "esd-u", UNET_PRESETS)
        unet.requires_grad_(False)
        for p in trained.values():
            p.requires_grad_(True)
        mask = {
            n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) > 0.5
            for n, p in trained.items()
        }
        runs.append((unet, trained, mask))

    def make(params):
        return build_optimizer(name, params, lr=1e-2, weight_decay=0.0)

    (u1, t1, m1), (u2, t2, m2) = runs
    hooked = StepInBackward(make, t1, m1)
    plain = make(list(t2.values()))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
        t = torch.tensor([10, 500])
        u1(x, t, encoder_hidden_states=emb).sample.square().mean().backward()
        assert all(p.grad is None for p in t1.values())  # freed inside backward
        u2(x, t, encoder_hidden_states=emb).sample.square().mean().backward()
        for n, p in t2.items():
            p.grad.mul_(m2[n])
        plain.step()
        plain.zero_grad()
    for n in t1:
        assert torch.equal(t1[n], t2[n]), n
    hooked.remove()


def test_half_precision_teacher_matches_the_original_and_leaves_the_student(tiny_unet):
    original = copy.deepcopy(tiny_unet)
    trained = select_parameters(tiny_unet, "esd-u", UNET_PRESETS)
    teacher = FrozenTeacher(SD, tiny_unet, trained, torch.bfloat16)
    assert not teacher.exact and all(b.dtype == torch.bfloat16 for b in teacher.base.values())
    with torch.no_grad():
        for p in trained.values():
            p.add_(1.0)  # training moved the student far away
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 16, 16)
    want = original(x, t, encoder_hidden_states=emb).sample
    got = teacher(x, t, emb)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bf16 rounding of the weights
    student = tiny_unet(x, t, encoder_hidden_states=emb).sample
    assert (student - want).abs().max() > 1.0  # the student's own weights are back
    for name, p in select_parameters(tiny_unet, "esd-u", UNET_PRESETS).items():
        assert p is trained[name]


def test_half_precision_teacher_restores_the_student_after_an_error(tiny_unet):
    trained = select_parameters(tiny_unet, "esd-x", UNET_PRESETS)
    teacher = FrozenTeacher(SD, tiny_unet, trained, torch.float16)
    with pytest.raises(RuntimeError):
        teacher(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 16, 99))  # bad dim
    for name, p in select_parameters(tiny_unet, "esd-x", UNET_PRESETS).items():
        assert p is trained[name] and p.dtype == torch.float32


LOW_MEMORY = [
    "--optimizer",
    "adafactor",
    "--frozen-dtype",
    "bf16",
    "--step-in-backward",
    "--gradient-checkpointing",
]


def test_low_memory_recipe_erases_resumes_and_records_its_settings(tiny_pipeline_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--method", "esd-u", "--checkpoint-every", "2", *LOW_MEMORY]
    assert main(erase_args(tiny_pipeline_dir, straight, *common, "--steps", "4")) == 0
    assert main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "2")) == 0
    assert (
        main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "4", "--resume", "latest"))
        == 0
    )
    a = load_file(str(straight / "erased.safetensors"))
    b = load_file(str(split / "erased.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((straight / "erase_config.json").read_text())
    assert saved["optimizer"] == "adafactor" and saved["frozen_dtype"] == "bf16"
    assert saved["step_in_backward"] is True
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sum(int((a[k] != base[k]).sum()) for k in a) > 0.5 * sum(v.numel() for v in a.values())


def test_half_precision_copies_with_a_mask_leave_unsalient_weights_exact(
    tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "o"
    args = erase_args(tiny_pipeline_dir, out, "--method", "esd-x", "--saliency", "0.3", *LOW_MEMORY)
    assert main(args) == 0
    mask = load_file(str(out / "saliency-mask.safetensors"))
    erased = load_file(str(out / "erased.safetensors"))
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, m in mask.items():
        assert torch.equal(erased[name][~m], base[name][~m]), name
    assert any((erased[n][m] != base[n][m]).any() for n, m in mask.items())


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--step-in-backward", "--gradient-accumulation-steps", "2"], "--step-in-backward"),
        (["--step-in-backward", "--max-grad-norm", "1"], "--max-grad-norm"),
        (
            ["--frozen-dtype", "bf16", "--saliency", "0.5", "--weight-decay", "0.1"],
            "--frozen-dtype",
        ),
        (["--optimizer", "adamw8bit"], "bitsandbytes"),  # made unimportable below
        (["--optimizer", "sgd"], "--optimizer"),
    ],
)
def test_memory_options_that_cannot_work_are_one_line_errors(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch, extra, needle
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "o").exists()


def test_adafactor_defaults_clip_threshold_and_half_precision_weights():
    w = torch.nn.Parameter(torch.ones(4, 3))
    Adafactor([w], lr=0.1).step()  # no gradient: nothing moves
    w.grad = torch.zeros(4, 3)
    Adafactor([w], lr=0.1).step()  # zero gradient, no weight decay by default: nothing moves
    assert torch.equal(w.detach(), torch.ones(4, 3))
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 100
    clipped = torch.nn.Parameter(torch.zeros(4, 3))
    clipped.grad = g.clone()
    Adafactor([clipped], lr=1.0, clip_threshold=0.5).step()
    assert clipped.detach().norm().item() / 12**0.5 == pytest.approx(0.5, rel=1e-4)
    half = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.ones(4, 3))
    half.grad, full.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    Adafactor([half], lr=0.01, weight_decay=0.5).step()
    Adafactor([full], lr=0.01, weight_decay=0.5).step()
    # computed in fp32 and rounded once, as a fp32 master step would be
    assert half.dtype == torch.bfloat16 and torch.equal(half.detach(), full.detach().bfloat16())


def test_step_in_backward_state_dict_names_each_tensor_and_refuses_a_plain_one(tiny_unet):
    trained = dict(list(select_parameters(tiny_unet, "esd-x", UNET_PRESETS).items())[:2])
    hooked = StepInBackward(lambda ps: Adafactor(ps, lr=1e-3), trained)
    (sum(p.sum() for p in trained.values()) * 2).backward()
    state = hooked.state_dict()
    assert set(state["state"]) == set(trained)
    assert all(s["step"].item() == 1 for s in state["state"].values())
    with pytest.raises(ValueError, match="^--resume: the checkpoint was saved without --step-in"):
        hooked.load_state_dict({"state": {}, "param_groups": []})
    hooked.remove()


def test_optimizer_state_lives_on_the_parameters_device_and_unstepped_state_is_empty():
    w = torch.nn.Parameter(torch.zeros(3, 2, device="meta"))
    w.grad = torch.ones(3, 2, device="meta")
    opt = Adafactor([w], lr=0.1)
    opt.step()
    assert opt.state[w]["row"].device.type == "meta" and opt.state[w]["col"].device.type == "meta"
    p = torch.nn.Parameter(torch.zeros(2))
    hooked = StepInBackward(lambda ps: Adafactor(ps, lr=0.1), {"p": p})
    assert hooked.state_dict()["state"] == {"p": {}}  # checked for finiteness: an empty dict
    hooked.remove()


def test_exact_teacher_is_the_original_and_allocates_no_tensor(tiny_unet):
    """The teacher's module tree reuses the student's untrained tensors and the frozen copies."""
    original = copy.deepcopy(tiny_unet)
    tiny_unet.requires_grad_(False)
    trained = select_parameters(tiny_unet, "esd-x", UNET_PRESETS)
    for p in trained.values():
        p.requires_grad_(True)
    teacher = FrozenTeacher(SD, tiny_unet, trained)
    owned = {p.data_ptr() for p in tiny_unet.parameters() if not p.requires_grad}
    owned |= {b.data_ptr() for b in teacher.base.values()}
    assert all(p.data_ptr() in owned for p in teacher.module.parameters())
    with torch.no_grad():
        for p in trained.values():
            p.add_(1.0)  # training moved the student far away
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 16, 16)
    want = original(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(teacher(x, t, emb), want)
    student = tiny_unet(x, t, encoder_hidden_states=emb).sample
    assert (student - want).abs().max() > 1.0 and student.requires_grad
    for name, p in select_parameters(tiny_unet, "esd-x", UNET_PRESETS).items():
        assert p is trained[name] and p.requires_grad


def test_adamw_is_fused_where_it_can_be_and_matches_the_loop():
    a, b = _linear_pair()
    fused = build_optimizer("adamw", list(a.parameters()), lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(5, 6, generator=g)
        for m, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            (m(x) ** 2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a.weight, _linear_pair()[0].weight)
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not build_optimizer("adamw", meta, lr=1e-2, weight_decay=0.0).param_groups[0]["fused"]


def test_mixed_precision_holds_untrained_weights_in_it_and_trained_in_fp32(tiny_unet):
    from loreun.erase.teachers import cast_untrained

    original = copy.deepcopy(tiny_unet)
    tiny_unet.requires_grad_(False)
    trained = select_parameters(tiny_unet, "esd-x", UNET_PRESETS)
    for p in trained.values():
        p.requires_grad_(True)
    cast_untrained(tiny_unet, trained, torch.bfloat16)
    for name, p in tiny_unet.named_parameters():
        assert p.dtype == (torch.float32 if name in trained else torch.bfloat16), name
    assert all(
        p is trained[n] for n, p in select_parameters(tiny_unet, "esd-x", UNET_PRESETS).items()
    )
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny_unet(x, t, encoder_hidden_states=emb).sample
        want = original(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    got.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "2"]])
def test_mixed_precision_saves_a_full_precision_pipeline(tiny_pipeline_dir, tmp_path, extra):
    """The rounded untrained weights never reach the saved folder: it is the base model's own
    tensors with the erased ones copied in."""
    import subprocess

    out = tmp_path / "o"
    args = ["--mixed-precision", "bf16", "--save-pipeline", "-q", *extra]
    # its own process: accelerate fixes the mixed precision once per process
    cmd = [sys.executable, "-m", "loreun.cli", *erase_args(tiny_pipeline_dir, out, *args)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    erased = load_file(str(out / "erased.safetensors"))
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(base)
    for name, tensor in saved.items():
        assert tensor.dtype == base[name].dtype, name
        assert torch.equal(tensor, erased.get(name, base[name])), name
    assert any(not torch.equal(erased[n], base[n]) for n in erased)


def test_gradient_accumulation_updates_once_per_step(tiny_pipeline_dir, tmp_path):
    """Two micro-batches a step: the optimizer runs once per logged step, not per micro-batch,
    and its update differs from one micro-batch's (the second batch's gradient is in it)."""
    outs = {k: tmp_path / f"acc{k}" for k in (1, 2)}
    for k, out in outs.items():
        extra = ["--gradient-accumulation-steps", k, "--checkpoint-every", 3, "--steps", 3]
        assert main(erase_args(tiny_pipeline_dir, out, *extra)) == 0
    state = torch.load(outs[2] / "checkpoints" / "checkpoint-3" / "optimizer.pt")
    assert {int(s["step"]) for s in state["state"].values()} == {3}
    log = (outs[2] / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3
    a = load_file(str(outs[1] / "erased.safetensors"))
    b = load_file(str(outs[2] / "erased.safetensors"))
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_adamw_falls_back_to_the_loop_where_torch_cannot_fuse(monkeypatch):
    """torch < 2.4 fuses on CUDA only and refuses fused=True for CPU tensors."""
    real = torch.optim.AdamW

    def old_torch(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", old_torch)
    a, _ = _linear_pair()
    opt = build_optimizer("adamw", list(a.parameters()), lr=1e-2, weight_decay=0.0)
    assert isinstance(opt, real) and not opt.param_groups[0]["fused"]
