"""Read prompt files (CSV, TSV, JSONL, TXT) into rows with per-row seed, guidance and size.

Columns that mean the same thing in different research repos are read as one. Unknown columns
are kept, so they reach the manifest and the report.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
BUNDLED = {
    "nudity": "nudity.csv",
    "imagenette": "imagenette.csv",
    "neutral": "neutral.csv",
    "digits": "digits.csv",
}

ALIASES = {
    "seed": ("evaluation_seed", "sd_seed", "seed"),
    "guidance": ("evaluation_guidance", "sd_guidance_scale", "guidance"),
    "width": ("sd_image_width", "width"),
    "height": ("sd_image_height", "height"),
    "id": ("case_number", "case_num", "id"),
    "cls": ("class", "label_str", "concept"),
}
INDEX_COLUMNS = ("", "Unnamed: 0")
MAX_SEED = 2**64 - 1
# The largest side loreun generates: 4x SDXL's native size. An 80000-pixel row would otherwise
# end in an out-of-memory crash after the earlier rows were made.
MAX_SIZE = 4096


@dataclass
class PromptRow:
    """One prompt with the settings it must be generated with.

    ``None`` means the file gave no value; generation then uses its defaults.
    """

    id: str
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    cls: str | None = None
    extra: dict = field(default_factory=dict)


def load_prompts(path_or_name: str | Path) -> list[PromptRow]:
    """Read a prompt file, or a bundled set by name (nudity, imagenette, neutral, digits).

    Raises:
        FileNotFoundError: no such file or bundled set.
        ValueError: a malformed file; the message names the file and the row.
    """
    path = _resolve(path_or_name)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_tsv}
    read = readers.get(path.suffix.lower())
    if read is None:
        raise ValueError(
            f"{path}: unknown prompt file type {path.suffix.lower()!r}; "
            "use .csv, .tsv, .jsonl or .txt"
        )
    try:
        records = read(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable table ({e})") from None
    if not records:
        raise ValueError(f"{path}: holds no prompt rows")
    return [_to_row(rec, i, path) for i, rec in enumerate(records)]


def _resolve(path_or_name: str | Path) -> Path:
    name = str(path_or_name)
    if name in BUNDLED:
        return DATA_DIR / BUNDLED[name]
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such prompt file (bundled sets: {', '.join(BUNDLED)})")
    return path


def _read_txt(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [{"prompt": ln.strip()} for ln in lines if ln.strip()]


class _NotJSON(ValueError):
    pass


def _no_constant(name: str):
    """NaN and Infinity are Python's extension of JSON: a manifest (written strictly) could
    not record the row after its image was made, on every rerun."""
    raise _NotJSON(name)


def jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line names itself."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from e
        except _NotJSON as e:
            raise ValueError(
                f"{path}: line {n}: {e} is not JSON (write null, or the number as text)"
            ) from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {n}: expected a JSON object")
        out.append((n, rec))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    out = [rec for _, rec in jsonl_objects(path)]
    if out and not any("prompt" in r for r in out):
        raise ValueError(f"{path}: no 'prompt' field")
    return out


def _read_csv(path: Path) -> list[dict]:
    return _read_table(path, ",")


def _read_tsv(path: Path) -> list[dict]:
    return _read_table(path, "\t")


def _read_table(path: Path, delimiter: str) -> list[dict]:
    # utf-8-sig drops a BOM; newline="" lets quoted prompts hold newlines.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = reader.fieldnames or []
        if columns and "prompt" not in columns:
            raise ValueError(f"{path}: no 'prompt' column (columns: {', '.join(columns)})")
        return list(reader)


def _first(rec: dict, names: tuple[str, ...]):
    for name in names:
        value = rec.get(name)
        if value is not None and str(value).strip() != "":
            return value
    return None


def _to_row(rec: dict, index: int, path: Path) -> PromptRow:
    where = f"{path}: row {index + 1}"
    prompt = rec.get("prompt")
    if prompt is None:
        raise ValueError(f"{where}: no prompt")
    row = PromptRow(
        id=str(_first(rec, ALIASES["id"]) or index).strip(),
        prompt=str(prompt),
        seed=_seed(_first(rec, ALIASES["seed"]), where),
        guidance=_number(_first(rec, ALIASES["guidance"]), where, "guidance"),
        width=_size(_first(rec, ALIASES["width"]), where, "width"),
        height=_size(_first(rec, ALIASES["height"]), where, "height"),
        cls=_text(_first(rec, ALIASES["cls"])),
    )
    used = {"prompt", *INDEX_COLUMNS} | {a for names in ALIASES.values() for a in names}
    row.extra = {k: v for k, v in rec.items() if k not in used and k is not None}
    return row


def _text(value) -> str | None:
    return None if value is None else str(value).strip()


def _seed(value, where: str) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    try:
        seed = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            as_float = math.nan
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ValueError(f"{where}: seed {text!r} is not an integer") from None
        seed = int(as_float)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{where}: seed {seed} is outside 0..2^64-1")
    return seed


def _number(value, where: str, what: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: {what} {str(value)!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {what} {str(value)!r} is not a finite number")
    return number


def _size(value, where: str, what: str) -> int | None:
    number = _number(value, where, what)
    if number is None:
        return None
    if not number.is_integer() or number <= 0 or int(number) % 8:
        raise ValueError(f"{where}: {what} {str(value)!r} is not a positive multiple of 8")
    if number > MAX_SIZE:
        raise ValueError(f"{where}: {what} {int(number)} is over {MAX_SIZE}, the largest allowed")
    return int(number)
