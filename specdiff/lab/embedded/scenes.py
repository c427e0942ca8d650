"""Procedural captioned scenes: the embedded model's training data.

A scene is a background colour plus objects, each with a colour, shape, size
and a cell of a 3 x 3 grid. Everything is deterministic from a seed.

Two styles:
- ``V1`` (the first embedded model): 32 px, flat colours, one or two objects,
  1 px jitter; every caption pins its image almost exactly.
- ``V2``: 64 px, one to three objects, and detail the caption leaves open —
  a textured background (gradient, stripes, checks or smooth noise at a random
  scale and angle), shading or a pattern inside each object, placement jitter
  inside the cell — and some captions leave out an object's size or position
  (those attributes are then not scored). Each caption describes many images,
  as a real caption does, so sampling is not a straight line.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re

import numpy as np

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
# Size name -> object extent as a share of the canvas side (10 px and 16 px at 32 px).
SIZE_SHARES: dict[str, float] = {"small": 10 / 32, "large": 16 / 32}
SIZE_NAMES = tuple(SIZE_SHARES)
# Row-major 3 x 3 grid; cell centres as shares of the side (inset so large objects fit).
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
CELL_CENTRE_SHARES = (7.5 / 32, 0.5, 24.5 / 32)
BACKGROUND_TEXTURES = ("flat", "gradient", "stripes", "checks", "noise")
OBJECT_FILLS = ("flat", "shaded", "striped", "spotted")

# (colour, shape) pairs never shown in training; every held-out prompt has one.
HELD_OUT_PAIRS = frozenset({
    ("purple", "triangle"), ("orange", "circle"), ("green", "ring"), ("blue", "square"),
})
# (fill, shape) pairs never rendered in V2 training data; held-out renders use them.
HELD_OUT_FILLS = frozenset({("striped", "circle"), ("spotted", "triangle")})

# Back-compatible names for V1's pixel geometry.
IMAGE_SIZE = 32
SIZES: dict[str, float] = {name: share * IMAGE_SIZE for name, share in SIZE_SHARES.items()}
CELL_CENTRES = tuple(share * IMAGE_SIZE for share in CELL_CENTRE_SHARES)


@dataclasses.dataclass(frozen=True)
class SceneStyle:
    """What a data set's scenes look like and how much their captions leave open."""

    name: str
    image_size: int
    object_counts: tuple[float, ...]  # probability of 1, 2, 3 ... objects
    jitter: float  # object centre jitter in pixels (each axis, uniform)
    textured: bool
    omit_size_prob: float = 0.0
    omit_position_prob: float = 0.0
    supersample: int = 4
    max_tokens: int = 24  # caption length in text-encoder tokens

    @property
    def max_objects(self) -> int:
        return len(self.object_counts)


V1 = SceneStyle("v1", 32, (0.6, 0.4), jitter=1.0, textured=False)
V2 = SceneStyle("v2", 64, (0.4, 0.35, 0.25), jitter=3.0, textured=True, omit_size_prob=0.15,
                omit_position_prob=0.1, supersample=2, max_tokens=40)
STYLES = {s.name: s for s in (V1, V2)}


def get_style(name: str) -> SceneStyle:
    if name not in STYLES:
        raise ValueError(f"scene style must be one of {sorted(STYLES)}, got {name!r}")
    return STYLES[name]


@dataclasses.dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str
    says_size: bool = True  # False: the caption leaves the size open (not scored)
    says_position: bool = True

    def phrase(self) -> str:
        size = f"{self.size} " if self.says_size else ""
        text = f"a {size}{self.colour} {self.shape}"
        if not self.says_position:
            return text
        return text + (" in the center" if self.position == "center" else f" at the {self.position}")


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        phrases = [o.phrase() for o in self.objects]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return body + f" on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background"


def _cell(position: str) -> tuple[int, int]:
    return divmod(POSITIONS.index(position), 3)


def _apart(a: str, b: str) -> bool:
    (ra, ca), (rb, cb) = _cell(a), _cell(b)
    return max(abs(ra - rb), abs(ca - cb)) >= 2


