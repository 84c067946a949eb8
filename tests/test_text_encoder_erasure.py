"""Text-encoder erasure (--train text-encoder / both): which tensors train, what is refused, and
that the erased encoders travel: the erased file, generate --erased, the saved pipeline folder
with plain diffusers, resume, and a wrong base refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase import EraseConfig

from .conftest import erase_args

TE = ("--train", "text-encoder", "--retain-concept", "a bird")


def _selected(pipe, **fields):
    from loreun.erase.text_encoder import text_encoder_parameters
    from loreun.pipelines.family import family_of

    cfg = EraseConfig(model="m", out="o", concepts=["a cat"], train="text-encoder", **fields)
    return text_encoder_parameters(cfg, pipe, family_of(pipe))


def test_the_parts_and_layers_select_what_they_name():
    from loreun.pipelines.tiny import make_tiny_flux_pipeline, make_tiny_pipeline

    pipe = make_tiny_pipeline()
    every = _selected(pipe)
    assert every and all(n.startswith("text_encoder.") for n in every)
    assert not [n for n in every if "embeddings." in n]  # the vocabulary keeps its meaning
    assert "text_encoder.final_layer_norm.weight" in every
    attn = _selected(pipe, text_encoder_part="attn")
    assert attn and all(".self_attn." in n for n in attn)
    mlp = _selected(pipe, text_encoder_part="mlp")
    assert mlp and all(".mlp." in n for n in mlp) and not set(mlp) & set(attn)
    later = _selected(pipe, text_encoder_layers="1:")
    assert later and all(".layers.1." in n for n in later)  # no final norm without every layer
    with pytest.raises(ValueError, match="^--text-encoder-layers: 5:9 selects no layer"):
        _selected(pipe, text_encoder_layers="5:9")
    flux = _selected(make_tiny_flux_pipeline())
    assert flux and all(n.startswith("text_encoder.") for n in flux)  # CLIP; T5 stays


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"text_encoder_part": "mlp"}, "--text-encoder-part: only used with --train text-encoder"),
        ({"text_encoder_layers": "0:1"}, "--text-encoder-layers: only used with --train"),
        ({"train": "both", "lora_rank": 4}, "--lora-rank: not available with --train both"),
        ({"train": "both", "saliency": 0.5}, "--saliency: not available with --train both"),
        ({"train": "text-encoder", "text_encoder_layers": "a:b"}, "--text-encoder-layers: 'a:b'"),
        ({"train": "encoder"}, "--train: unknown value 'encoder'"),
    ],
)
def test_what_text_encoder_training_cannot_do_is_refused_before_loading(fields, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        EraseConfig(model="m", out="o", concepts=["a cat"], **fields)


@pytest.fixture(scope="module")
def te_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("te") / "run"
    argv = erase_args(tiny_pipeline_dir, out, *TE, "--steps", "4", "--save-pipeline", "-q")
    assert main([*argv, "--checkpoint-every", "2"]) == 0
    return out


def test_a_text_encoder_erasure_changes_only_the_text_encoder(te_run, tiny_pipeline_dir):
    from loreun.pipelines.models import load_pipeline

    erased = load_file(str(te_run / "erased.safetensors"))
    assert erased and all(k.startswith("text_encoder.") for k in erased)
    base = load_pipeline(str(tiny_pipeline_dir)).text_encoder.state_dict()
    moved = [k for k, v in erased.items() if not torch.equal(v, base[k[len("text_encoder.") :]])]
    assert moved  # the erasure trained them
    log = [json.loads(line) for line in (te_run / "train_log.jsonl").read_text().splitlines()]
    assert all(r["retain"] > 0 for r in log)  # the retain prompts read the training encoder


def test_the_saved_pipeline_loads_in_plain_diffusers_with_the_erased_encoder(te_run):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(te_run / "pipeline"))
    erased = load_file(str(te_run / "erased.safetensors"))
    state = pipe.text_encoder.state_dict()
    assert all(torch.equal(state[k[len("text_encoder.") :]], v) for k, v in erased.items())
    card = (te_run / "pipeline" / "README.md").read_text()
    assert "fine-tuned the CLIP text encoders only; the UNet" in card
    assert "text encoders: all, layers all" in card


def test_generate_applies_the_erased_encoder_and_a_wrong_base_is_refused(
    te_run, tiny_pipeline_dir, other_pipeline_dir, tmp_path, capsys
):
    from PIL import Image

    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.models import load_pipeline

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed\na cat,3\n")
    common = ["--prompts", str(prompts), "--steps", "2", "-q"]
    for name, extra in (("base", []), ("erased", ["--erased", str(te_run)])):
        argv = ["generate", "--model", str(tiny_pipeline_dir), *common, *extra]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
    images = [Image.open(next((tmp_path / n).rglob("*.png"))).tobytes() for n in ("base", "erased")]
    assert images[0] != images[1]
    with pytest.raises(ValueError, match="erased from a different base model"):
        apply_erased_weights(load_pipeline(str(other_pipeline_dir)), te_run / "erased.safetensors")


def test_a_resumed_text_encoder_erasure_equals_the_whole_run(te_run, tiny_pipeline_dir, tmp_path):
    split = tmp_path / "split"
    common = [*TE, "--checkpoint-every", "2", "-q"]
    assert main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "2")) == 0
    argv = erase_args(tiny_pipeline_dir, split, *common, "--steps", "4", "--resume", "latest")
    assert main(argv) == 0
    a, b = (load_file(str(o / "erased.safetensors")) for o in (te_run, split))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_both_train_on_every_family(kind, tmp_path):
    """--train both: the denoiser's preset and every CLIP encoder's tensors in one file, which
    loads back into the pipeline."""
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.family import family_of
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.tiny import save_tiny_flow_pipeline, save_tiny_sdxl_pipeline

    model = tmp_path / kind
    save_tiny_sdxl_pipeline(model) if kind == "sdxl" else save_tiny_flow_pipeline(model, kind)
    out = tmp_path / "o"
    argv = erase_args(model, out, "--train", "both", "--steps", "2", "--sample-steps", "2")
    assert main([*argv, "-q"]) == 0
    keys = load_file(str(out / "erased.safetensors")).keys()
    encoders = {k.split(".")[0] for k in keys if k.startswith("text_encoder")}
    assert encoders == ({"text_encoder", "text_encoder_2"} if kind == "sdxl" else {"text_encoder"})
    assert any(not k.startswith("text_encoder") for k in keys)  # the denoiser's preset
    pipe = load_pipeline(str(model))
    apply_erased_weights(pipe, out / "erased.safetensors")
    assert family_of(pipe).denoiser_name in ("UNet", "transformer")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_text_encoder_lora_loads_in_diffusers_and_names_kohya_s_keys(
    kind, tiny_pipeline_dir, tmp_path
):
    """--lora-rank with --train text-encoder: diffusers' file applied by ``load_lora_weights``
    gives the encoders the merged erased file gives them; kohya's copy uses ``lora_te_`` (one
    encoder) or ``lora_te1_``/``lora_te2_`` over the original checkpoints' module paths."""
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.family import family_of
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.tiny import save_tiny_sdxl_pipeline

    model = tiny_pipeline_dir if kind == "sd" else save_tiny_sdxl_pipeline(tmp_path / "xl")
    out = tmp_path / "lora"
    argv = erase_args(model, out, *TE, "--lora-rank", "2", "--steps", "3", "--lr", "1e-2")
    assert main([*argv, "-q"]) == 0
    merged, adapted, base = (load_pipeline(str(model)) for _ in range(3))
    apply_erased_weights(merged, out / "erased.safetensors")
    adapted.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    family = family_of(base)
    with torch.no_grad():
        conds = [family.encode(p, ["a cat"], "cpu") for p in (merged, adapted, base)]
    emb = [c if isinstance(c, torch.Tensor) else c.emb for c in conds]
    assert torch.allclose(emb[0], emb[1], atol=1e-5) and not torch.allclose(emb[0], emb[2])
    kohya = load_file(str(out / "lora-kohya.safetensors"))
    heads = {k.split("_text_model_")[0] for k in kohya}
    assert heads == ({"lora_te"} if kind == "sd" else {"lora_te1", "lora_te2"})
    assert all("_text_model_encoder_layers_" in k for k in kohya)
