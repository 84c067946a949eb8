import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loreun.cli.main import main
from loreun.pipelines import apply_erased_weights, load_erased_pipeline, load_pipeline
from loreun.pipelines.loading import fingerprint, read_erased_file

from .conftest import erase_args


@pytest.fixture(scope="module")
def erased_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("erase") / "run"
    assert main(erase_args(tiny_pipeline_dir, out, "--method", "esd-x", "--save-pipeline")) == 0
    return out


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample


def test_header_metadata(erased_run, tiny_pipeline_dir):
    tensors, meta = read_erased_file(erased_run / "erased.safetensors")
    assert meta["base_model"] == tiny_pipeline_dir.name  # shared files hold no local paths
    assert meta["method"] == "esd-x" and meta["concepts"] == ["a cat", "a dog"]
    assert meta["steps_done"] == 3 and meta["num_tensors"] == len(tensors)
    assert meta["hyperparameters"]["lr"] == 1e-3
    assert set(meta["versions"]) == {"loreun", "diffusers", "torch"}
    assert (meta["format"], meta["format_version"]) == ("loreun.erased", 2)
    assert (meta["prediction_type"], meta["world_size"], meta["erase_from"]) == ("epsilon", 1, None)
    assert meta["weighting"] == "uniform" and meta["weighting_chosen"] == {}
    assert all(".attn2." in k for k in tensors)
    base = load_pipeline(str(tiny_pipeline_dir)).unet.state_dict()
    assert meta["base_fingerprint"] == fingerprint({k: base[k] for k in tensors})
    cfg = json.loads((erased_run / "erase_config.json").read_text())
    assert cfg["method"] == "esd-x"


def test_erasure_changed_the_trained_tensors_only(erased_run, tiny_pipeline_dir):
    tensors, _ = read_erased_file(erased_run / "erased.safetensors")
    base = load_pipeline(str(tiny_pipeline_dir)).unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in tensors.items())