# Cell sets whose cells are pairwise non-adjacent, so objects never overlap.
_APART_SETS = {
    n: tuple(c for c in itertools.combinations(POSITIONS, n) if all(_apart(a, b) for a, b in itertools.combinations(c, 2)))
    for n in (1, 2, 3)
}
_NON_ADJACENT_PAIRS = _APART_SETS[2]


def sample_scene(rng: random.Random, split: str = "train", style: SceneStyle = V1,
                 num_objects: int | None = None) -> Scene:
    """Draw a scene. split='train' avoids HELD_OUT_PAIRS; 'heldout' uses one in every scene."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    background = rng.choice(COLOURS)
    if style is V1:  # V1's exact draw order, so its data and prompt sets stay reproducible
        if rng.random() < style.object_counts[1]:
            cells = list(rng.choice(_NON_ADJACENT_PAIRS))
            rng.shuffle(cells)
        else:
            cells = [rng.choice(POSITIONS)]
    else:
        if num_objects is None:
            num_objects = 1 + _weighted_index(rng, style.object_counts)
        cells = list(rng.choice(_APART_SETS[num_objects]))
        rng.shuffle(cells)
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
        size = rng.choice(SIZE_NAMES)
        says_size = says_position = True
        if style.omit_size_prob or style.omit_position_prob:
            says_size = rng.random() >= style.omit_size_prob
            says_position = rng.random() >= style.omit_position_prob
        objects.append(SceneObject(colour, shape, size, cells[len(objects)], says_size, says_position))
    return Scene(background, tuple(objects))


def _weighted_index(rng: random.Random, weights: tuple[float, ...]) -> int:
    r, total = rng.random() * sum(weights), 0.0
    for i, w in enumerate(weights):
        total += w
        if r < total:
            return i
    return len(weights) - 1


def _shape_mask(shape: str, cx: float, cy: float, extent: float, grid) -> np.ndarray:
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


def _wave(grid, rng: random.Random, period: float) -> np.ndarray:
    """A unit sine wave at a random angle and phase: values in [-1, 1]."""
    ys, xs = grid
    angle = rng.uniform(0, math.pi)
    phase = rng.uniform(0, 2 * math.pi)
    return np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + phase)


def _background_pattern(kind: str, grid, size: int, rng: random.Random) -> np.ndarray:
    """A pattern in [-1, 1] over the canvas."""
    ys, xs = grid
    if kind == "flat":
        return np.zeros_like(xs)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = ((xs - size / 2) * math.cos(angle) + (ys - size / 2) * math.sin(angle)) / (size / 2)
        return np.clip(ramp, -1, 1)
    if kind == "stripes":
        return np.sign(_wave(grid, rng, rng.uniform(size / 16, size / 4)))
    if kind == "checks":
        period = rng.uniform(size / 12, size / 4)
        return np.sign(_wave(grid, rng, period)) * np.sign(_wave(grid, rng, period))
    if kind == "noise":
        from scipy.ndimage import zoom

        cells = rng.randint(3, 9)
        coarse = np.random.default_rng(rng.getrandbits(32)).uniform(-1, 1, (cells + 1, cells + 1))
        fine = zoom(coarse, xs.shape[0] / (cells + 1), order=3, mode="nearest")[: xs.shape[0], : xs.shape[1]]
        return np.clip(fine / max(np.abs(fine).max(), 1e-6), -1, 1)
    raise ValueError(f"unknown background texture {kind!r}; allowed: {BACKGROUND_TEXTURES}")


def _object_pattern(fill: str, grid, cx: float, cy: float, extent: float, rng: random.Random) -> np.ndarray:
    ys, xs = grid
    if fill == "flat":
        return np.zeros_like(xs)
    if fill == "shaded":  # light from a random direction
        angle = rng.uniform(0, 2 * math.pi)
        return np.clip(((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / (extent / 2), -1, 1)
    if fill == "striped":
        return np.sign(_wave(grid, rng, extent / rng.uniform(2.5, 4.5)))
    if fill == "spotted":
        period = extent / rng.uniform(2.5, 4.0)
        return np.where((_wave(grid, rng, period) > 0.5) & (_wave(grid, rng, period) > 0.3), 1.0, -0.3)
    raise ValueError(f"unknown object fill {fill!r}; allowed: {OBJECT_FILLS}")


def _modulate(colour: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Darken (amount > 0) or lighten towards white (amount < 0) by |amount|, keeping the hue readable:
    adding a grey level instead would turn a lit orange into yellow."""
    amount = amount[..., None].astype(np.float32)
    return colour * (1 - np.clip(amount, 0, 1)) + (1 - colour) * np.clip(-amount, 0, 1)


