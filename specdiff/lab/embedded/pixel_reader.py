"""A second, independent scene reader: pixel statistics, no learned weights.

Each pixel gets the palette colour nearest to it, with brightness differences
weighted down (V2's textures shift brightness by up to 0.25); the background
is the most common label on the image border; every connected patch of
another colour large enough to be an object is read as one: its cell from its
centroid, its size from its bounding box, its shape from a hole at its centre
(ring) and how much of its bounding box it fills (square, circle, triangle).
Meant for clean renders — it cross-checks the CNN checker and the scene
generator; on noisy generated images the checker is the reader.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from specdiff.lab.embedded.scenes import (
    CELL_CENTRE_SHARES, COLOURS, PALETTE, POSITIONS, SIZE_SHARES, Scene, SceneObject,
)

_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32) / 255.0
_BRIGHTNESS_WEIGHT = 0.25


def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> (H, W) index of the nearest palette colour."""
    diff = image[:, :, None, :] - _RGB[None, None]  # (H, W, colours, 3)
    shift = diff.mean(-1, keepdims=True)
    distance = ((diff - shift) ** 2).sum(-1) + _BRIGHTNESS_WEIGHT * 3 * shift[..., 0] ** 2
    return distance.argmin(-1)


def read_scene(image: np.ndarray) -> Scene:
    """Read one (H, W, 3) image in [0, 1] (square) back into a scene."""
    size = image.shape[0]
    labels = label_pixels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    small, large = (SIZE_SHARES[n] * size for n in ("small", "large"))
    min_area = 0.25 * small * small  # below a quarter of a small triangle's area: edge blends, not objects
    objects = []
    for colour in range(len(COLOURS)):
        if colour == background:
            continue
        patches, count = ndimage.label(labels == colour)
        for index in range(1, count + 1):
            mask = patches == index
            area = int(mask.sum())
            if area < min_area:
                continue
            # A blend along another object's edge is a thin band: nothing of it survives erosion.
            if size >= 64 and ndimage.binary_erosion(mask, iterations=1).sum() < 0.25 * area:
                continue
            ys, xs = np.nonzero(mask)
            height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
            centre_filled = mask[int(cy), int(cx)]
            fill = area / float(height * width)
            shape = "ring" if not centre_filled else "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
            extent = max(height, width)
            size_name = "large" if extent > (small + large) / 2 else "small"
            row = int(np.abs(np.array(CELL_CENTRE_SHARES) * size - ys.mean()).argmin())
            col = int(np.abs(np.array(CELL_CENTRE_SHARES) * size - xs.mean()).argmin())
            objects.append(SceneObject(COLOURS[colour], shape, size_name, POSITIONS[row * 3 + col]))
    return Scene(COLOURS[background], tuple(objects))