def test_export_then_load_reproduces_outputs(erased_run, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    saved = StableDiffusionPipeline.from_pretrained(erased_run / "pipeline")
    applied = apply_erased_weights(
        load_pipeline(str(tiny_pipeline_dir)), erased_run / "erased.safetensors"
    )
    again = load_erased_pipeline(str(tiny_pipeline_dir), erased_run / "erased.safetensors")
    base = load_pipeline(str(tiny_pipeline_dir))
    ref = _unet_out(saved.unet)
    assert torch.equal(ref, _unet_out(applied.unet))
    assert torch.equal(ref, _unet_out(again.unet))
    assert not torch.equal(ref, _unet_out(base.unet))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_base_loaded_in_any_precision_matches_its_fingerprint(
    erased_run, tiny_pipeline_dir, dtype
):
    """bf16 is how SDXL and newer models are loaded: the same base must pass in every dtype,
    and the erased values arrive in the pipeline's own dtype."""
    pipe = load_pipeline(str(tiny_pipeline_dir), torch_dtype=dtype)
    tensors, _ = read_erased_file(erased_run / "erased.safetensors")
    apply_erased_weights(pipe, erased_run / "erased.safetensors")  # no error
    state = pipe.unet.state_dict()
    assert all(torch.equal(state[k], v.to(dtype)) for k, v in tensors.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_another_base_is_refused_in_every_precision(erased_run, other_pipeline_dir, dtype):
    pipe = load_pipeline(str(other_pipeline_dir), torch_dtype=dtype)
    with pytest.raises(ValueError, match="different base model.*--ignore-fingerprint"):
        apply_erased_weights(pipe, erased_run / "erased.safetensors")


def test_generate_in_bf16_applies_an_erased_file(erased_run, tiny_pipeline_dir, tmp_path, capsys):
    """The command a GPU user runs: ``generate --dtype bf16 --erased``; another base is refused
    with the command's own flag named, and that flag applies it."""
    erased, prompts = erased_run / "erased.safetensors", _two_prompts(tmp_path)
    argv = ["generate", "--model", str(tiny_pipeline_dir), "--prompts", prompts, "--steps", "2"]
    argv += ["--dtype", "bf16", "--erased", str(erased), "--size", "32", "--samples-per-prompt"]
    assert main([*argv, "1", "--out", str(tmp_path / "g")]) == 0
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 2


def _two_prompts(folder) -> str:
    (folder / "p.txt").write_text("a cat\na dog\n")
    return str(folder / "p.txt")


def test_another_base_names_the_commands_flag(erased_run, other_pipeline_dir, tmp_path, capsys):
    erased, prompts = erased_run / "erased.safetensors", _two_prompts(tmp_path)
    argv = ["generate", "--model", str(other_pipeline_dir), "--prompts", prompts, "--steps", "1"]
    argv += ["--dtype", "bf16", "--erased", str(erased), "--size", "32", "--samples-per-prompt"]
    assert main([*argv, "1", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the loading bars
    assert line.startswith("loreun generate: error: ") and "different base model" in line
    assert "--ignore-fingerprint" in line
    assert main([*argv, "1", "--out", str(tmp_path / "g"), "--ignore-fingerprint"]) == 0


def test_a_file_without_a_bf16_fingerprint_says_so(erased_run, tiny_pipeline_dir, tmp_path):
    """Files exported before the bf16 fingerprint still load in fp32 and fp16; in bf16 the
    error says why, instead of calling the base a different model."""
    from loreun.pipelines.loading import METADATA_KEY, content_hash

    tensors, meta = read_erased_file(erased_run / "erased.safetensors")
    del meta["base_fingerprint_bf16"]
    old = tmp_path / "old.safetensors"
    meta["content_sha256"] = content_hash(tensors, meta)
    save_file(tensors, str(old), {METADATA_KEY: json.dumps(meta)})
    apply_erased_weights(load_pipeline(str(tiny_pipeline_dir), torch_dtype=torch.float16), old)
    with pytest.raises(ValueError, match="records no base_fingerprint_bf16.*older loreun"):
        apply_erased_weights(load_pipeline(str(tiny_pipeline_dir), torch_dtype=torch.bfloat16), old)


def test_other_base_is_refused_unless_forced(erased_run, other_pipeline_dir):
    pipe = load_pipeline(str(other_pipeline_dir))
    with pytest.raises(ValueError, match="different base model"):
        apply_erased_weights(pipe, erased_run / "erased.safetensors")
    apply_erased_weights(pipe, erased_run / "erased.safetensors", force=True)


def _rewrite(src, dst, change, rehash=True, recount=False):
    """A changed copy; ``rehash`` (and ``recount``) keep it self-consistent, as a file made
    elsewhere would be."""
    from loreun.pipelines.loading import content_hash

    tensors, meta = read_erased_file(src)
    tensors = change(dict(tensors))
    if recount:
        meta["num_tensors"] = len(tensors)
    if rehash:
        meta["content_sha256"] = content_hash(tensors, meta)
    save_file(tensors, str(dst), metadata={"loreun": json.dumps(meta)})
    return dst


def _swap_two(t):
    same = {}
    for k, v in sorted(t.items()):
        same.setdefault(tuple(v.shape), []).append(k)
    a, b = next(ks for ks in same.values() if len(ks) > 1)[:2]
    t[a], t[b] = t[b], t[a]
    return t


def _one_nan(t):
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize(
    "change, rehash, needle",
    [
        (_swap_two, False, "do not match the content hash"),
        (_one_nan, False, "do not match the content hash"),
        (_one_nan, True, "hold NaN or inf"),
    ],
)
def test_tampered_or_non_finite_files_are_refused(erased_run, tmp_path, change, rehash, needle):
    bad = _rewrite(erased_run / "erased.safetensors", tmp_path / "b.safetensors", change, rehash)
    with pytest.raises(ValueError, match=needle):
        read_erased_file(bad)


def _header_edit(src, dst, edit):
    """A copy whose header object is changed by ``edit`` and not rehashed, as a hand edit is."""
    tensors, meta = read_erased_file(src)
    edit(meta)
    save_file(tensors, str(dst), metadata={"loreun": json.dumps(meta)})
    return dst


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.pop("content_sha256"), "has no content hash, which every format-2 file has"),
        (lambda m: m.update(content_sha256=None), "has no content hash"),
        (lambda m: m.update(concepts=["<script>x</script>"]), "tensors or header do not match"),
        (lambda m: m.update(num_tensors="4"), "header lists '4'"),
        (lambda m: m.update(num_tensors=m["num_tensors"] + 1), "incomplete or was edited"),
        (lambda m: m.update(format_version=9), "unknown erased-file format 9"),
    ],
)
def test_the_integrity_check_cannot_be_switched_off(erased_run, tmp_path, edit, needle):
    """Deleting or nulling the hash, or editing any header field, is refused by name; the hash
    covers the header since format 2 (it detects corruption, not a recomputed forgery)."""
    bad = _header_edit(erased_run / "erased.safetensors", tmp_path / "h.safetensors", edit)
    with pytest.raises(ValueError, match=needle):
        read_erased_file(bad)


def test_format_1_files_still_load(erased_run, tmp_path):
    """Files of format 1 hashed their tensors only (and the first ones nothing)."""
    from loreun.pipelines.loading import content_hash

    tensors, meta = read_erased_file(erased_run / "erased.safetensors")
    meta["format_version"], meta["content_sha256"] = 1, content_hash(tensors)
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata={"loreun": json.dumps(meta)})
    assert read_erased_file(v1)[1]["format_version"] == 1
    del meta["content_sha256"]
    save_file(tensors, str(v1), metadata={"loreun": json.dumps(meta)})
    read_erased_file(v1)  # predates the hash: still loads


