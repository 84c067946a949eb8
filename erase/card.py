"""The model card of an exported pipeline folder, and keeping local paths out of exported files.

A pipeline folder is what people upload and share, so it says what was erased, how, with which
loreun, what an audit measured (when one is given) and what erasure does not promise, in the
Hugging Face model-card format (YAML front matter, then Markdown).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(model: str) -> str | None:
    """The hub repository (``owner/name``) that ``model`` names or was downloaded from.

    A hub id is itself; a local folder is one when it is a snapshot in the Hugging Face cache
    (``models--owner--name/snapshots/REV``) or a git clone of a hub repository. Any other local
    path has none.
    """
    path = Path(model).expanduser()
    if not path.exists():
        return model if HUB_ID.match(model) else None
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            owner, _, name = part[len("models--") :].partition("--")
            return f"{owner}/{name}" if owner and name else None
    return _git_remote_id(path)


def _git_remote_id(folder: Path) -> str | None:
    """``owner/name`` of a folder cloned from huggingface.co (``git clone`` of a model repo)."""
    config = folder / ".git" / "config"
    if not config.is_file():
        return None
    found = HUB_REMOTE.search(config.read_text(encoding="utf-8", errors="replace"))
    return found.group(1) if found else None


HUB_REMOTE = re.compile(
    r"url\s*=\s*https://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:\.git)?\s"
)


def model_name(model: str) -> str:
    """A base model as a shared file may show it: its hub id, or a local folder's last name."""
    return hub_id(model) or Path(model.rstrip("/")).name or model


def base_license(model: str) -> str | None:
    """The ``license`` of a local base folder's own model card (its README.md front matter)."""
    card = Path(model).expanduser() / CARD
    if not card.is_file():
        return None
    data = front_matter(card.read_text(encoding="utf-8", errors="replace"))
    value = data.get("license")
    return value if isinstance(value, str) and value else None


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card as a dict ({} when it has none or is not YAML)."""
    import yaml

    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# EraseConfig fields that hold local paths: a shared file keeps only their last names.
PATH_FIELDS = (
    "out",
    "model_config",
    "concepts_file",
    "forget_images",
    "retain_images",
    "saliency_mask",
    "resume",
)


def shareable_settings(settings: dict) -> dict:
    """An erase config (``dataclasses.asdict``) as a shared file may hold it: the base model by
    its hub id or name, every other path by its last name."""
    out = dict(settings)
    out["model"] = model_name(str(out["model"]))
    for name in PATH_FIELDS:
        if out.get(name) is not None:
            out[name] = Path(str(out[name]).rstrip("/")).name
    return out


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


TAGS = ["loreun", "concept-erasure", "machine-unlearning", "stable-diffusion", "text-to-image"]


def card_front(meta: dict, base_id: str | None, license: str | None, lora: bool = False) -> str:
    """The card's YAML front matter, written by huggingface_hub's ``ModelCardData`` so the hub
    reads it as it writes its own. A base whose license is unknown gives ``license: other``
    (the body says that the base's license applies)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="diffusers",
        base_model=base_id or hub_id(meta.get("base_model", "")),
        license=license or "other",
        pipeline_tag="text-to-image",
        tags=TAGS + (["lora"] if lora else []),
    )
    return f"---\n{data.to_yaml()}\n---\n\n"