def render(scene: Scene, rng: random.Random | None = None, jitter: float | None = None, with_mask: bool = False,
           style: SceneStyle = V1, split: str = "train"):
    """Render a scene to float32 RGB in [0, 1], shape (size, size, 3).

    jitter (pixels; default the style's) moves each object's centre uniformly by
    up to that much. V2 also draws the open detail from rng; split='train'
    never gives an object a held-out (fill, shape) pair, 'heldout' prefers them.
    """
    size, ss = style.image_size, style.supersample
    jitter = style.jitter if jitter is None else jitter
    s = size * ss
    coords = (np.arange(s, dtype=np.float32) + 0.5) / ss
    grid = np.meshgrid(coords, coords, indexing="ij")
    rng = rng or random.Random(0)
    base = np.array(PALETTE[scene.background], dtype=np.float32) / 255.0
    canvas = np.empty((s, s, 3), dtype=np.float32)
    canvas[:] = base
    if style.textured:
        kind = rng.choice(BACKGROUND_TEXTURES)
        amplitude = rng.uniform(0.10, 0.25)
        canvas[:] = _modulate(base, amplitude * _background_pattern(kind, grid, size, rng))
    covered = np.zeros((s, s), dtype=bool)
    for obj in scene.objects:
        row, col = _cell(obj.position)
        cx = CELL_CENTRE_SHARES[col] * size + rng.uniform(-jitter, jitter)
        cy = CELL_CENTRE_SHARES[row] * size + rng.uniform(-jitter, jitter)
        extent = SIZE_SHARES[obj.size] * size * rng.uniform(0.95, 1.05)
        mask = _shape_mask(obj.shape, cx, cy, extent, grid)
        colour = np.array(PALETTE[obj.colour], dtype=np.float32) / 255.0
        if style.textured:
            fill = _object_fill(obj.shape, rng, split)
            amplitude = rng.uniform(0.05, 0.15)
            shade = amplitude * _object_pattern(fill, grid, cx, cy, extent, rng)
            canvas[mask] = _modulate(colour, shade[mask])
        else:
            canvas[mask] = colour
        covered |= mask
    canvas = np.clip(canvas, 0.0, 1.0)
    image = canvas.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    if not with_mask:
        return image
    return image, covered.reshape(size, ss, size, ss).mean(axis=(1, 3))


def caption_spread(style: SceneStyle, count: int = 20, seed: int = 5) -> float:
    """How much a caption leaves open: mean pixel difference between two renders of one caption,
    averaged over `count` training captions (v1 0.023, v2 0.075)."""
    rng = random.Random(seed)
    diffs = []
    for _ in range(count):
        scene = sample_scene(rng, "train", style)
        a, b = (render(scene, random.Random(s), style=style) for s in (1, 2))
        diffs.append(float(np.abs(a - b).mean()))
    return float(np.mean(diffs))


def _object_fill(shape: str, rng: random.Random, split: str) -> str:
    held = [f for f in OBJECT_FILLS if (f, shape) in HELD_OUT_FILLS]
    if split == "heldout" and held and rng.random() < 0.5:
        return rng.choice(held)
    return rng.choice([f for f in OBJECT_FILLS if (f, shape) not in HELD_OUT_FILLS])


def make_batch(rng: random.Random, batch_size: int, split: str = "train", jitter: float | None = None,
               style: SceneStyle = V1):
    """Return (images (B, 3, S, S) in [-1, 1], object masks (B, S, S), captions, scenes)."""
    scenes = [sample_scene(rng, split, style) for _ in range(batch_size)]
    rendered = [render(sc, rng, jitter, with_mask=True, style=style, split=split) for sc in scenes]
    images = np.stack([r[0] for r in rendered]).transpose(0, 3, 1, 2)
    masks = np.stack([r[1] for r in rendered])
    return images * 2.0 - 1.0, masks, [sc.caption() for sc in scenes], scenes