def test_metadata_that_is_not_an_object_is_refused(erased_run, tmp_path):
    tensors, _ = read_erased_file(erased_run / "erased.safetensors")
    save_file(tensors, str(tmp_path / "l.safetensors"), metadata={"loreun": "[1, 2]"})
    with pytest.raises(ValueError, match="not a JSON object"):
        read_erased_file(tmp_path / "l.safetensors")


def test_an_erase_folder_reads_as_its_erased_file(erased_run, tmp_path):
    tensors, _ = read_erased_file(erased_run)
    assert tensors.keys() == read_erased_file(erased_run / "erased.safetensors")[0].keys()
    with pytest.raises(FileNotFoundError, match="without erased.safetensors"):
        read_erased_file(tmp_path)


def test_wrong_shape_is_refused_even_when_forced(erased_run, tiny_pipeline_dir, tmp_path):
    def widen(t):
        k = sorted(t)[0]
        t[k] = torch.zeros(*t[k].shape[:-1], t[k].shape[-1] + 1)
        return t

    bad = _rewrite(erased_run / "erased.safetensors", tmp_path / "bad.safetensors", widen)
    with pytest.raises(ValueError, match="wrong shape"):
        apply_erased_weights(load_pipeline(str(tiny_pipeline_dir)), bad, force=True)


def test_extra_key_is_refused(erased_run, tiny_pipeline_dir, tmp_path):
    def extra(t):
        t["down_blocks.9.attn2.to_q.weight"] = torch.zeros(2, 2)
        return t

    src = erased_run / "erased.safetensors"
    bad = _rewrite(src, tmp_path / "bad.safetensors", extra, recount=True)
    with pytest.raises(ValueError, match="not in this UNet.*down_blocks.9"):
        apply_erased_weights(load_pipeline(str(tiny_pipeline_dir)), bad, force=True)


def test_missing_tensor_is_refused(erased_run, tiny_pipeline_dir, tmp_path):
    def drop(t):
        t.pop(sorted(t)[0])
        return t

    bad = _rewrite(erased_run / "erased.safetensors", tmp_path / "bad.safetensors", drop)
    with pytest.raises(ValueError, match="incomplete"):
        apply_erased_weights(load_pipeline(str(tiny_pipeline_dir)), bad)


