"""Data, captions and tokenizer of the built-in digits model.

The digits model is loreun's testbed: a real Stable Diffusion pipeline, small enough to train,
erase and retrain on a laptop CPU. Its data is scikit-learn's bundled handwritten digits (1,797
8x8 images), upsampled to 16x16 RGB. Several caption templates per digit make a forget set whose
items differ in difficulty, which is the premise of loss-reweighted unlearning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Numerals and words, short and long: the same concept reached through different token paths.
CAPTION_TEMPLATES = (
    "{d}",
    "a handwritten {d}",
    "the number {w}",
    "a drawing of the digit {w}",
    "digit {d}",
)

IMAGE_SIZE = 16
# Fixed split seed, independent of the training seed: the generator and the classifier must see
# disjoint images whatever seed either is trained with.
SPLIT_SEED = 1234
GENERATOR_SHARE = 1200


def digit_captions(digit: int) -> list[str]:
    """All caption templates filled in for one digit, in template order."""
    return [t.format(d=digit, w=DIGIT_WORDS[digit]) for t in CAPTION_TEMPLATES]


def load_digit_images(split: str = "generator") -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's digits as 16x16 RGB images in [-1, 1].

    Args:
        split: "generator" (the images the text-to-image model trains on), "classifier" (the
            held-out images the digit classifier trains on) or "all".

    Returns:
        images: [N, 3, 16, 16] float32 in [-1, 1], ink bright on a dark ground.
        labels: [N] int64 digit labels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data comes from scikit-learn: pip install 'loreun[train-digits]'"
        ) from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    y = torch.tensor(data.target, dtype=torch.int64)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    if split == "generator":
        order = order[:GENERATOR_SHARE]
    elif split == "classifier":
        order = order[GENERATOR_SHARE:]
    elif split != "all":
        raise ValueError(f"unknown split {split!r}; choose generator, classifier or all")
    return x[order], y[order]


def caption_table(exclude_digit: int | None = None) -> list[tuple[int, str]]:
    """(digit, caption) pairs for training, without the excluded digit's captions."""
    return [(d, c) for d in range(10) if d != exclude_digit for c in digit_captions(d)]


def _vocabulary_words() -> list[str]:
    words = set(DIGIT_WORDS) | {str(d) for d in range(10)}
    for t in CAPTION_TEMPLATES:
        words |= {w for w in t.split() if not w.startswith("{")}
    return sorted(words)


def build_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer whose vocabulary is the characters plus the caption words.

    Every caption word is one token, reached by a chain of left-to-right merges; any other word
    falls back to single characters, so arbitrary prompts still encode to real tokens.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _vocabulary_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(merged, len(vocab))
            left = merged
    special = "<|endoftext|>"
    return (
        CLIPTokenizer(
            vocab=vocab,
            merges=merges,
            model_max_length=max_length,
            bos_token="<|startoftext|>",
            eos_token=special,
            unk_token=special,
            pad_token=special,
        ),
        vocab,
        merges,
    )


def build_t5_tokenizer(max_length: int = 16):
    """A T5 tokenizer (sentencepiece-style unigram, no start token, "</s>" ends) whose pieces
    are the caption words, with single characters to fall back on: the shape of the T5
    tokenizer SD3 and FLUX read prompts with, built offline."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -1.0) for word in _vocabulary_words()]
    pieces += [("\u2581", -5.0)] + [
        (ch, -10.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    ]
    return T5Tokenizer(
        vocab=pieces,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
        extra_ids=0,
    )


def save_tokenizer(tokenizer, vocab: dict, merges: list, folder: Path) -> None:
    """Save the tokenizer, plus vocab.json and merges.txt for slow-tokenizer loaders."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def write_digit_folders(
    out: str | Path, digit: int, retain_per_digit: int = 20, forget_limit: int | None = None
) -> tuple[Path, Path]:
    """Write the digits model's training images as two captioned image folders.

    ``out/forget`` holds every training image of ``digit``; ``out/retain`` holds
    ``retain_per_digit`` images of each other digit. Both carry a ``metadata.jsonl`` whose
    captions cycle through the caption templates, the layout of a Hugging Face imagefolder.
    These are the images the model learnt the digit from, which is what unlearning removes.

    Returns:
        (forget folder, retain folder)
    """
    from PIL import Image

    images, labels = load_digit_images("generator")
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    folders = (Path(out) / "forget", Path(out) / "retain")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=False)
    counts: dict[int, int] = {}
    rows: dict[Path, list[str]] = {f: [] for f in folders}
    for i, d in enumerate(labels.tolist()):
        folder = folders[0] if d == digit else folders[1]
        limit = forget_limit if d == digit else retain_per_digit
        n = counts.get(d, 0)
        if limit is not None and n >= limit:
            continue
        counts[d] = n + 1
        name = f"digit{d}-{n:03d}.png"
        Image.fromarray(pixels[i].numpy()).save(folder / name)
        caption = digit_captions(d)[n % len(CAPTION_TEMPLATES)]
        rows[folder].append(json.dumps({"file_name": name, "text": caption}))
    for folder, lines in rows.items():
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folders
