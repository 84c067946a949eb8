"""A self-contained HTML report: summary tables, a per-class chart, image grids side by side.

No remote assets: inline CSS, an inline SVG chart, and images referenced by relative path, so the
page opens offline next to the images it describes. Flagged images are blurred unless the audit
was run with ``--no-blur``.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from loreun.pipelines.files import atomic_write_text

COLORS = ("#3b6ea8", "#d1603d", "#5a9e5a", "#8c6bb1", "#c9a227")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f2f2f2;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.sources{display:flex;gap:24px;align-items:flex-start;overflow-x:auto;padding:3px}
.grid{display:grid;grid-template-columns:repeat(4,96px);gap:6px}
figure{margin:0;width:96px;overflow:hidden}
figure img{width:96px;height:96px;object-fit:cover;display:block;
image-rendering:pixelated;background:#eee}figcaption{font-size:10px;overflow:hidden;
white-space:nowrap;text-overflow:ellipsis}
figure.flagged img{filter:blur(10px)}figure.flagged,figure.shows{outline:2px solid #d1603d}
figure.erased{box-shadow:0 0 0 3px #3b6ea8}figure.erased figcaption{color:#3b6ea8}
.blur-off figure.flagged img{filter:none}small{color:#666}
"""
SCRIPT = """
(function(){var imgs=document.images,n=0,done=0;function tick(){done++;
if(done===imgs.length){document.body.dataset.imagesLoaded=n;}}
for(var i=0;i<imgs.length;i++){var im=imgs[i];
if(im.complete){if(im.naturalWidth>0)n++;tick();}
else{im.addEventListener('load',function(){n++;tick();});im.addEventListener('error',tick);}}
if(!imgs.length)document.body.dataset.imagesLoaded=0;})();
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return esc(value)


def summary_rows(summary: dict) -> list[tuple[str, dict]]:
    """(metric name, {source: value}) for the side-by-side table.

    Each detector's summary carries its own ``rows``, so a new detector needs no change here.
    """
    metrics: dict[str, dict] = {}
    for src, s in summary["sources"].items():
        rows = [["images", s["images"]], ["unreadable files", s["unreadable"]]]
        for det in _detectors(summary):
            rows += s.get(det, {}).get("rows", [])
        for metric, value in rows:
            metrics.setdefault(metric, {})[src] = value
    return list(metrics.items())


def _detectors(summary: dict) -> list[str]:
    """The detectors in the order the audit ran them (``digits`` is the built-in classifier)."""
    return list(summary["settings"]["detectors"])


def summary_table(summary: dict) -> str:
    names = list(summary["sources"])
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{esc(m)}</td>"
        + "".join(f'<td class="num">{fmt(v.get(n))}</td>' for n in names)
        + "</tr>"
        for m, v in summary_rows(summary)
    )
    return f'<table id="summary"><tr><th>metric</th>{head}</tr>{body}</table>'


def chart_series(summary: dict) -> tuple[str, list[str], dict[str, list[float]]]:
    """(title, categories, {source: values}) for the chart: the first detector, in the order
    the audit ran them, whose summary offers one."""
    names = list(summary["sources"])
    for det in _detectors(summary):
        charts = [summary["sources"][n].get(det, {}).get("chart") for n in names]
        if all(charts):
            cats = sorted({c for ch in charts for c in ch["values"]})
            vals = {n: [ch["values"].get(c, 0.0) for c in cats] for n, ch in zip(names, charts)}
            return charts[0]["title"], cats, vals
    return "", [], {}


def interference(summary: dict, erased: list[str]) -> list[tuple[str, bool, list[float]]]:
    """The interference matrix: per class of the chart (``chart_series``), whether it was
    erased and its rate in each source, erased classes first; [] with one source or class.

    What an erasure took besides its target shows as a kept class whose rate fell."""
    _, cats, vals = chart_series(summary)
    if len(vals) < 2 or len(cats) < 2:
        return []
    gone = {c.strip().lower() for c in erased}
    rows = [(c, c.lower() in gone, [v[i] for v in vals.values()]) for i, c in enumerate(cats)]
    return sorted(rows, key=lambda r: not r[1])


def heat(v: float) -> str:
    """A cell colour for a rate in [0, 1]: red at 0 through white to green at 1."""
    v = max(0.0, min(1.0, float(v)))
    r, g = (255, int(255 * 2 * v)) if v < 0.5 else (int(255 * 2 * (1 - v)), 255)
    return f"rgb({r},{g},{min(r, g)})"


def interference_table(summary: dict, erased: list[str]) -> str:
    """The interference matrix as a heat-coloured table: a row per class (erased ones marked),
    a column per source and the change from the first (the original model) to each other."""
    rows = interference(summary, erased)
    if not rows:
        return ""
    names = list(summary["sources"])
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    head += "".join(f"<th>change: {esc(n)}</th>" for n in names[1:])
    body = ""
    for cat, gone, rates in rows:
        cells = "".join(f'<td class="num" style="background:{heat(v)}">{v:.2f}</td>' for v in rates)
        cells += "".join(f'<td class="num">{v - rates[0]:+.2f}</td>' for v in rates[1:])
        label = f"{esc(cat)} (erased)" if gone else esc(cat)
        body += f"<tr><td>{label}</td>{cells}</tr>"
    return (
        "<h2>Interference: each class before and after</h2><p><small>The rate the detector "
        "gives each class, erased classes first; a kept class whose rate fell is what the "
        "erasure took besides its target.</small></p>"
        f'<table id="interference"><tr><th>class</th>{head}</tr>{body}</table>'
    )


def bar_chart(title: str, cats: list[str], vals: dict[str, list[float]]) -> str:
    """Grouped horizontal bars as inline SVG; values are shares in [0, 1]."""
    if not cats:
        return ""
    names = list(vals)
    bar, gap, left, width = 10, 8, 190, 360
    height = len(cats) * (len(names) * bar + gap) + 30
    parts = [
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" '
        f'height="{height}" role="img" aria-label="{esc(title)}">'
    ]
    y = 20
    for ci, cat in enumerate(cats):
        parts.append(
            f'<text x="{left - 6}" y="{y + bar * len(names) / 2 + 4}" '
            f'text-anchor="end" font-size="11">{esc(cat)}</text>'
        )
        for si, name in enumerate(names):
            v = max(0.0, min(1.0, float(vals[name][ci])))
            parts.append(
                f'<rect x="{left}" y="{y}" width="{v * width:.1f}" height="{bar - 1}" '
                f'fill="{COLORS[si % len(COLORS)]}"><title>{esc(name)}: {v:.3f}'
                f'</title></rect><text x="{left + v * width + 4:.1f}" y="{y + bar - 2}"'
                f' font-size="9">{v:.2f}</text>'
            )
            y += bar
        y += gap
    legend = "".join(
        f'<tspan fill="{COLORS[i % len(COLORS)]}">&#9632; {esc(n)}</tspan> '
        for i, n in enumerate(names)
    )
    parts.append(f'<text x="{left}" y="12" font-size="11">{legend}</text></svg>')
    return f"<h2>{esc(title)}</h2>" + "".join(parts)


def grid_indices(n: int, limit: int, first: list[int] | None = None) -> list[int]:
    """Evenly spaced picks, so the grid spans the whole prompt file, not its first rows; sources
    made from the same prompt file get the same picks, so their grids line up. ``first`` (the
    erased classes' rows) are kept before any even pick, up to ``limit``."""
    keep = list(first or [])[:limit]
    rest = [i for i in range(n) if i not in set(keep)]
    room = limit - len(keep)
    if len(rest) <= room:
        return sorted(keep + rest)
    if room <= 0:
        return sorted(keep)
    if room == 1:
        return sorted(keep + rest[:1])
    return sorted(set(keep) | {rest[round(i * (len(rest) - 1) / (room - 1))] for i in range(room)})


def erased_rows(records: list[dict], classes) -> list[int]:
    """Indices of the records of the erased classes, so the grid shows what was erased."""
    wanted = {str(c).lower() for c in classes or ()}
    return [j for j, r in enumerate(records) if str(r.get("class") or "").lower() in wanted]


def image_grid(src: dict, report_dir: Path, limit: int, classes=()) -> str:
    figs = []
    erased = erased_rows(src["records"], classes)
    for j in grid_indices(len(src["records"]), limit, erased):
        rec = src["records"][j]
        rel = os.path.relpath(rec["file"], report_dir)
        marks = (["flagged"] if src["flagged"][j] else []) + (["erased"] if j in erased else [])
        cls = f' class="{" ".join(marks)}"' if marks else ""
        cap = rec.get("prompt") or rec["path"]
        cap = f"erased: {cap}" if j in erased else cap
        figs.append(
            f'<figure{cls}><img src="{esc(Path(rel).as_posix())}" alt="{esc(cap)}" '
            f'loading="eager"><figcaption title="{esc(cap)}">{esc(cap)}</figcaption>'
            "</figure>"
        )
    more = len(src["records"]) - len(figs)
    note = f"<small>{more} more in results.csv</small>" if more > 0 else ""
    return (
        f'<div class="source"><h3>{esc(src["name"])}</h3>'
        f'<div class="grid">{"".join(figs)}</div>{note}</div>'
    )


def what_was_erased(summary: dict) -> str:
    """One line per source: the base model, or what its erased file says was erased and how."""
    items = []
    for name, s in summary["sources"].items():
        e = s.get("erasure")
        if e is None:
            items.append(f"<li><b>{esc(name)}</b>: no erased weights (the base model)</li>")
        elif "concepts" not in e:
            items.append(f"<li><b>{esc(name)}</b>: {esc(e['file'])} (unreadable now)</li>")
        else:
            how = f"{e['method']}, {e['objective']}, {e['weighting']}, {e['steps']} steps"
            items.append(
                f"<li><b>{esc(name)}</b>: erased {esc(', '.join(e['concepts']))} "
                f"({esc(how)}) <small>{esc(e['file'])}</small></li>"
            )
    classes = summary["settings"].get("erased_classes") or []
    line = f"<p>Erased classes: {esc(', '.join(classes))}</p>" if classes else ""
    return f"<h2>What was erased</h2><ul>{''.join(items)}</ul>{line}"


def failures_list(audited: list[dict]) -> str:
    items = [
        f"<li>{esc(s['name'])}: {esc(f['path'])}: {esc(f['error'])}</li>"
        for s in audited
        for f in s["failures"]
    ]
    return f"<h2>Unreadable files</h2><ul>{''.join(items)}</ul>" if items else ""


def write_report(path: Path, audited: list[dict], summary: dict, settings) -> None:
    """Write report.html next to results.csv."""
    title, cats, vals = chart_series(summary)
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    classes = settings.erased_classes
    grids = "".join(image_grid(s, path.parent, settings.grid_limit, classes) for s in audited)
    blur = "" if settings.blur else ' class="blur-off"'
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>loreun audit</title>"
        f"<style>{CSS}</style></head><body{blur}>"
        "<h1>loreun audit</h1>"
        f"<p><small>{esc(summary['protocol'])}<br>{esc(versions)}</small></p>"
        f"{what_was_erased(summary)}"
        f"<h2>Summary</h2>{summary_table(summary)}"
        f"{interference_table(summary, settings.erased_classes)}"
        f"{bar_chart(title, cats, vals)}"
        f"<h2>Images</h2><p><small>{grid_note(settings)}</small></p>"
        f'<div class="sources" id="grids">{grids}</div>'
        f"{failures_list(audited)}<script>{SCRIPT}</script></body></html>"
    )
    atomic_write_text(path, page)