def test_truncated_file_is_refused(erased_run, tiny_pipeline_dir, tmp_path):
    data = (erased_run / "erased.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        apply_erased_weights(load_pipeline(str(tiny_pipeline_dir)), bad)


def test_plain_safetensors_without_metadata_is_refused(tmp_path, tiny_pipeline_dir):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="no loreun metadata"):
        apply_erased_weights(load_pipeline(str(tiny_pipeline_dir)), path)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickles_are_refused_without_opening(tmp_path, tiny_unet, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(ValueError, match="refusing to unpickle.*safetensors"):
        apply_erased_weights(tiny_unet, path)


def test_apply_to_bare_unet(erased_run):
    from loreun.pipelines.tiny import make_tiny_pipeline

    unet = make_tiny_pipeline(seed=0).unet
    out = apply_erased_weights(unet, erased_run / "erased.safetensors")
    assert out is unet
    tensors = load_file(str(erased_run / "erased.safetensors"))
    k = sorted(tensors)[0]
    assert torch.equal(unet.state_dict()[k], tensors[k])


def test_saved_pipeline_holds_safetensors_only(erased_run):
    """Pickled .bin weights would run code on load; the folder must be safetensors throughout."""
    files = [p for p in (erased_run / "pipeline").rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert not weights, weights
    assert (erased_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (erased_run / "pipeline" / "text_encoder" / "model.safetensors").is_file()


def test_load_erased_pipeline_checks_the_base_and_passes_loading_options(
    erased_run, tiny_pipeline_dir, other_pipeline_dir
):
    erased = erased_run / "erased.safetensors"
    with pytest.raises(ValueError, match="base"):
        load_erased_pipeline(str(other_pipeline_dir), erased)  # refused unless forced
    forced = load_erased_pipeline(str(other_pipeline_dir), erased, force=True)
    tensors, _ = read_erased_file(erased)
    assert all(torch.equal(forced.unet.state_dict()[k], v) for k, v in tensors.items())
    half = load_erased_pipeline(str(tiny_pipeline_dir), erased, torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_check_erased_files_names_the_file_that_does_not_fit(erased_run, other_pipeline_dir):
    from loreun.pipelines.loading import check_erased_files

    erased = erased_run / "erased.safetensors"
    with pytest.raises(ValueError, match=str(erased)):
        check_erased_files(str(other_pipeline_dir), [erased])


def test_file_sha256_reads_files_larger_than_one_chunk(tmp_path):
    import hashlib

    from loreun.pipelines.loading import file_sha256

    data = bytes(range(256)) * (3 * 4096 + 7)  # about 3 MiB, not a multiple of the chunk
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path).removeprefix("sha256:") == hashlib.sha256(data).hexdigest()


def test_a_stale_temporary_pipeline_folder_is_replaced(erased_run, tmp_path):
    import os

    from loreun.erase.export import save_pipeline_folder
    from loreun.pipelines import load_pipeline

    final = tmp_path / "pipeline"
    stale = tmp_path / f".pipeline.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "half-written.bin").write_text("from a run that died")
    _, meta = read_erased_file(erased_run / "erased.safetensors")
    save_pipeline_folder(load_pipeline(str(erased_run / "pipeline")), final, meta)
    assert not stale.exists() and not (final / "half-written.bin").exists()
    assert (final / "README.md").is_file() and (final / "model_index.json").is_file()


def _says(exc, message, fn, *args):
    with pytest.raises(exc) as err:
        fn(*args)
    assert str(err.value) == message


def test_every_loading_error_names_the_file_and_says_what_to_do(
    erased_run, tmp_path, other_pipeline_dir
):
    """The messages a user reads: each starts with the file and ends with the way out."""
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.loading import METADATA_KEY, check_compatible, content_hash

    good = erased_run / "erased.safetensors"
    tensors, meta = read_erased_file(good)
    pickled = tmp_path / "w.pt"
    pickled.write_bytes(b"x")
    _says(
        ValueError,
        f"{pickled}: refusing to unpickle a .pt file, which can run code; "
        "use the erased.safetensors that loreun exports",
        read_erased_file,
        pickled,
    )
    missing = tmp_path / "no.safetensors"
    _says(FileNotFoundError, f"{missing}: no such erased-weights file", read_erased_file, missing)
    name = sorted(tensors)[0]
    edited = tmp_path / "edited.safetensors"
    save_file({**tensors, name: tensors[name] + 1}, str(edited), {METADATA_KEY: json.dumps(meta)})
    _says(
        ValueError,
        f"{edited}: its tensors or header do not match the content hash in its header; "
        "the file was edited or corrupted after export",
        read_erased_file,
        edited,
    )
    nan = tmp_path / "nan.safetensors"
    bad = {**tensors, name: tensors[name] * float("nan")}
    save_file(
        bad,
        str(nan),
        {METADATA_KEY: json.dumps({**meta, "content_sha256": content_hash(bad, meta)})},
    )
    _says(
        ValueError,
        f"{nan}: 1 tensors hold NaN or inf values, e.g. {name}; the erasure diverged, "
        "and these weights would give black or noise images",
        read_erased_file,
        nan,
    )
    _says(
        ValueError,
        f"{good}: was erased from a different base model ({meta['base_model']}); its fingerprint "
        "does not match this model's weights. Load the same base, or apply it anyway with "
        "--ignore-fingerprint (force=True in Python)",
        apply_erased_weights,
        load_pipeline(str(other_pipeline_dir)),
        good,
    )
    extra = {f"{c}.weight": torch.zeros(1) for c in "wxyz"}
    _says(
        ValueError,
        "erased file: 4 tensors not in this UNet, e.g. w.weight, x.weight, y.weight",
        check_compatible,
        load_pipeline(str(other_pipeline_dir)).unet,
        extra,
        meta,
    )


def test_fingerprints_are_sha256_of_the_values():
    from loreun.pipelines.loading import content_hash

    a = {"w": torch.arange(6.0).reshape(2, 3)}
    for digest in (fingerprint(a), content_hash(a)):
        assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert content_hash(a) != content_hash({"w": a["w"].double() + 1e-12})  # exact values
    assert fingerprint(a) == fingerprint({"w": a["w"].half()})  # rounded to float16 first
    assert content_hash({"w": a["w"].half()}) == content_hash({"w": a["w"].half().float()})


def test_build_metadata_records_what_the_run_chose_and_its_defaults():
    from loreun.erase.config import EraseConfig
    from loreun.erase.export import build_metadata

    cfg = EraseConfig(model="m", out="o", concepts=["a cat"], erase_from="a dog")
    meta = build_metadata(
        cfg, {"base_fingerprint": "sha256:b"}, 5, 2, {"variant": "static", "temperature": 0.3}
    )
    assert meta["weighting_chosen"] == {"variant": "static", "temperature": 0.3}
    assert (meta["prediction_type"], meta["world_size"], meta["erase_from"]) == (
        "epsilon",
        1,
        "a dog",
    )
    assert (meta["steps_done"], meta["num_tensors"], meta["base_fingerprint"]) == (5, 2, "sha256:b")
    assert build_metadata(cfg, {}, 5, 2, None, "v_prediction", 4)["world_size"] == 4
