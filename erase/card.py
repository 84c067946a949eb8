"""The model card of an exported pipeline folder, and keeping local paths out of exported files.

A pipeline folder is what people upload and share, so it says what was erased, how, with which
loreun, what an audit measured (when one is given) and what erasure does not promise, in the
Hugging Face model-card format (YAML front matter, then Markdown).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(model: str) -> str | None:
    """``model`` when it names a hub repository (``owner/name``) rather than a local path."""
    if Path(model).expanduser().exists() or not HUB_ID.match(model):
        return None
    return model


def model_name(model: str) -> str:
    """A base model as a card may show it: its hub id, or a local folder's last name only."""
    return hub_id(model) or Path(model.rstrip("/")).name or model


def scrub_local_paths(folder: Path) -> None:
    """Drop ``_name_or_path`` entries that point into this machine from every JSON config.

    diffusers and transformers record where each component was loaded from; in a shared folder
    that is someone's home directory, and a reader cannot use it.
    """
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        value = data.get("_name_or_path") if isinstance(data, dict) else None
        if isinstance(value, str) and hub_id(value) is None and value:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card(meta: dict, audit: dict | None = None) -> str:
    """The README.md of an exported pipeline, from the erased file's header and an audit summary."""
    hp = meta.get("hyperparameters", {})
    concepts = ", ".join(meta.get("concepts") or []) or hp.get("forget_caption") or "images"
    base = model_name(meta.get("base_model", ""))
    front = ["---", "library_name: diffusers"]
    if hub_id(meta.get("base_model", "")):
        front.append(f"base_model: {meta['base_model']}")
    front += ["tags:", "- loreun", "- concept-erasure", "- machine-unlearning"]
    front += ["- stable-diffusion", "- text-to-image", "---", ""]
    rows = [
        ("erased", concepts),
        ("base model", f"{base} (fingerprint {meta.get('base_fingerprint', '-')})"),
        ("trained modules", meta.get("method")),
        ("objective", meta.get("objective")),
        ("weighting", meta.get("weighting")),
        ("steps", meta.get("steps_done")),
        ("learning rate", hp.get("lr")),
        ("batch size", f"{hp.get('batch_size')} x {meta.get('world_size', 1)} processes"),
        ("seed", hp.get("seed")),
    ]
    if hp.get("lora_rank"):
        rows.append(
            ("LoRA rank / alpha", f"{hp['lora_rank']} / {hp.get('lora_alpha') or hp['lora_rank']}")
        )
    versions = meta.get("versions", {})
    body = [
        f"# {base} with {concepts} erased",
        "",
        f"Made with loreun {versions.get('loreun', '?')} (diffusers "
        f"{versions.get('diffusers', '?')}, torch {versions.get('torch', '?')}). The erasure"
        " fine-tuned the UNet only; the text encoder, VAE and scheduler are the base model's.",
        "",
        "## How it was erased",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Audit",
        "",
        *audit_lines(audit),
        "",
        "## Intended use and limits",
        "",
        "- For research on concept erasure, and for generation where the erased concept is",
        "  unwanted.",
        "- Erasure lowers how often the concept appears for ordinary prompts; it does not make it",
        "  impossible. Adversarial prompts (for example UnlearnDiffAtk's) recover erased concepts",
        "  from many published erasures. Audit before relying on it.",
        "- Concepts close to the erased one, and image quality in general, can change too; compare",
        "  with the base model on the prompts you care about.",
        "- The base model's license and limits apply to this model.",
    ]
    return "\n".join(front + body) + "\n"


def audit_lines(audit: dict | None) -> list[str]:
    """One table row per audited source and headline number, or a line saying there is none."""
    if not audit:
        return [
            "No audit was given at export (`loreun export --audit DIR`, from `loreun evaluate`)."
        ]
    lines = ["| source | measure | value |", "|---|---|---|"]
    for source, per in audit.get("sources", {}).items():
        for detector, summary in per.items():
            if not isinstance(summary, dict):
                continue
            for label, value in summary.get("rows", []):
                shown = f"{value:.4g}" if isinstance(value, float) else value
                lines.append(f"| {source} | {detector}: {label} | {shown} |")
    protocol = audit.get("protocol")
    return lines + ([f"\nProtocol: {protocol}."] if protocol else [])
