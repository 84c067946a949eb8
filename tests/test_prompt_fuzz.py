"""The prompt reader either reads a file or raises its own one-line error naming the file:
random bytes, random table shapes and random encodings never escape as anything else."""

import csv
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loreun.prompts import load_prompts
from loreun.prompts.reader import MAX_SEED, MAX_SIZE

SUFFIXES = (".csv", ".tsv", ".jsonl", ".txt")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"prompts{suffix}"
        path.write_bytes(data)
        try:
            return load_prompts(path)
        except ValueError as e:  # loreun's own error: one line that names the file
            assert str(path) in str(e) and "\n" not in str(e)
            return None


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(SUFFIXES))
def test_random_bytes(data, suffix):
    _read(data, suffix)


CELLS = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "512", "inf", "nan", "1e3", "0", "-8", "4294967295", '"', "\n"]),
)
COLUMNS = st.lists(
    st.sampled_from(
        ["prompt", "evaluation_seed", "sd_seed", "seed", "evaluation_guidance", "guidance"]
        + ["sd_image_width", "sd_image_height", "width", "case_number", "class", "", "extra"]
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(
    COLUMNS,
    st.lists(st.lists(CELLS, max_size=8), max_size=6),
    st.sampled_from([",", "\t"]),
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]),
)
def test_random_tables_and_encodings(columns, rows, delimiter, encoding):
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter)
    writer.writerow(columns)
    writer.writerows(rows)
    try:
        data = buf.getvalue().encode(encoding)
    except UnicodeEncodeError:
        return
    out = _read(data, ".csv" if delimiter == "," else ".tsv")
    for row in out or []:  # what is read obeys the reader's own bounds
        assert row.seed is None or 0 <= row.seed <= MAX_SEED
        assert row.width is None or (0 < row.width <= MAX_SIZE and row.width % 8 == 0)
        assert row.guidance is None or row.guidance == row.guidance  # never NaN
