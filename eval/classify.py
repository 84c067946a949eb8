"""Object audit with any transformers image-classification model, and CLIP score.

A prompt row's class (``class``/``label_str``/``concept``) is matched to the model's labels by
name (ImageNet-style ``"tench, Tinca tinca"`` labels match any of their names); the Imagenette
classes also map by their ImageNet index. Top-1 and top-5 accuracy are reported per class and
for the erased classes against the rest.
"""

from __future__ import annotations

import torch

# ImageNet-1k indices of the ten Imagenette classes.
IMAGENETTE_IMAGENET_IDS = {
    "tench": 0,
    "english springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "french horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}


def _load(kind: str, model: str, loader):
    from loreun.pipelines.models import BUILTIN_CLASSIFIERS

    ref = str(BUILTIN_CLASSIFIERS.get(model, model))
    try:
        return loader(ref)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--{kind}: {model} is not a loadable {kind} model ({first})") from e


def label_index(cls: str | None, id2label: dict[int, str]) -> int | None:
    """The model's label id for a prompt class, or None when it has none."""
    if cls is None:
        return None
    want = cls.strip().lower()
    for i, label in id2label.items():
        if want in {name.strip().lower() for name in str(label).split(",")}:
            return int(i)
    if len(id2label) == 1000 and want in IMAGENETTE_IMAGENET_IDS:
        return IMAGENETTE_IMAGENET_IDS[want]
    return None


class ImageClassifier:
    """Top-k predictions of a transformers image classifier, built once, run in batches."""

    name = "classifier"

    def __init__(
        self,
        model: str,
        batch_size: int = 32,
        erased_classes=(),
        device="cpu",
        name: str = "classifier",
    ):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.name = name
        self.model_id = model
        self.model = (
            _load("classifier", model, AutoModelForImageClassification.from_pretrained)
            .eval()
            .to(device)
        )
        self.processor = _load("classifier", model, AutoImageProcessor.from_pretrained)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.batch_size = batch_size
        self.erased = {c.strip().lower() for c in erased_classes}
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list, records: list[dict]) -> list[dict]:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            logits = self.model(pixel_values=pixels.to(self.device)).logits
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu().tolist()
            for rec, ids in zip(records[i : i + self.batch_size], top):
                want = label_index(rec.get("class"), self.id2label)
                out.append(
                    {
                        "top1": self.id2label[ids[0]],
                        "top5": [self.id2label[j] for j in ids],
                        "label": None if want is None else self.id2label[want],
                        "top1_correct": None if want is None else ids[0] == want,
                        "top5_correct": None if want is None else want in ids,
                    }
                )
        return out

    def flagged(self, result: dict) -> bool:
        return False

    def summarize(self, results: list[dict], records: list[dict]) -> dict:
        per_class: dict[str, dict] = {}
        for res, rec in zip(results, records):
            if res["top1_correct"] is None:
                continue
            c = per_class.setdefault(rec["class"], {"images": 0, "top1": 0, "top5": 0})
            c["images"] += 1
            c["top1"] += res["top1_correct"]
            c["top5"] += res["top5_correct"]
        for c in per_class.values():
            c["top1"], c["top5"] = c["top1"] / c["images"], c["top5"] / c["images"]
        summary = {
            "model": self.model_id,
            "per_class": per_class,
            "unscored_images": sum(r["top1_correct"] is None for r in results),
        }
        for name, members in (
            ("erased", [c for c in per_class if c.lower() in self.erased]),
            ("other", [c for c in per_class if c.lower() not in self.erased]),
        ):
            if members:
                summary[f"{name}_top1"] = sum(per_class[c]["top1"] for c in members) / len(members)
                summary[f"{name}_top5"] = sum(per_class[c]["top5"] for c in members) / len(members)
        keys = [
            k for k in ("erased_top1", "erased_top5", "other_top1", "other_top5") if k in summary
        ]
        summary["rows"] = [[f"{self.name} {k.replace('_', ' ')}", summary[k]] for k in keys]
        erased = sorted(c for c in per_class if c.lower() in self.erased)
        if len(erased) > 1:  # the pooled figure hides a class that survived erasure
            summary["rows"] += [
                [f"{self.name} top1 class {c}", per_class[c]["top1"]] for c in erased
            ]
        summary["chart"] = {
            "title": f"{self.name}: top-1 accuracy per class",
            "values": {c: v["top1"] for c, v in per_class.items()},
        }
        return summary


class ClipScorer:
    """CLIP score: 100 * max(cos(image, prompt), 0), averaged (docs/design-notes.md)."""

    name = "clip"

    def __init__(self, model: str, batch_size: int = 32, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = model
        self.model = _load("clip-model", model, CLIPModel.from_pretrained).eval().to(device)
        self.processor = _load("clip-model", model, CLIPProcessor.from_pretrained)
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list, records: list[dict]) -> list[dict]:
        out = []
        for i in range(0, len(images), self.batch_size):
            ims = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            texts = [rec.get("prompt") or "" for rec in records[i : i + self.batch_size]]
            inp = self.processor(
                text=texts, images=ims, return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            img = _features(self.model.get_image_features(pixel_values=inp["pixel_values"]))
            txt = _features(
                self.model.get_text_features(
                    input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]
                )
            )
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            out += [{"clip_score": round(100 * max(c, 0.0), 4)} for c in cos.tolist()]
        return out

    def flagged(self, result: dict) -> bool:
        return False

    def summarize(self, results: list[dict], records: list[dict]) -> dict:
        scores = [r["clip_score"] for r in results]
        mean = sum(scores) / len(scores) if scores else 0.0
        return {"model": self.model_id, "clip_score": mean, "rows": [["CLIP score", mean]]}


def _features(output) -> torch.Tensor:
    """transformers 5 returns an output object where 4.x returned a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]
