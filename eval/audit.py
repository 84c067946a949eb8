"""Audit generated images: run detectors over one or more image sets, write the report.

Sources are generation folders (their ``manifest.jsonl`` gives each image's prompt, class and
seed) or plain folders of images. Several sources, e.g. the original and the erased model on the
same prompt file, are audited side by side.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .nudity import DEFAULT_THRESHOLD, check_threshold
from .sources import open_images, read_source

OUTPUTS = ("results.csv", "summary.json", "report.html")
PROTOCOL = (
    "loreun audit protocol v1: NudeNet 320n, 9 exposed classes, nude if any > threshold;"
    " classifier top-1/top-5 by class name; CLIP score 100*max(cos,0);"
    " FID and KID by torchmetrics on the named features against --reference"
)


@dataclass
class AuditSettings:
    """Which detectors to run and with what."""

    detectors: list[str] = field(
        default_factory=lambda: ["nudenet"],
        metadata={
            "help": "nudenet (default), classifier, digits, clip or fid; repeat for several "
            "(the attack judges with one of nudenet, classifier, digits)",
            "flag": "--detector",
        },
    )
    nudity_threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": "NudeNet score above which an exposed class counts"},
    )
    classifier: str | None = field(
        default=None, metadata={"help": "image-classification model folder or hub id"}
    )
    clip_model: str | None = field(
        default=None, metadata={"help": "CLIP model folder or hub id for the clip detector"}
    )
    erased_classes: list[str] = field(
        default_factory=list,
        metadata={
            "help": "prompt class that was erased (classifier accuracy is split by it)",
            "flag": "--erased-class",
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "images the fid detector compares against (evaluate: the original model's)"
        },
    )
    fid_features: str = field(
        default="inception",
        metadata={
            "help": "fid features: inception (needs loreun[fid]), digits, or an image-classifier "
            "folder (its penultimate layer)"
        },
    )
    batch_size: int = field(default=16, metadata={"flag": None})  # images per detector call
    blur: bool = field(
        default=True, metadata={"help": "show flagged images unblurred", "flag": "--no-blur"}
    )
    grid_limit: int = field(default=48, metadata={"help": "images per source in the grid"})

    def __post_init__(self):
        if self.grid_limit < 1:
            raise ValueError(f"--grid-limit: must be >= 1, got {self.grid_limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        check_threshold(self.nudity_threshold)


class Detector(Protocol):
    """The detector slot's contract (docs/architecture.md).

    ``__call__`` scores decoded images (PIL, RGB) with their manifest records, one result dict
    per image; ``flagged`` says whether a result marks its image (blurred in the report);
    ``summarize`` returns the source's summary, whose optional ``rows`` ([label, value] pairs)
    and ``chart`` ({"title", "values"}) the report shows as they are.
    """

    name: str

    def __call__(self, images: list, records: list[dict]) -> list[dict]: ...

    def flagged(self, result: dict) -> bool: ...

    def summarize(self, results: list[dict], records: list[dict]) -> dict: ...


def build_detectors(settings: AuditSettings) -> list[Detector]:
    """The detector slot: a literal table of names. ``digits`` is the built-in classifier."""
    from .classify import ClipScorer, ImageClassifier
    from .nudity import NudeNetDetector

    def classifier(model, name="classifier"):
        if not model:
            raise ValueError("--classifier: the classifier detector needs a model folder or id")
        return ImageClassifier(model, settings.batch_size, settings.erased_classes, name=name)

    def clip():
        if not settings.clip_model:
            raise ValueError("--clip-model: the clip detector needs a CLIP model folder or id")
        return ClipScorer(settings.clip_model, settings.batch_size)

    def fid():
        from .fid import FidDetector

        if not settings.reference:
            raise ValueError("--reference: the fid detector needs a reference image folder")
        return FidDetector(settings.reference, settings.fid_features, settings.batch_size)

    table = {
        "nudenet": lambda: NudeNetDetector(settings.nudity_threshold, settings.batch_size),
        "classifier": lambda: classifier(settings.classifier),
        "digits": lambda: classifier("digits", "digits"),
        "clip": clip,
        "fid": fid,
    }
    unknown = [d for d in settings.detectors if d not in table]
    if unknown:
        raise ValueError(
            f"--detector: unknown detector {unknown[0]!r}; choose from {', '.join(table)}"
        )
    return [table[d]() for d in settings.detectors]


def audit_source(name: str, path, detectors: list, settings: AuditSettings) -> dict:
    """Run every detector over one source; returns its rows, summaries and failures."""
    from tqdm.auto import tqdm

    from loreun.pipelines.meta import quiet

    records = read_source(path)
    rows, summaries, failures = [], {}, []
    results: dict[str, list] = {d.name: [] for d in detectors}
    chunk = max(settings.batch_size * 4, 64)  # bounded memory on large prompt sets
    bar = tqdm(total=len(records), desc=f"audit {name}", disable=quiet())
    for i in range(0, len(records), chunk):
        images, good, bad = open_images(records[i : i + chunk])
        failures += bad
        for det in detectors:
            results[det.name] += det(images, good)
        rows += good
        bar.update(len(good) + len(bad))
    bar.close()
    for det in detectors:
        summaries[det.name] = det.summarize(results[det.name], rows)
    flagged = [
        any(det.flagged(results[det.name][j]) for det in detectors) for j in range(len(rows))
    ]
    return {
        "name": name,
        "path": str(path),
        "records": rows,
        "results": results,
        "flagged": flagged,
        "summaries": summaries,
        "failures": failures,
    }


def audit(
    sources: dict[str, str | Path],
    out: str | Path,
    settings: AuditSettings | None = None,
    overwrite: bool = False,
) -> dict:
    """Audit each named source and write results.csv, summary.json and report.html to ``out``.

    Args:
        sources: display name -> generation folder or image folder, e.g.
            {"original": "runs/gen-base", "erased": "runs/gen-erased"}.

    Returns:
        The summary written to summary.json.
    """
    from loreun.pipelines.files import check_apart, check_writable

    from .report import write_report

    settings = settings or AuditSettings()
    out = Path(out)
    check_apart(out, {f"--images {name}": path for name, path in sources.items()}, may_hold=True)
    _claim(out, overwrite)
    check_writable(out)  # a read-only --out fails now, not after every image is scored
    detectors = build_detectors(settings)
    audited = [audit_source(name, path, detectors, settings) for name, path in sources.items()]
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(out / "results.csv", audited, detectors)
    summary = build_summary(audited, settings)
    from loreun.pipelines.files import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_report(out / "report.html", audited, summary, settings)
    return summary


def _claim(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"--out: {out} already holds another audit ({existing[0]}); "
            "choose another folder or pass --overwrite"
        )


def _flat(det_name: str, result: dict) -> dict:
    cols = {}
    for k, v in result.items():
        if isinstance(v, (list, dict)):
            v = json.dumps(v) if k == "detections" else ";".join(map(str, v))
        cols[f"{det_name}_{k}"] = v
    return cols


def write_results_csv(path: Path, audited: list[dict], detectors: list) -> None:
    """One row per image and source, with the prompt fields and every detector's columns."""
    keys = ("path", "id", "prompt", "class", "seed", "guidance", "width", "height")
    rows = []
    for src in audited:
        for j, rec in enumerate(src["records"]):
            row = {
                "source": src["name"],
                **{k: rec.get(k) for k in keys},
                "flagged": src["flagged"][j],
            }
            for det in detectors:
                row.update(_flat(det.name, src["results"][det.name][j]))
            rows.append(row)
        for fail in src["failures"]:
            rows.append({"source": src["name"], "path": fail["path"], "error": fail["error"]})
    write_csv(path, rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV, columns in first-seen order, text made spreadsheet-safe."""
    from loreun.pipelines.files import atomic_write_text

    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    atomic_write_text(path, buf.getvalue())


def spreadsheet_safe(value):
    """Text that a spreadsheet would run as a formula (``=cmd|...``) gets a leading quote.

    Prompt files come from anywhere, and results.csv is opened in spreadsheets; numbers are
    left alone, so ``-0.5`` stays a number.
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def erasure_of(records: list[dict]) -> dict | None:
    """What was erased from the model that made a source's images, from the header of the
    erased file its manifest names (None: the base model, or images without a manifest)."""
    path = next((r.get("erased") for r in records if r.get("erased")), None)
    if not path:
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("loreun", "{}"))
    except (SafetensorError, OSError, ValueError):
        return {"file": str(path)}  # moved or unreadable since: the report says which file
    hp = meta.get("hyperparameters", {}) if isinstance(meta, dict) else {}
    return {
        "file": str(path),
        # the bytes the images were made with (generate's manifest): what export --audit checks
        "sha256": next((r.get("erased_sha256") for r in records if r.get("erased_sha256")), None),
        "concepts": meta.get("concepts") or [hp.get("forget_caption") or "images"],
        "method": meta.get("method"),
        "objective": meta.get("objective"),
        "weighting": meta.get("weighting"),
        "steps": meta.get("steps_done"),
    }


def build_summary(audited: list[dict], settings: AuditSettings) -> dict:
    from dataclasses import asdict

    from loreun.pipelines.meta import package_version

    return {
        "protocol": PROTOCOL,
        "settings": asdict(settings),
        "versions": {p: package_version(p) for p in ("loreun", "nudenet", "transformers", "torch")},
        "sources": {
            s["name"]: {
                "path": s["path"],
                "images": len(s["records"]),
                "unreadable": len(s["failures"]),
                "failures": s["failures"],
                "erasure": erasure_of(s["records"]),
                **s["summaries"],
            }
            for s in audited
        },
    }
