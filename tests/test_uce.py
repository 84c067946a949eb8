"""UCE's closed form (--objective uce): the solve, the token it reads, every family through the
real command, the file loading like any erased file, and what it refuses."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase import EraseConfig
from loreun.erase.uce import uce_weight

from .conftest import erase_args


def _objective(w, w0, erase, guide, keep, s_e, s_p, lamb):
    return (
        s_e * ((erase @ w.T - guide @ w0.T) ** 2).sum()
        + s_p * ((keep @ w.T - keep @ w0.T) ** 2).sum()
        + lamb * ((w - w0) ** 2).sum()
    )


def test_the_closed_form_is_the_minimum_of_uce_s_objective():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    erase, guide = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.randn(2, 5, generator=g, dtype=torch.float64)
    w = uce_weight(w0, erase, guide, keep, 1.0, 0.7, 0.5).requires_grad_(True)
    _objective(w, w0, erase, guide, keep, 1.0, 0.7, 0.5).backward()
    assert w.grad.abs().max() < 1e-9  # the gradient vanishes at the solution
    near = uce_weight(w0, erase, guide, keep, 1.0, 1.0, 1e6)
    assert torch.allclose(near, w0, atol=1e-4)  # a large lambda keeps the weights
    exact = uce_weight(w0, erase, guide, torch.zeros(0, 5, dtype=torch.float64), 1.0, 1.0, 1e-9)
    assert torch.allclose(erase @ exact.T, guide @ w0.T, atol=1e-6)  # maps c_i to W g_i


def test_the_vector_read_is_the_last_word_token():
    from loreun.erase.uce import token_positions
    from loreun.pipelines.family import family_of
    from loreun.pipelines.tiny import make_tiny_pipeline, make_tiny_sd3_pipeline

    sd = make_tiny_pipeline()
    ids = sd.tokenizer("a handwritten 3").input_ids  # start, a, handwritten, 3, end
    assert token_positions(sd, family_of(sd), "a handwritten 3") == [len(ids) - 2]
    assert token_positions(sd, family_of(sd), "") == [0]  # the start token
    sd3 = make_tiny_sd3_pipeline(t5=True)
    t5 = sd3.tokenizer_3("a handwritten 3").input_ids  # a, handwritten, 3, </s>
    clip = sd3.tokenizer.model_max_length
    want = [len(ids) - 2, clip + len(t5) - 2]
    assert token_positions(sd3, family_of(sd3), "a handwritten 3") == want


KINDS = ("sd", "sdxl", "sd3", "sd3-t5", "flux")


@pytest.mark.parametrize("kind", KINDS)
def test_uce_runs_on_every_family_and_moves_the_concept_to_its_guide(
    kind, tiny_pipeline_dir, tmp_path
):
    from loreun.erase.uce import prompt_vectors
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.family import family_of
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.tiny import save_tiny_flow_pipeline, save_tiny_sdxl_pipeline

    model = {
        "sd": lambda: tiny_pipeline_dir,
        "sdxl": lambda: save_tiny_sdxl_pipeline(tmp_path / kind),
    }.get(kind, lambda: save_tiny_flow_pipeline(tmp_path / kind, kind))()
    out = tmp_path / "uce"
    argv = erase_args(model, out, "--objective", "uce", "--retain-concept", "a bird", "-q")
    assert main(argv) == 0
    erased = load_file(str(out / "erased.safetensors"))
    unet = kind in ("sd", "sdxl")
    mmdit = ("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight")
    want = ("attn2.to_k.weight", "attn2.to_v.weight") if unet else mmdit
    assert erased and all(k.endswith(want) for k in erased)
    assert unet or sorted(erased) == sorted(mmdit)  # the tokens' map and the pooled one
    base, edited = load_pipeline(str(model)), load_pipeline(str(model))
    apply_erased_weights(edited, out / "erased.safetensors")
    family = family_of(base)
    with torch.no_grad():
        c = prompt_vectors(base, family, ["a cat"], "cpu")
        g = prompt_vectors(base, family, [""], "cpu")
    for key in erased:
        name = key[: -len(".weight")]
        kind_of = family.uce_module(name)
        ci, gi = c[kind_of].float(), g[kind_of].float()
        w0 = family.denoiser(base).get_submodule(name).weight.detach()
        w1 = family.denoiser(edited).get_submodule(name).weight.detach()
        assert (ci @ w1.T - gi @ w0.T).norm() < 0.5 * (ci @ w0.T - gi @ w0.T).norm()


def test_a_uce_erasure_loads_in_plain_diffusers_and_generate(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "uce"
    assert main(erase_args(tiny_pipeline_dir, out, "--objective", "uce", "--save-pipeline")) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    state = pipe.unet.state_dict()
    assert all(
        torch.equal(state[k], v) for k, v in load_file(str(out / "erased.safetensors")).items()
    )
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed\na cat,1\n")
    argv = ["generate", "--model", str(tiny_pipeline_dir), "--erased", str(out)]
    assert (
        main([*argv, "--prompts", str(prompts), "--steps", "2", "--out", str(tmp_path / "g")]) == 0
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"objective": "uce", "init_from": "x"}, "--init-from: not used by --objective uce"),
        ({"objective": "uce", "adversarial": True}, "--adversarial: not used by --objective uce"),
        ({"objective": "uce", "uce_lambda": 0.0}, "--uce-lambda: must be > 0, got 0.0"),
        ({"objective": "uce", "uce_guide": "a cat"}, "--uce-guide: must differ"),
        ({"uce_guide": "a dog"}, "--uce-guide: only used by --objective uce"),
    ],
)
def test_what_uce_has_no_use_for_is_refused(fields, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        EraseConfig(model="m", out="o", concepts=["a cat"], **fields)


@pytest.fixture(scope="module")
def uce_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uce") / "run"
    assert main(erase_args(tiny_pipeline_dir, out, "--objective", "uce", "-q")) == 0
    return out


def test_fine_tuning_starts_from_a_uce_edit(uce_run, tiny_pipeline_dir, tmp_path):
    """--init-from: the trained tensors start at the edit (a vanishing lr leaves them there),
    while the teacher stays the base: the run's first ESD loss is the base's, not zero."""
    out = tmp_path / "hybrid"
    argv = erase_args(tiny_pipeline_dir, out, "--init-from", str(uce_run), "--lr", "1e-12")
    assert main([*argv, "-q"]) == 0
    edit = load_file(str(uce_run / "erased.safetensors"))
    after = load_file(str(out / "erased.safetensors"))
    assert set(edit) <= set(after)
    assert all(torch.allclose(after[k], edit[k], atol=1e-8) for k in edit)
    plain = tmp_path / "plain"
    assert main([*erase_args(tiny_pipeline_dir, plain, "--lr", "1e-12"), "-q"]) == 0
    moved = [k for k in edit if not torch.allclose(after[k], load_file(
        str(plain / "erased.safetensors"))[k], atol=1e-8)]  # fmt: skip
    assert moved


def test_init_from_refuses_what_would_change_the_teacher(
    uce_run, tiny_pipeline_dir, other_pipeline_dir, tmp_path, capsys
):
    cases = [
        (tiny_pipeline_dir, ["--method", "esd-u"], "changes 8 tensors this run does not train"),
        (other_pipeline_dir, [], "was erased from a different base model"),
    ]
    for model, extra, message in cases:
        argv = erase_args(model, tmp_path / "o", "--init-from", str(uce_run), *extra)
        assert main([*argv, "-q", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="^--init-from: starts full tensors"):
        EraseConfig(model="m", out="o", concepts=["a cat"], init_from="x", lora_rank=2)
    with pytest.raises(ValueError, match="^--init-from: not used by --objective uce"):
        EraseConfig(model="m", out="o", concepts=["a cat"], init_from="x", objective="uce")


def test_evaluate_prints_and_draws_the_interference_matrix(
    uce_run, tiny_pipeline_dir, tmp_path, capsys
):
    """Each class's rate before and after, erased classes first, in the terminal and in the
    report, which headless Chromium renders with a heat-coloured cell per class and source."""
    import shutil
    import subprocess
    import tempfile

    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_pipeline_dir), "--erased", str(uce_run)]
    argv += ["--prompts", "digits", "--detector", "digits", "--erased-class", "3"]
    argv += ["--erased-class", "7", "--steps", "2", "--out", str(out), "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split("interference (* erased)")[1].splitlines()[1:11]
    assert [line.split()[:2] for line in printed[:2]] == [["*", "3"], ["*", "7"]]
    assert all(not line.startswith("*") for line in printed[2:])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is installed by .ci/run"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tempfile.mkdtemp()}", "--virtual-time-budget=3000"]  # fmt: skip
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    table = dom.split('id="interference"')[1].split("</table>")[0]
    assert table.count("<tr>") == 11 and table.count("background:rgb(") == 20
    assert table.index("3 (erased)") < table.index("7 (erased)") < table.index("<td>0</td>")


def test_a_uce_edit_exports_as_lora_that_diffusers_loads(tiny_pipeline_dir, tmp_path):
    """--lora-rank: each edit factorised (truncated SVD) into the LoRA files a trained LoRA
    has; at a rank that covers the edit the loaded LoRA gives the edited maps, and the header
    records the rank and the factorisation's residual."""
    import json

    from safetensors import safe_open

    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.models import load_pipeline

    out = tmp_path / "uce-lora"
    argv = erase_args(tiny_pipeline_dir, out, "--objective", "uce", "--lora-rank", "16")
    assert main([*argv, "--save-pipeline", "-q"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora-kohya.safetensors").is_file() and (out / "README.md").is_file()
    with safe_open(str(out / "erased.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["loreun"])
    assert meta["uce_lora"]["rank"] == 16 and meta["uce_lora"]["largest_relative_residual"] < 1e-5
    edited, adapted = load_pipeline(str(tiny_pipeline_dir)), load_pipeline(str(tiny_pipeline_dir))
    apply_erased_weights(edited, out / "erased.safetensors")
    adapted.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    adapted.fuse_lora()
    name = next(iter(load_file(str(out / "erased.safetensors"))))
    want = edited.unet.state_dict()[name]
    got = {k.replace(".base_layer", ""): v for k, v in adapted.unet.state_dict().items()}[name]
    assert torch.allclose(got, want, atol=1e-5)
    saved = load_pipeline(str(out / "pipeline")).unet.state_dict()
    assert torch.equal(saved[name], want)  # the saved pipeline holds the exact edit


def test_uce_on_the_built_in_models_loads_where_an_erased_file_loads(tmp_path, capsys):
    """A closed-form file is an ordinary erased file: on ``digits`` the attack and the
    single-file export take it; on ``digits-flow`` (the MMDiT form) generate takes it."""
    from safetensors import safe_open

    from loreun.pipelines.digits_data import digit_captions

    three = [a for c in digit_captions(3) for a in ("--concept", c)]
    runs = {}
    for model in ("digits", "digits-flow"):
        runs[model] = tmp_path / model
        argv = ["erase", "--model", model, *three, "--objective", "uce", "-q"]
        assert main([*argv, "--out", str(runs[model])]) == 0
    attack = ["attack", "--model", "digits", "--erased", str(runs["digits"]), "--prompts"]
    attack += ["digits", "--detector", "digits", "--erased-class", "3", "--steps", "8"]
    assert main([*attack, "--attack-steps", "2", "--out", str(tmp_path / "a"), "-q"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["rows"] == 10 and summary["pre_asr"] <= 0.3  # the edit holds before attack
    one = tmp_path / "one.safetensors"
    assert main(["export", str(runs["digits"]), "--single-file", str(one), "-q"]) == 0
    edited = load_file(str(runs["digits"] / "erased.safetensors"))
    with safe_open(str(one), "pt") as f:
        assert len(list(f.keys())) > len(edited)  # the whole model, the edit merged in
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed\na handwritten 3,1\n")
    gen = ["generate", "--model", "digits-flow", "--erased", str(runs["digits-flow"])]
    assert main([*gen, "--prompts", str(prompts), "--out", str(tmp_path / "g"), "-q"]) == 0
    assert len(list((tmp_path / "g").rglob("*.png"))) == 1
