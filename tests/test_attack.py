"""loreun attack: the text-gradient attack's parts, the run on the digits model, resume, errors."""

import json

import pytest
import torch

from loreun.cli.main import main
from loreun.pipelines.prefix_attack import (
    AttackSettings,
    SampledOneHot,
    encode_with_prefix,
    prefixed_ids,
    project_simplex,
)


def _bisection_projection(row: torch.Tensor) -> torch.Tensor:
    """The simplex projection by bisection on the shift, as a slow independent reference."""
    lo, hi = (row.min() - 1).item(), row.max().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        if (row - mid).clamp_min(0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return (row - hi).clamp_min(0)


def test_simplex_projection_matches_bisection_and_keeps_simplex_points():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    got = project_simplex(p)
    assert torch.allclose(got.sum(-1), torch.ones(6, dtype=torch.float64))
    assert (got >= 0).all()
    for row, want in zip(p, got):
        assert torch.allclose(_bisection_projection(row), want, atol=1e-9)
    assert torch.allclose(project_simplex(got), got)  # a point on the simplex stays
    assert project_simplex(torch.tensor([[2.0, 0.0, 0.0]])).tolist() == [[1.0, 0.0, 0.0]]
    third = project_simplex(torch.tensor([[0.5, 0.5, 0.5]]))
    assert torch.allclose(third, torch.full((1, 3), 1 / 3))


def test_sampled_one_hot_draws_from_the_rows_and_passes_clipped_gradients():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    out = SampledOneHot.apply(probs, torch.Generator().manual_seed(0))
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    (out * torch.tensor([[3.0, -0.5, -2.0], [0.25, 1.0, -7.0]])).sum().backward()
    assert probs.grad.tolist() == [[1.0, -0.5, -1.0], [0.25, 1.0, -1.0]]
    uniform = torch.full((1, 4), 0.25)
    draws = {
        SampledOneHot.apply(uniform, torch.Generator().manual_seed(s)).argmax().item()
        for s in range(40)
    }
    assert draws == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def digits_pipe():
    from loreun.pipelines.models import load_pipeline

    return load_pipeline("digits")


def test_prefix_ids_keep_the_prompt_and_its_end_token(digits_pipe):
    tok = digits_pipe.tokenizer
    plain = tok("a handwritten 3", padding="max_length", return_tensors="pt").input_ids
    ids = prefixed_ids(tok, "a handwritten 3", 5)
    assert ids.shape == plain.shape
    assert ids[0, 0] == plain[0, 0] and ids[0, 6:].tolist() == plain[0, 1:-5].tolist()
    long = prefixed_ids(tok, " ".join(["three"] * 200), 5)
    assert long.shape == plain.shape and long[0, -1].item() == tok.eos_token_id


def test_encoding_with_a_prefix_equals_encoding_its_tokens(digits_pipe):
    """Swapping in the embeddings of real tokens must give what those tokens give."""
    enc, tok = digits_pipe.text_encoder, digits_pipe.tokenizer
    ids = prefixed_ids(tok, "a handwritten 3", 2)
    chosen = torch.tensor(tok.convert_tokens_to_ids(["the</w>", "digit</w>"]))
    real = ids.clone()
    real[0, 1:3] = chosen
    with torch.no_grad():
        want = enc(real)[0]
        got = encode_with_prefix(enc, ids, enc.get_input_embeddings().weight[chosen])
        unhooked = enc(real)[0]
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(unhooked, want)  # the hook is gone afterwards


KIND_ERROR = "--attack-kind: each of prefix, embedding at most once, "


def test_attack_settings_refuse_bad_values():
    for kwargs, message in (
        ({"kinds": ["tokens"]}, f"{KIND_ERROR}got tokens"),
        ({"kinds": []}, f"{KIND_ERROR}got none"),
        ({"kinds": ["prefix", "prefix"]}, f"{KIND_ERROR}got prefix, prefix"),
        ({"embedding_lr": 0.0}, "--attack-embedding-lr: must be > 0 and finite, got 0.0"),
        ({"prefix_tokens": 0}, "--attack-tokens: must be >= 1, got 0"),
        ({"steps": 0}, "--attack-steps: must be >= 1, got 0"),
        ({"rounds": 0}, "--attack-rounds: must be >= 1, got 0"),
        ({"lr": 0.0}, "--attack-lr: must be > 0 and finite, got 0.0"),
        ({"weight_decay": -1.0}, "--attack-weight-decay: must be >= 0 and finite, got -1.0"),
    ):
        with pytest.raises(ValueError) as err:
            AttackSettings(**kwargs)
        assert str(err.value) == message


@pytest.fixture(scope="module")
def weak_erasure(tmp_path_factory):
    """A short digit-3 erasure: most plain prompts lose the 3, and some attacks bring it back."""
    from loreun.erase import EraseConfig, erase
    from loreun.pipelines.digits_data import digit_captions

    out = tmp_path_factory.mktemp("weak") / "erase"
    cfg = EraseConfig(
        model="digits", out=str(out), concepts=digit_captions(3), method="esd-x",
        steps=80, lr=1e-4, checkpoint_every=0,
    )  # fmt: skip
    return erase(cfg)


def attack_argv(out, *extra):
    return [
        "attack", "--model", "digits", "--prompts", "digits", "--detector", "digits",
        "--erased-class", "3", "--steps", "8", "--attack-steps", "4", "--out", str(out),
        "-q", *map(str, extra),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def attacked(weak_erasure, tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "run"
    assert main(attack_argv(out, "--erased", weak_erasure)) == 0
    return out


def _log(out):
    return [json.loads(line) for line in (out / "attack.jsonl").read_text().splitlines()]


def test_attack_writes_rates_rows_images_and_report(attacked, digits_pipe):
    summary = json.loads((attacked / "summary.json").read_text())
    log = _log(attacked)
    assert summary["rows"] == len(log) == 10  # the ten class-3 rows of the digits set
    assert {r["class"] for r in log} == {"3"}
    pre = sum(r["pre_success"] for r in log) / 10
    after = sum(r["pre_success"] or bool(r["attacked_success"]) for r in log) / 10
    assert (summary["pre_asr"], summary["asr"]) == (pre, after)
    assert summary["asr"] >= summary["pre_asr"] and summary["attacked_rows"] >= 3
    assert summary["attack"]["steps"] == 4 and summary["seeds"] == [r["seed"] for r in log]
    for r in log:
        assert (attacked / r["original_image"]).is_file() and (attacked / r["pre_image"]).is_file()
        if r["pre_success"]:
            assert r["adv_prompt"] is None and r["attacked_image"] is None
        else:
            assert len(r["losses"]) == 4 and (attacked / r["attacked_image"]).is_file()
            assert r["adv_prompt"].endswith(r["prompt"])
            assert len(r["adv_token_ids"]) == digits_pipe.tokenizer.model_max_length
    header = (attacked / "results.csv").read_text().splitlines()[0].split(",")
    for col in ("adv_prompt", "pre_success", "attacked_success", "pre_image", "attacked_image"):
        assert col in header
    page = (attacked / "report.html").read_text()
    assert page.count('<img src="images/') == sum(3 if r["attacked_image"] else 2 for r in log)
    # a digit judge outlines what shows the digit without blurring it: the target must be seen
    assert page.count('class="shows"') == sum(
        r["original_success"] + r["pre_success"] + bool(r["attacked_success"]) for r in log
    )
    assert 'class="flagged"' not in page and "and blurred" not in page


def test_attack_prompt_regenerates_its_image(attacked):
    """The recorded token ids, conditioned at the row's seed and guidance, give the image
    the verdict was on."""
    import numpy as np
    from PIL import Image

    from loreun.eval.attack import _latents
    from loreun.pipelines.generate import Job, decode_latents
    from loreun.pipelines.loading import load_erased_pipeline

    rec = next(r for r in _log(attacked) if r["adv_token_ids"])
    erased = json.loads((attacked / "summary.json").read_text())["erased"]
    pipe = load_erased_pipeline("digits", erased)
    saved = Image.open(attacked / rec["attacked_image"])
    job = Job(rec["index"], 0, None, rec["seed"], rec["guidance"], *saved.size)
    with torch.no_grad():
        emb = pipe.text_encoder(torch.tensor([rec["adv_token_ids"]]))[0]
    latents = _latents(pipe, job, 8, emb)
    image = decode_latents(pipe, latents, [torch.Generator().manual_seed(0)])[0]
    diff = np.abs(np.asarray(saved, dtype=int) - np.asarray(image, dtype=int))
    assert diff.max() <= 1


def test_the_attack_inside_adversarial_erasure_equals_loreun_attack(attacked):
    """``--adversarial`` finds its prompts with ``find_prompt``: on the same model, prompt,
    target and seed it gives the token ids ``loreun attack`` recorded (one round)."""
    from loreun.erase.adversarial import find_prompt
    from loreun.eval.attack import read_target
    from loreun.pipelines.loading import load_erased_pipeline
    from loreun.pipelines.schedule import schedule_of

    recs = [r for r in _log(attacked) if r["adv_token_ids"] and r["rounds"] == 1]
    erased = json.loads((attacked / "summary.json").read_text())["erased"]
    pipe = load_erased_pipeline("digits", erased)
    for rec in recs[:2]:
        target = read_target(attacked / "targets" / f"{rec['index']:06d}.safetensors")
        ids, text, _ = find_prompt(
            pipe, schedule_of(pipe), rec["prompt"], target, AttackSettings(steps=4), rec["seed"]
        )
        assert ids["text_encoder"][0].tolist() == rec["adv_token_ids"]
        assert text == rec["adv_prompt"]
    assert recs


def test_attack_resumes_a_killed_run_to_the_same_records(attacked, weak_erasure, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(attacked, out)
    lines = (out / "attack.jsonl").read_text().splitlines()
    (out / "attack.jsonl").write_text("\n".join(lines[:6]) + '\n{"index": 7, "pre_succ')
    for name in ("summary.json", "results.csv", "report.html"):
        (out / name).unlink()
    assert main(attack_argv(out, "--erased", weak_erasure)) == 0

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]

    assert strip(_log(out)[6:]) == strip(_log(attacked)[6:])
    assert len(_log(out)) == 10 and (out / "summary.json").is_file()
    assert main(attack_argv(out, "--erased", weak_erasure, "--attack-steps", "5")) == 2


def test_attack_on_the_unerased_model_judges_the_targets(tmp_path):
    out = tmp_path / "base"
    assert main(attack_argv(out, "--attack-rounds", "1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["erased"] is None
    assert summary["pre_asr"] == summary["original_rate"] >= 0.9
    assert all(r["pre_image"] == r["original_image"] for r in _log(out))
    assert not list((out / "images").glob("*-pre.png"))


def test_attack_refuses_bad_input_in_one_line(tmp_path, tiny_pipeline_dir, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,class\na cat,cat\n")
    cases = [
        (["--detector", "clip"], "--detector: the attack is judged by one of nudenet, classifier"),
        (["--prompts", prompts], f"--prompts: {prompts}: no row has class 3"),
        (["--attack-tokens", 100], "--attack-tokens: 100 prefix tokens do not fit text_encoder"),
        (["--erased", tmp_path / "none.safetensors"], "none.safetensors"),
    ]
    for extra, message in cases:
        argv = attack_argv(tmp_path / "out", *extra)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "out").exists()
    argv = attack_argv(tmp_path / "out")
    argv.remove("--erased-class")
    argv.remove("3")
    assert main(argv) == 2
    assert "--erased-class: a classifier judges success by the erased class" in (
        capsys.readouterr().err
    )


def test_evaluate_attack_prints_the_leaderboard_columns(weak_erasure, tmp_path, capsys):
    quality = tmp_path / "quality.csv"
    quality.write_text(
        "prompt,evaluation_seed,class\n"
        + "".join(f"a handwritten {d},{100 + d},{d}\n" for d in range(10))
    )
    out = tmp_path / "board"
    argv = [
        "evaluate", "--attack", "--model", "digits", "--erased", weak_erasure, "--prompts",
        "digits", "--detector", "digits", "--erased-class", "3", "--quality-prompts", quality,
        "--fid-features", "digits", "--steps", "8", "--attack-steps", "2", "--out", out, "-q",
    ]  # fmt: skip
    assert main(list(map(str, argv))) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["model", "pre-attack", "ASR", "ASR", "FID", "CLIP", "score"]
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["columns"] == ["pre-attack ASR", "ASR", "FID", "CLIP score"]
    original, erased = board["rows"]["original"], board["rows"]["erased"]
    attacked = json.loads((out / "attack" / "erased" / "summary.json").read_text())
    assert (erased["pre-attack ASR"], erased["ASR"]) == (attacked["pre_asr"], attacked["asr"])
    assert abs(original["FID"]) < 1e-3 and erased["FID"] > 0.0  # against the original's images
    assert original["CLIP score"] is None  # no --clip-model
    assert printed[1].split()[-1] == "-" and printed[2].split()[0] == "erased"
    page = (out / "leaderboard.html").read_text()
    assert 'href="attack/erased/report.html"' in page and 'href="quality/report.html"' in page


def test_both_attacks_are_judged_side_by_side(weak_erasure, tmp_path, capsys):
    """``--attack-kind`` twice: every attacked row runs both; ``asr`` is the worst case over
    them, ``asr_by_kind`` each one's, and the report and the leaderboard show both."""
    out = tmp_path / "both"
    argv = attack_argv(out, "--erased", weak_erasure, "--attack-kind", "prefix")
    assert main([*argv, "--attack-kind", "embedding"]) == 0
    assert "prefix" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    log = _log(out)
    attacked = [r for r in log if not r["pre_success"]]
    assert attacked and all(r["embedding_rounds"] == 1 and r["rounds"] == 1 for r in attacked)
    assert all(len(r["embedding_losses"]) == 4 for r in attacked)
    assert all((out / r["embedding_image"]).is_file() for r in attacked)
    by_kind = summary["asr_by_kind"]
    assert set(by_kind) == {"prefix", "embedding"}
    assert max(by_kind.values()) <= summary["asr"] <= sum(by_kind.values())
    union = sum(r["pre_success"] or r["attacked_success"] or r["embedding_success"] for r in log)
    assert summary["asr"] == union / len(log)
    page = (out / "report.html").read_text()
    assert "ASR under the embedding attack" in page and "embedding attack" in page


def test_the_embedding_attack_starts_where_it_says_and_moves_only_its_prefix(digits_pipe):
    """Its prefix starts at the vocabulary's mean embedding, its steps lower the loss it
    optimises (measured on one fixed set of draws), and the model's weights do not move: on
    the prompt "a handwritten 3" it pulls the model toward a 7 the model drew."""
    from loreun.pipelines.family import native_size
    from loreun.pipelines.generate import pipeline_sample
    from loreun.pipelines.prefix_attack import EmbeddingAttack
    from loreun.pipelines.schedule import schedule_of

    pipe, size = digits_pipe, native_size(digits_pipe)
    gens = [torch.Generator().manual_seed(7)]
    target, _ = pipeline_sample(pipe, "a handwritten 7", gens, 7.5, 8, size, size)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    settings = AttackSettings(steps=30, embedding_lr=0.05)
    attack = EmbeddingAttack(pipe, schedule_of(pipe), "a handwritten 3", target, settings, 5)
    (emb,) = attack.embeddings
    mean = attack.spaces[0].tables[0].float().mean(0)
    assert torch.allclose(emb[0].detach(), mean) and emb.shape[0] == settings.prefix_tokens

    def fixed_loss() -> float:
        attack.generator.manual_seed(123)
        with torch.no_grad():
            return sum(attack.loss().item() for _ in range(16)) / 16

    start = fixed_loss()
    attack.run()
    assert fixed_loss() < 0.9 * start
    assert all(torch.equal(before[n], p) for n, p in pipe.unet.named_parameters())
