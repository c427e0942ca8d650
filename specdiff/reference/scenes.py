"""Procedural captioned scenes: the embedded model's training data.

A scene is a background colour plus one or two objects, each with a colour,
shape, size and a cell of a 3 x 3 grid. Rendering is anti-aliased by 4x
supersampling. Everything is deterministic from a seed.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# Named colours with fixed RGB values (0-255).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "ring")
# Size name -> object extent in pixels on the 32 px canvas.
SIZES: dict[str, float] = {"small": 10.0, "large": 16.0}
SIZE_NAMES = tuple(SIZES)
# Row-major 3 x 3 grid; cell centres in pixels (inset so large objects fit).
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
CELL_CENTRES = (7.5, 16.0, 24.5)

# (colour, shape) pairs never shown in training; evaluation prompts use them.
HELD_OUT_PAIRS = frozenset({
    ("purple", "triangle"), ("orange", "circle"), ("green", "ring"), ("blue", "square"),
})


@dataclasses.dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str

    def phrase(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background"


def _cell(position: str) -> tuple[int, int]:
    index = POSITIONS.index(position)
    return divmod(index, 3)


_NON_ADJACENT_PAIRS = tuple(
    (a, b)
    for i, a in enumerate(POSITIONS)
    for b in POSITIONS[i + 1 :]
    if max(abs(divmod(i, 3)[0] - divmod(POSITIONS.index(b), 3)[0]), abs(i % 3 - POSITIONS.index(b) % 3)) >= 2
)


def sample_scene(rng: random.Random, split: str = "train", two_object_prob: float = 0.4) -> Scene:
    """Draw a scene. split='train' avoids HELD_OUT_PAIRS; 'heldout' uses one in every scene."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    background = rng.choice(COLOURS)
    if rng.random() < two_object_prob:
        # Objects sit in non-adjacent cells so they never overlap.
        cells = list(rng.choice(_NON_ADJACENT_PAIRS))
        rng.shuffle(cells)
    else:
        cells = [rng.choice(POSITIONS)]
    objects: list[SceneObject] = []
    while len(objects) < len(cells):
        colour = rng.choice([c for c in COLOURS if c != background])
        shape = rng.choice(SHAPES)
        held = (colour, shape) in HELD_OUT_PAIRS
        if split == "train" and held:
            continue
        if split == "heldout" and not objects and not held:
            continue
        if any(o.colour == colour and o.shape == shape for o in objects):
            continue
        objects.append(SceneObject(colour, shape, rng.choice(SIZE_NAMES), cells[len(objects)]))
    return Scene(background, tuple(objects))


def _shape_mask(shape: str, cx: float, cy: float, extent: float, grid: np.ndarray) -> np.ndarray:
    ys, xs = grid
    half = extent / 2.0
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "ring":
        r2 = (xs - cx) ** 2 + (ys - cy) ** 2
        return (r2 <= half**2) & (r2 >= (half * 0.55) ** 2)
    if shape == "square":
        h = half * 0.9
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # Upward isoceles triangle inscribed in the extent box.
        top, bottom = cy - half, cy + half
        inside_y = (ys >= top) & (ys <= bottom)
        frac = np.clip((ys - top) / max(extent, 1e-6), 0, 1)
        return inside_y & (np.abs(xs - cx) <= frac * half)
    raise ValueError(f"unknown shape {shape!r}; allowed: {SHAPES}")


def render(scene: Scene, rng: random.Random | None = None, jitter: float = 0.0, with_mask: bool = False):
    """Render a scene to float32 RGB in [0, 1], shape (32, 32, 3).

    jitter (pixels) moves each object's centre uniformly by up to that much,
    for the checker's training set; generation data uses 1 px.
    """
    s = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(s, dtype=np.float32) + 0.5) / SUPERSAMPLE
    grid = np.meshgrid(coords, coords, indexing="ij")
    canvas = np.empty((s, s, 3), dtype=np.float32)
    canvas[:] = np.array(PALETTE[scene.background], dtype=np.float32) / 255.0
    rng = rng or random.Random(0)
    covered = np.zeros((s, s), dtype=bool)
    for obj in scene.objects:
        row, col = _cell(obj.position)
        cx = CELL_CENTRES[col] + rng.uniform(-jitter, jitter)
        cy = CELL_CENTRES[row] + rng.uniform(-jitter, jitter)
        extent = SIZES[obj.size] * rng.uniform(0.95, 1.05)
        mask = _shape_mask(obj.shape, cx, cy, extent, grid)
        canvas[mask] = np.array(PALETTE[obj.colour], dtype=np.float32) / 255.0
        covered |= mask
    image = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if not with_mask:
        return image
    return image, covered.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def make_batch(rng: random.Random, batch_size: int, split: str = "train", jitter: float = 1.0):
    """Return (images (B, 3, 32, 32) in [-1, 1], object masks (B, 32, 32), captions, scenes)."""
    scenes = [sample_scene(rng, split) for _ in range(batch_size)]
    rendered = [render(sc, rng, jitter, with_mask=True) for sc in scenes]
    images = np.stack([r[0] for r in rendered]).transpose(0, 3, 1, 2)
    masks = np.stack([r[1] for r in rendered])
    return images * 2.0 - 1.0, masks, [sc.caption() for sc in scenes], scenes


def held_out_prompts(count: int, seed: int = 1234) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, "heldout") for _ in range(count)]


def training_prompts(count: int, seed: int = 4321) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, "train") for _ in range(count)]
