import json

import pytest

from loreun.prompts import BUNDLED, load_prompts

from .conftest import external_prompts_dir

EXTERNAL = external_prompts_dir()


def ext(name):
    path = EXTERNAL / name
    assert path.is_file(), f"the shared prompt files are expected at {EXTERNAL}"
    return path


def test_i2p_rows_seeds_guidance_size_and_multiline():
    rows = load_prompts(ext("i2p_unsafe_4703.csv"))
    assert len(rows) == 4703
    assert rows[0].id == "0" and rows[0].prompt.startswith("weird and disturbing portrait")
    assert rows[1].seed == 4080709695 and rows[1].guidance == 7.0
    assert (rows[1].width, rows[1].height) == (512, 512)
    assert "🪦" in rows[1].prompt
    assert any("\n" in r.prompt for r in rows)
    assert max(r.seed for r in rows) > 2**31  # does not fit a signed 32-bit int
    assert rows[0].extra["categories"] == "violence, self-harm"
    assert "" not in rows[0].extra  # the unnamed index column is dropped
    assert len({r.id for r in rows}) == 4703


def test_unlearndiffatk_index_column():
    rows = load_prompts(ext("unlearndiffatk_nudity_142.csv"))
    assert len(rows) == 142
    assert "Unnamed: 0" not in rows[0].extra and rows[0].guidance == 7.0
    assert rows[0].id != "21" or rows[0].extra["sd_model"] == "stable-diffusion-v1-4"


def test_salun_bom_and_class():
    rows = load_prompts(ext("salun_imagenette.csv"))
    assert len(rows) == 10
    assert rows[0].id == "0" and rows[0].prompt == "Image of tench" and rows[0].seed == 4889
    assert rows[0].cls == "tench" and rows[0].extra == {"classidx": "0"}
    assert rows[0].guidance is None and rows[0].width is None


def test_esd_small_imagenet():
    rows = load_prompts(ext("esd_small_imagenet.csv"))
    assert len(rows) == 100 and rows[0].cls == "cassette player" and rows[1].seed == 4667


def test_coco_without_case_number_uses_row_index():
    rows = load_prompts(ext("coco_30k_first1000.csv"))
    assert len(rows) == 995
    assert [r.id for r in rows[:3]] == ["0", "1", "2"]
    assert rows[0].extra["image_id"] == "000000203564" and rows[0].seed == 41337
    assert any("\n" in r.prompt for r in rows)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_sets(name):
    rows = load_prompts(name)
    assert rows and all(r.prompt and r.seed is not None for r in rows)


def test_tsv_jsonl_txt(tmp_path):
    (tmp_path / "p.tsv").write_text("prompt\tseed\tguidance\tlabel_str\na cat\t3\t5.5\tcat\n")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "a dog", "sd_seed": 4294967295, "width": 64, "height": 32, "note": 1})
        + "\n"
    )
    (tmp_path / "p.txt").write_text("\ufeffa bird\n\n  a fish  \n")
    tsv = load_prompts(tmp_path / "p.tsv")[0]
    assert (tsv.prompt, tsv.seed, tsv.guidance, tsv.cls) == ("a cat", 3, 5.5, "cat")
    js = load_prompts(tmp_path / "p.jsonl")[0]
    assert (js.seed, js.width, js.height, js.extra) == (4294967295, 64, 32, {"note": 1})
    assert [r.prompt for r in load_prompts(tmp_path / "p.txt")] == ["a bird", "a fish"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("text,seed\na,1\n", "no 'prompt' column (columns: text, seed)"),
        ("", "holds no prompt rows"),
        ("prompt\n", "holds no prompt rows"),
        ("prompt,seed\na,1\nb,abc\n", "row 2: seed 'abc' is not an integer"),
        ("prompt,seed\na,1.5\n", "row 1: seed '1.5' is not an integer"),
        ("prompt,seed\na,-1\n", "row 1: seed -1 is outside"),
        ("prompt,guidance\na,high\n", "row 1: guidance 'high' is not a number"),
        ("prompt,width,height\na,500,512\n", "row 1: width '500' is not a positive multiple of 8"),
        ("prompt,width\na,0\n", "row 1: width '0' is not a positive multiple of 8"),
        ("prompt,height\na,-16\n", "row 1: height '-16' is not a positive multiple of 8"),
        ("prompt,height\na,516\n", "row 1: height '516' is not a positive multiple of 8"),
        ("prompt,width\na,4104\n", "row 1: width 4104 is over 4096"),
        ("prompt,guidance\na,inf\n", "row 1: guidance 'inf' is not a finite number"),
        ("prompt,guidance\na,nan\n", "row 1: guidance 'nan' is not a finite number"),
        ("prompt,seed\na,18446744073709551616\n", "row 1: seed 18446744073709551616 is outside"),
    ],
)
def test_bad_files_name_file_and_row(tmp_path, content, needle):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled sets: nudity"):
        load_prompts(tmp_path / "nope.csv")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        load_prompts(tmp_path / "p.xlsx")


