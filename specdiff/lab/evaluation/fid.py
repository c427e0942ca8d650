"""FID from an Inception-v3 the user already has (never downloaded).

The network is the TorchScript translation of TensorFlow's
inception-2015-12-05 that StyleGAN2-ADA, EDM and clean-fid publish as
`inception-2015-12-05.pt`: called as `net(images, return_features=True)`
on uint8 images (N, 3, H, W), it resizes inside and returns (N, 2048)
pool features. FID is the Fréchet distance between two such feature sets,
against the user's real images (`--fid-reference`) or, without them,
against the full-compute images of the same prompts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from specdiff.lab.evaluation.metrics import QualityModelMissing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class InceptionFeatures:
    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise QualityModelMissing(
                f"--fid-inception {path!r}: no such file. Pass a local copy of the TorchScript Inception "
                f"'inception-2015-12-05.pt' (StyleGAN2-ADA / EDM / clean-fid); specdiff never downloads"
            )
        try:
            with warnings.catch_warnings():  # the published network is TorchScript: torch.jit is the way to load it
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(file), map_location=device).eval()
        except (RuntimeError, ValueError) as error:
            raise QualityModelMissing(f"--fid-inception {path!r}: not a TorchScript file ({error.__class__.__name__})") from None
        self.device = device

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """(N, d) features of images (N, 3, H, W) in [0, 1]."""
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            pixels = (images[start : start + batch_size].clamp(0, 1) * 255).round().to(torch.uint8)
            out = self.model(pixels.to(self.device), return_features=True)
            chunks.append(out.float().reshape(pixels.shape[0], -1).cpu().numpy())
        return np.concatenate(chunks)


def folder_features(extractor: InceptionFeatures, folder: str) -> np.ndarray:
    """Features of every image in a folder (sorted by name), one image at a time (sizes may differ)."""
    from PIL import Image

    root = Path(folder).expanduser()
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if len(files) < 2:
        raise QualityModelMissing(f"--fid-reference {folder!r}: needs a folder with at least 2 images "
                                  f"({', '.join(IMAGE_SUFFIXES)}); found {len(files)}")
    rows = []
    for file in files:
        array = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0
        rows.append(extractor.features(torch.from_numpy(array).permute(2, 0, 1)[None]))
    return np.concatenate(rows)