def settings_rows(meta: dict) -> list[str]:
    """The "How it was erased" table, from the erased file's header."""
    hp = meta.get("hyperparameters", {})
    rows = [
        ("erased", erased_what(meta)),
        ("base model", f"{base_name(meta)} (fingerprint {meta.get('base_fingerprint', '-')})"),
        ("trained modules", trained_modules(meta)),
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
    if hp.get("quantize_base"):
        q = hp["quantize_base"]
        rows.append(("trained on", f"a {q}-quantized base; the LoRA serves the unquantized one"))
    return ["| setting | value |", "|---|---|", *[f"| {k} | {md(v)} |" for k, v in rows]]


def md(value) -> str:
    """A header or audit value as Markdown text: HTML-escaped (a concept like "<script>" stays
    text in the hub's rendering), with table pipes and line breaks neutralised."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ")


def erased_what(meta: dict) -> str:
    hp = meta.get("hyperparameters", {})
    return ", ".join(meta.get("concepts") or []) or hp.get("forget_caption") or "images"


def base_name(meta: dict) -> str:
    return model_name(meta.get("base_model", ""))


def denoiser_name(meta: dict) -> str:
    """The trained module as the header's family calls it (UNet, transformer)."""
    from loreun.pipelines.family import FAMILIES

    family = FAMILIES.get(meta.get("family", "StableDiffusionPipeline"))
    return family.denoiser_name if family else "denoiser"


def trained_modules(meta: dict) -> str:
    """The "trained modules" cell: the denoiser's preset, the text encoders' part, or both."""
    hp = meta.get("hyperparameters", {})
    train = hp.get("train", "denoiser")
    text = f"text encoders: {hp.get('text_encoder_part', 'all')}, layers "
    text += str(hp.get("text_encoder_layers") or "all")
    if train == "text-encoder":
        return text
    return f"{meta.get('method')}; {text}" if train == "both" else str(meta.get("method"))


def what_trained(meta: dict) -> str:
    """The card's sentence on what the erasure changed and what is the base model's."""
    train = meta.get("hyperparameters", {}).get("train", "denoiser")
    name = denoiser_name(meta)
    if train == "text-encoder":
        return (
            f"The erasure fine-tuned the CLIP text encoders only; the {name}, VAE and scheduler "
            "are the base model's."
        )
    if train == "both":
        return (
            f"The erasure fine-tuned the {name} and the CLIP text encoders; the VAE and "
            "scheduler are the base model's."
        )
    return (
        f"The erasure fine-tuned the {name} only; the text encoders, VAE and scheduler are the "
        "base model's."
    )


def made_with(meta: dict) -> str:
    v = meta.get("versions", {})
    if not isinstance(v, dict):
        v = {}
    v = {k: md(v.get(k, "?")) for k in ("loreun", "diffusers", "torch")}  # header text, escaped
    return (
        f"Made with loreun {v.get('loreun', '?')} (diffusers {v.get('diffusers', '?')}, torch "
        f"{v.get('torch', '?')})."
    )


LIMITS = [
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


def model_card(
    meta: dict,
    audit: dict | None = None,
    base_id: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of an exported pipeline, from the erased file's header and an audit summary.

    Args:
        base_id: the base's hub id, where the header's base model does not say it.
        license: the base's license (``base_license``), else ``other``.
    """
    body = [
        f"# {md(base_name(meta))} with {md(erased_what(meta))} erased",
        "",
        f"{made_with(meta)} {what_trained(meta)}",
        "",
        "## How it was erased",
        "",
        *settings_rows(meta),
        "",
        "## Audit",
        "",
        *audit_lines(audit),
        "",
        *LIMITS,
    ]
    return card_front(meta, base_id, license) + "\n".join(body) + "\n"


def web_ui_lines(files: dict[str, str]) -> list[str]:
    """Which file ComfyUI and AUTOMATIC1111 take: the kohya copy where there is one (UNet
    families), else diffusers' own file, whose ``transformer.`` keys ComfyUI reads for FLUX
    and SD3."""
    if "kohya" in files:
        return [
            f"- ComfyUI (LoraLoader) and AUTOMATIC1111: `{files['kohya']}`, the kohya key layout "
            f"they read. ComfyUI does not match the keys of `{files['diffusers']}` for UNet-only "
            "LoRAs."
        ]
    return [
        f"- ComfyUI (LoraLoader): `{files['diffusers']}` itself; ComfyUI reads diffusers' "
        "`transformer.` keys for FLUX and SD3 LoRAs."
    ]


def lora_card(meta: dict, files: dict[str, str], license: str | None = None) -> str:
    """The README.md beside a LoRA erasure's files: which file goes to which tool.

    Args:
        files: "diffusers" and, for the UNet families, "kohya" -> the file names in the folder.
    """
    body = [
        f"# LoRA: {md(erased_what(meta))} erased from {md(base_name(meta))}",
        "",
        made_with(meta),
        "",
        "## Which file to load",
        "",
        f'- diffusers: `pipe.load_lora_weights(folder, weight_name="{files["diffusers"]}")`.',
        *web_ui_lines(files),
        "- `erased.safetensors`: the same erasure merged into full tensors, for "
        "`loreun generate --erased` and `apply_erased_weights`.",
        "",
        "## How it was erased",
        "",
        *settings_rows(meta),
        "",
        *LIMITS,
    ]
    return card_front(meta, None, license, lora=True) + "\n".join(body) + "\n"


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
                lines.append(f"| {md(source)} | {md(detector)}: {md(label)} | {md(shown)} |")
    protocol = audit.get("protocol")
    return lines + ([f"\nProtocol: {md(protocol)}."] if protocol else [])