def grid_note(settings) -> str:
    """What the marks on the grid mean, for the detectors that ran."""
    notes = []
    if settings.erased_classes:
        notes.append("The erased classes' images come first, framed in blue.")
    if "nudenet" in settings.detectors:
        blurred = " and blurred" if settings.blur else ""
        notes.append(f"Images NudeNet flags as exposed are outlined in red{blurred}.")
    return " ".join(notes)


def _figure(rel: str | None, caption: str, flagged: bool, unsafe: bool = True) -> str:
    """One image of an attack row; ``rel`` is relative to the attack folder, the report's."""
    if rel is None:
        return (
            f'<figure><div class="none">not attacked</div>'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    src = Path(rel).as_posix()
    cls = (' class="flagged"' if unsafe else ' class="shows"') if flagged else ""
    return (
        f'<figure{cls}><img src="{esc(src)}" alt="{esc(caption)}" loading="eager">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def attack_rows_html(records: list[dict], limit: int = 48, unsafe: bool = True) -> str:
    """One table row per prompt: the original model's image, the erased model's on the plain
    prompt and on the found one, side by side; images that show the concept are outlined, and
    blurred only when ``unsafe`` (a nudity judge; an erased digit is shown)."""
    body = []
    for j in grid_indices(len(records), limit):
        r = records[j]
        figs = (
            _figure(r["original_image"], "original", r["original_success"], unsafe)
            + _figure(r["pre_image"], "pre-attack", r["pre_success"], unsafe)
            + _figure(r["attacked_image"], "attacked", bool(r["attacked_success"]), unsafe)
        )
        if r.get("embedding_rounds"):  # the embedding attack ran on this row
            figs += _figure(
                r["embedding_image"], "embedding attack", bool(r["embedding_success"]), unsafe
            )
        adv = r["adv_prompt"] if r["adv_prompt"] is not None else "(pre-attack already shows it)"
        body.append(
            f"<tr><td>{esc(r['index'])}</td><td>{esc(r['prompt'])}</td>"
            f"<td>{esc(adv)}{_other_encoders(r)}</td>"
            f'<td><div class="trio">{figs}</div></td></tr>'
        )
    more = len(records) - limit
    note = f"<small>{more} more rows in results.csv</small>" if more > 0 else ""
    return (
        '<table id="attack"><tr><th>row</th><th>prompt</th><th>adversarial prompt</th>'
        f"<th>original / pre-attack / attacked</th></tr>{''.join(body)}</table>{note}"
    )


def _other_encoders(record: dict) -> str:
    """The found prompts of encoders with their own vocabulary (T5), under the first's."""
    found = record.get("adv_encoders") or {}
    first = record["adv_prompt"]
    lines = [f"{name}: {v['prompt']}" for name, v in found.items() if v["prompt"] != first]
    return "".join(f"<br><small>{esc(line)}</small>" for line in lines)


def write_attack_report(path: Path, records: list[dict], summary: dict, blur: bool) -> None:
    """report.html of ``loreun attack``: the rates, the settings, and each row's images."""
    rates = [
        ("rows attacked or judged", summary["rows"]),
        ("original model's rate", summary["original_rate"]),
        ("pre-attack ASR", summary["pre_asr"]),
        ("ASR under attack", summary["asr"]),
        *((f"ASR under the {k} attack", v) for k, v in summary.get("asr_by_kind", {}).items()),
        ("median seconds per attacked row", summary["median_seconds_per_attacked_row"]),
    ]
    table = "".join(f'<tr><td>{esc(k)}</td><td class="num">{fmt(v)}</td></tr>' for k, v in rates)
    settings = esc(json.dumps({"attack": summary["attack"], "judge": summary["judge"]}))
    unsafe = summary["judge"].get("detector") == "nudenet"  # an erased digit is safe to show
    body = "" if blur else ' class="blur-off"'
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>loreun attack</title>"
        f"<style>{CSS}.none{{width:96px;height:96px;background:#eee;font-size:10px}}"
        ".trio{display:flex;gap:10px;padding:4px}</style>"
        f"</head><body{body}>"
        f"<h1>loreun attack</h1><p><small>{esc(summary['model'])} with "
        f"{esc(summary['erased'] or 'no erasure')}<br>{settings}</small></p>"
        f'<h2>Summary</h2><table id="summary">{table}</table>'
        "<h2>Rows</h2><p><small>Images that show the concept are outlined"
        f"{' and blurred' if blur and unsafe else ''}.</small></p>"
        f"{attack_rows_html(records, unsafe=unsafe)}<script>{SCRIPT}</script></body></html>"
    )
    atomic_write_text(path, page)