def test_seed_edges_sizes_and_which_alias_wins(tmp_path):
    """Seed 0 and 2^64-1 are valid; 8 and 4096 are valid sides; the I2P-specific column names
    come before the generic ones, as I2P files carry both (evaluation_seed is the one used)."""
    path = tmp_path / "p.csv"
    path.write_text(
        "prompt,seed,evaluation_seed,guidance,evaluation_guidance,width,sd_image_width,height\n"
        "a,5,0,1.0,7.5,16,8,4096\n"
        "b,18446744073709551615,,2.0,,,,\n"
    )
    a, b = load_prompts(path)
    assert (a.seed, a.guidance, a.width, a.height) == (0, 7.5, 8, 4096)
    assert (b.seed, b.guidance, b.width, b.height) == (2**64 - 1, 2.0, None, None)


def test_jsonl_blank_lines_bom_and_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [json.dumps({"prompt": "a"}), "", "  ", json.dumps({"prompt": "b", "seed": 2})]
    path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    assert [(r.prompt, r.seed) for r in load_prompts(path)] == [("a", None), ("b", 2)]
    path.write_text(json.dumps({"prompt": "a"}) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=f"^{path}: line 2: expected a JSON object$"):
        load_prompts(path)
    path.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match=f"^{path}: no 'prompt' field$"):
        load_prompts(path)
    txt = tmp_path / "p.txt"
    txt.write_text("\ufeffa bird\n", encoding="utf-8")
    assert load_prompts(txt)[0].prompt == "a bird"


def test_reader_messages_and_exact_text(tmp_path):
    """What a user reads when a file cannot be read, and that a prompt's text, an embedded
    CRLF included, is kept as the file holds it."""
    from loreun.prompts.reader import BUNDLED

    with pytest.raises(FileNotFoundError) as err:
        load_prompts(tmp_path / "nope.csv")
    assert str(err.value).endswith(f"(bundled sets: {', '.join(BUNDLED)})")
    odd = tmp_path / "p.XLSX"
    odd.write_text("x")
    with pytest.raises(
        ValueError, match=r"unknown prompt file type '\.xlsx'; use \.csv, \.tsv, \.jsonl or \.txt$"
    ):
        load_prompts(odd)
    huge = tmp_path / "huge.csv"
    huge.write_text("prompt\n" + "a" * 200_000 + "\n")
    with pytest.raises(ValueError, match=f"^{huge}: not a readable table \\(field larger than"):
        load_prompts(huge)
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(b'prompt,seed,width\r\n"line one\r\nline two",7.0,abc\r\n')
    with pytest.raises(ValueError, match=f"^{crlf}: row 1: width 'abc' is not a number$"):
        load_prompts(crlf)
    crlf.write_bytes(b'prompt,seed\r\n"line one\r\nline two",1e3\r\n')
    row = load_prompts(crlf)[0]
    assert (row.prompt, row.seed, row.cls) == ("line one\r\nline two", 1000, None)
