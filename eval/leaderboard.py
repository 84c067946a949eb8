"""The UnlearnDiffAtk leaderboard's view of an erasure: robustness and quality side by side.

One row per model (the original and each erased one), in the leaderboard's column order:
pre-attack ASR and ASR under attack on a concept prompt file (``loreun attack``), then FID and
CLIP score on a quality prompt file (COCO captions for SD). FID is taken against the original
model's images unless a reference folder is given, so the original's own FID is 0 by
construction; KID is kept beside it in ``leaderboard.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from loreun.pipelines.files import atomic_write_text

COLUMNS = ("pre-attack ASR", "ASR", "FID", "CLIP score")


def leaderboard_rows(attacks: dict[str, dict], quality: dict | None) -> dict[str, dict]:
    """{model name: {column: value}} from attack summaries and the quality audit's summary;
    a column the run did not measure is None."""
    rows = {}
    for name, summary in attacks.items():
        src = (quality or {}).get("sources", {}).get(name, {})
        fid, clip = src.get("fid", {}), src.get("clip", {})
        rows[name] = {
            "pre-attack ASR": summary["pre_asr"],
            "ASR": summary["asr"],
            **{
                f"ASR ({k})": v
                for k, v in summary.get("asr_by_kind", {}).items()
                if len(summary["asr_by_kind"]) > 1
            },
            "FID": fid.get("fid"),
            "CLIP score": clip.get("clip_score"),
            "KID": fid.get("kid"),
        }
    return rows


def table_columns(rows: dict[str, dict]) -> list[str]:
    """COLUMNS, with each attack's own ASR after "ASR" where a run used more than one."""
    extra = [c for row in rows.values() for c in row if c.startswith("ASR (")]
    extra = list(dict.fromkeys(extra))
    return [*COLUMNS[:2], *extra, *COLUMNS[2:]]


def format_table(rows: dict[str, dict]) -> str:
    """The terminal table: one line per model, the leaderboard's columns."""

    def cell(v):
        return "-" if v is None else f"{0.0 if abs(v) < 5e-4 else v:.3f}"  # no "-0.000"

    columns = table_columns(rows)
    lines = ["model".ljust(20) + "".join(c.rjust(16) for c in columns)]
    for name, row in rows.items():
        lines.append(name[:20].ljust(20) + "".join(cell(row.get(c)).rjust(16) for c in columns))
    return "\n".join(lines)


def write_leaderboard(out: Path, rows: dict, settings: dict, links: dict[str, str]) -> None:
    """leaderboard.json and leaderboard.html (the table, the settings, links to the attack
    reports and the quality audit)."""
    from .report import CSS, esc, fmt

    columns = table_columns(rows)
    atomic_write_text(
        out / "leaderboard.json",
        json.dumps({"columns": columns, "rows": rows, "settings": settings}, indent=2),
    )
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(
            f'<td class="num">{fmt(row[c]) if row.get(c) is not None else "-"}</td>'
            for c in columns
        )
        + "</tr>"
        for name, row in rows.items()
    )
    items = "".join(
        f'<li><a href="{esc(href)}">{esc(text)}</a></li>' for text, href in links.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>loreun leaderboard</title>"
        f"<style>{CSS}</style></head><body><h1>loreun: attack and quality</h1>"
        f'<table id="leaderboard"><tr><th>model</th>{head}</tr>{body}</table>'
        "<p><small>ASR: share of concept prompts whose image the detector flags, before and "
        "under UnlearnDiffAtk's attack. FID against the reference named below; CLIP score "
        f"100*max(cos, 0).</small></p><p><small>{esc(json.dumps(settings))}</small></p>"
        f"<h2>Details</h2><ul>{items}</ul></body></html>"
    )
    atomic_write_text(out / "leaderboard.html", page)