def _prompt_set(count: int, seed: int, split: str, style: SceneStyle) -> list[Scene]:
    rng = random.Random(seed)
    if style is V1:
        return [sample_scene(rng, split) for _ in range(count)]
    # Stratified: equal thirds of 1-, 2- and 3-object scenes (the first ones get the remainder).
    counts = [count // style.max_objects + (i < count % style.max_objects) for i in range(style.max_objects)]
    scenes = [sample_scene(rng, split, style, n + 1) for n, k in enumerate(counts) for _ in range(k)]
    order = list(range(count))
    random.Random(seed + 1).shuffle(order)  # mixed, so any prefix holds every stratum
    return [scenes[i] for i in order]


def held_out_prompts(count: int, seed: int = 1234, style: SceneStyle = V1) -> list[Scene]:
    return _prompt_set(count, seed, "heldout", style)


def training_prompts(count: int, seed: int = 4321, style: SceneStyle = V1) -> list[Scene]:
    return _prompt_set(count, seed, "train", style)


_PHRASE = re.compile(
    r"an? (?:(?P<size>" + "|".join(SIZE_NAMES) + r") )?(?P<colour>" + "|".join(COLOURS) + r") (?P<shape>"
    + "|".join(SHAPES) + r")(?: (?:in the (?P<center>center)|at the (?P<position>"
    + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")))?"
)
_CAPTION = re.compile(r"(?P<objects>.+) on an? (?P<background>" + "|".join(COLOURS) + r") background")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption asks for, or None when the text is not a scene caption of this grammar.

    Unnamed sizes and positions are kept as "small" / "center" with says_size / says_position False."""
    whole = _CAPTION.fullmatch(text.strip().rstrip(".").lower())
    if whole is None:
        return None
    phrases = re.split(r", | and ", whole["objects"])
    objects = []
    for phrase in phrases:
        m = _PHRASE.fullmatch(phrase)
        if m is None:
            return None
        position = "center" if m["center"] else m["position"]
        objects.append(SceneObject(m["colour"], m["shape"], m["size"] or SIZE_NAMES[0], position or "center",
                                   says_size=m["size"] is not None, says_position=position is not None))
    return Scene(whole["background"], tuple(objects))


_GRAMMAR_WORDS = {"a", "an", "the", "at", "in", "on", "and", "background", "top", "bottom", "left", "right", "center"}


# Words people write for the scene vocabulary's own: suggested in the unknown-word warning.
_SYNONYMS = {"big": "large", "huge": "large", "little": "small", "tiny": "small", "upper": "top", "lower": "bottom",
             "centre": "center", "middle": "center", "central": "center", "grey": "gray", "box": "square",
             "rectangle": "square", "round": "circle", "dot": "circle", "disc": "circle", "disk": "circle",
             "donut": "ring", "annulus": "ring", "circles": "circle", "squares": "square", "triangles": "triangle",
             "rings": "ring"}


def _known_words() -> set[str]:
    return _GRAMMAR_WORDS | set(COLOURS) | set(SHAPES) | set(SIZE_NAMES)


def unknown_words(prompt: str) -> list[str]:
    """Words of a prompt that no scene caption uses (the embedded model ignores or misreads them)."""
    known = _known_words()
    words = re.findall(r"[a-z]+", prompt.lower())
    return sorted({w for w in words if w not in known})


def suggestion(word: str) -> str | None:
    """The scene word a user most likely meant by an unknown `word` (a synonym, or a close spelling)."""
    import difflib

    known = _known_words()
    if word in _SYNONYMS and _SYNONYMS[word] in known:
        return _SYNONYMS[word]
    close = difflib.get_close_matches(word, sorted(known - {"a", "an", "at", "in", "on"}), n=1, cutoff=0.75)
    return close[0] if close else None


def vocabulary_help() -> str:
    return (
        "The embedded model draws scenes: a background colour and one or more objects, each\n"
        f"  colour: {', '.join(COLOURS)}\n  shape: {', '.join(SHAPES)}\n  size: {', '.join(SIZE_NAMES)}\n"
        f"  position: {', '.join(POSITIONS)}\n"
        'e.g. "a large red circle at the top left and a small blue ring in the center on a white background".\n'
        "Other words are ignored (a warning names them)."
    )
