"""FID and KID of each audited image set against a reference set (torchmetrics' implementations).

FID compares the Gaussian fits of two sets' features; KID the unbiased squared MMD with a cubic
polynomial kernel, which has no small-sample bias and so suits the few hundred images an
erasure audit makes. Both are set metrics: this detector keeps each source's features as its
images are scored and turns them into numbers in ``summarize``.

Features come from Inception-v3 (the FID standard; torchmetrics loads it through torch-fidelity
and downloads its weights on first use) or, offline and for small models, from the penultimate
layer of any transformers image classifier on disk (``digits`` is the built-in one). Numbers
from different extractors are not comparable; the summary names the extractor.
"""

from __future__ import annotations

import warnings

import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class Features(torch.nn.Module):
    """Images [N, 3, S, S] uint8 -> features [N, d] float, with the extractor's name and S.

    FID and KID both call the extractor on every batch; the last batch's features are kept,
    so each batch is run through the network once.
    """

    def __init__(self, net, name: str, size: int, num_features: int):
        super().__init__()
        self.net, self.name, self.size, self.num_features = net, name, size, num_features
        self._last: tuple | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not images:
            with torch.no_grad():
                self._last = (images, self.net(images).float())
        return self._last[1]


class _ClassifierNet(torch.nn.Module):
    """A transformers image classifier's pooled penultimate features."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model.eval(), processor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        out = self.model.base_model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).flatten(1)


def classifier_features(model: str) -> Features:
    """Features from an image-classification model folder or id (``digits``: the built-in)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .classify import _load

    net = _ClassifierNet(
        _load("fid-features", model, AutoModelForImageClassification.from_pretrained),
        _load("fid-features", model, AutoImageProcessor.from_pretrained),
    )
    size = _input_size(net.processor)
    with torch.no_grad():
        dim = net(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[-1]
    return Features(net, f"{model} (penultimate layer)", size, dim)


def _input_size(processor) -> int:
    size = getattr(processor, "size", None) or {}
    if hasattr(size, "to_dict"):
        size = size.to_dict()
    size = dict(size) if not isinstance(size, int) else {"height": size}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def inception_features() -> Features:
    """torchmetrics' Inception-v3 (torch-fidelity's port of the TF FID network), 2048-d."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ValueError(
            "--fid-features inception: needs torch-fidelity (pip install 'loreun[fid]'); or "
            "give a classifier folder, or 'digits' for the built-in model"
        )
    try:
        net = _inception_net()
    except OSError as e:  # URLError is an OSError: offline, or the download was refused
        raise ValueError(
            f"--fid-features inception: could not fetch the Inception weights ({e}); "
            f"download {INCEPTION_URL} and put it at {inception_weights_path()}"
        ) from e
    return Features(net, "inception-v3-compat pool3 (torch-fidelity)", 299, 2048)


def _inception_net():
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])


def inception_weights_path() -> str:
    """Where torch's hub cache looks for the weights before downloading them."""
    import os

    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def build_features(name: str) -> Features:
    return inception_features() if name == "inception" else classifier_features(name)


def to_tensor(images: list, size: int) -> torch.Tensor:
    """PIL images -> [N, 3, size, size] uint8, resized with PIL's bicubic filter (the
    resizing clean-fid recommends over tensor interpolation)."""
    import numpy as np
    from PIL import Image

    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _reference_records(reference) -> list[dict]:
    from .sources import read_source

    try:
        return read_source(reference)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--reference: {str(e).removeprefix('--images: ')}") from e


class FidDetector:
    """The ``fid`` detector: FID and KID of each source against ``reference``.

    Args:
        reference: a generation folder or image folder, read like an audit source.
        features: "inception", "digits", or an image-classifier folder or id.
    """

    name = "fid"

    def __init__(self, reference, features: str = "inception", batch_size: int = 16):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        records = _reference_records(reference)  # a wrong folder fails before any model loads
        self.features = build_features(features)
        self.batch_size = batch_size
        self.fid = FrechetInceptionDistance(feature=self.features, reset_real_features=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "KID keeps all features": a few thousand here
            self.kid = KernelInceptionDistance(
                feature=self.features, subsets=KID_SUBSETS, reset_real_features=False
            )
        self.reference = str(reference)
        self.reference_images = self._add_reference(records)
        self._images = 0

    def _add_reference(self, records: list[dict]) -> int:
        from .sources import open_images

        n = 0
        for i in range(0, len(records), 256):
            images, _, _ = open_images(records[i : i + 256])
            self._update(images, real=True)
            n += len(images)
        if n < 2:
            raise ValueError(f"--reference: {self.reference}: FID and KID need at least 2 images")
        return n

    def _update(self, images: list, real: bool) -> None:
        for i in range(0, len(images), self.batch_size):
            batch = to_tensor(images[i : i + self.batch_size], self.features.size)
            self.fid.update(batch, real=real)
            self.kid.update(batch, real=real)

    def __call__(self, images: list, records: list[dict]) -> list[dict]:
        self._update(images, real=False)
        self._images += len(images)
        return [{} for _ in images]  # set metrics: nothing per image

    def flagged(self, result: dict) -> bool:
        return False

    def summarize(self, results: list[dict], records: list[dict]) -> dict:
        """FID and KID of the images seen since the last summary, then forget them (the
        reference stays) so the next source starts clean."""
        n, self._images = self._images, 0
        summary = {
            "features": self.features.name,
            "reference": self.reference,
            "reference_images": self.reference_images,
            "images": n,
        }
        if n < 2:
            summary.update(fid=None, kid=None, kid_std=None, rows=[["FID", None], ["KID", None]])
        else:
            fid = float(self.fid.compute())
            self.kid.subset_size = min(KID_SUBSET_SIZE, n, self.reference_images)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # KID's subsets are drawn with torch's global generator
                kid, kid_std = (float(v) for v in self.kid.compute())
            summary.update(fid=fid, kid=kid, kid_std=kid_std, rows=[["FID", fid], ["KID", kid]])
        self.fid.reset()
        self.kid.reset()
        return summary
