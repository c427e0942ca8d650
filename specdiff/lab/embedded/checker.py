"""The attribute checker: a small CNN that reads a scene back from an image.

It predicts the background colour and, for each of the 9 grid cells, whether
an object is there and its shape, colour and size. Trained on the scene
generator's renders (with noise and blur so it tolerates generated images);
its penultimate features serve for a Fréchet distance (the project's FID).

    python -m specdiff.lab.embedded.checker --train        # trains and writes the shipped weights
    python -m specdiff.lab.embedded.checker --evaluate     # accuracy on fresh scenes
    python -m specdiff.lab.embedded.checker --style v2 --train --evaluate   # the same for V2 scenes (64 px, textured)
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from specdiff.lab.embedded.alignment import lenient_accuracy, strict_accuracy
from specdiff.lab.embedded.scenes import (
    COLOURS, POSITIONS, SHAPES, SIZE_NAMES, V1, Scene, SceneObject, SceneStyle, get_style, render, sample_scene,
)
from specdiff.lab.stats import frechet_distance

CHECKER_DIR = Path(__file__).parent / "checker_weights"
CHECKER_DIRS = {"v1": CHECKER_DIR, "v2": Path(__file__).parent / "checker_weights_v2"}
NONE = len(SHAPES)  # shape class "no object in this cell"
CELLS = len(POSITIONS)
INPUT_SIZE = 32  # larger images are area-averaged to this size first


class SceneChecker(nn.Module):
    def __init__(self, width: int = 64, features: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),  # 16 x 16
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),  # 8 x 8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 9, features), nn.GELU())
        self.background = nn.Linear(features, len(COLOURS))
        self.shape = nn.Linear(features, CELLS * (len(SHAPES) + 1))
        self.colour = nn.Linear(features, CELLS * len(COLOURS))
        self.size = nn.Linear(features, CELLS * len(SIZE_NAMES))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, features)."""
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.adaptive_avg_pool2d(images, INPUT_SIZE)
        return self.features(self.pool(self.body(images * 2 - 1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(images)
        b = h.shape[0]
        return {
            "background": self.background(h),
            "shape": self.shape(h).view(b, CELLS, -1),
            "colour": self.colour(h).view(b, CELLS, -1),
            "size": self.size(h).view(b, CELLS, -1),
        }


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    b = len(scenes)
    shape = torch.full((b, CELLS), NONE, dtype=torch.long)
    colour = torch.zeros((b, CELLS), dtype=torch.long)
    size = torch.zeros((b, CELLS), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = POSITIONS.index(obj.position)
            shape[i, cell] = SHAPES.index(obj.shape)
            colour[i, cell] = COLOURS.index(obj.colour)
            size[i, cell] = SIZE_NAMES.index(obj.size)
    background = torch.tensor([COLOURS.index(s.background) for s in scenes])
    return {"background": background, "shape": shape, "colour": colour, "size": size}


def read_scenes(outputs: dict[str, torch.Tensor]) -> list[Scene]:
    """Turn the checker's outputs into scenes (objects wherever a shape is predicted)."""
    background = outputs["background"].argmax(-1)
    shape, colour, size = (outputs[k].argmax(-1) for k in ("shape", "colour", "size"))
    scenes = []
    for i in range(background.shape[0]):
        objects = tuple(
            SceneObject(COLOURS[colour[i, c]], SHAPES[shape[i, c]], SIZE_NAMES[size[i, c]], POSITIONS[c])
            for c in range(CELLS)
            if shape[i, c] != NONE
        )
        scenes.append(Scene(COLOURS[background[i]], objects))
    return scenes


def _degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and slight blur, so the checker reads imperfect generated images too."""
    b = images.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.12
    noisy = images + sigma * torch.randn(images.shape, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        noisy[blur] = F.conv2d(F.pad(noisy[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return noisy.clamp(0, 1)


def render_batch(scenes: list[Scene], rng: random.Random, jitter: float | None = None, style: SceneStyle = V1,
                 split: str = "train") -> torch.Tensor:
    jitter = 1.0 if jitter is None and style is V1 else jitter
    images = [render(s, rng, jitter, style=style, split=split) for s in scenes]
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def _random_scenes(rng: random.Random, count: int, style: SceneStyle = V1) -> list[Scene]:
    return [sample_scene(rng, "heldout" if rng.random() < 0.2 else "train", style) for _ in range(count)]


def train_checker(steps: int = 4000, batch: int = 64, seed: int = 0, pool_size: int = 24000,
                  style: SceneStyle = V1) -> SceneChecker:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes = _random_scenes(rng, pool_size, style)
    # Held-out renders (held-out object fills in V2) for a fifth of the pool, as for the scenes.
    images = torch.cat([render_batch([sc], rng, style=style, split="heldout" if i % 5 == 0 else "train")
                        for i, sc in enumerate(scenes)])
    targets = scene_targets(scenes)
    model = SceneChecker()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="training the checker"):
        idx = torch.randint(0, pool_size, (batch,), generator=gen)
        x = _degrade(images[idx], gen)
        out = model(x)
        t = {k: v[idx] for k, v in targets.items()}
        present = t["shape"] != NONE
        loss = F.cross_entropy(out["background"], t["background"])
        loss = loss + F.cross_entropy(out["shape"].flatten(0, 1), t["shape"].flatten())
        loss = loss + F.cross_entropy(out["colour"][present], t["colour"][present])
        loss = loss + F.cross_entropy(out["size"][present], t["size"][present])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def read_images(model: SceneChecker, images: torch.Tensor) -> list[Scene]:
    return read_scenes(model(images.float().clamp(0, 1)))


def evaluate_checker(model: SceneChecker, count: int = 2000, seed: int = 99, degrade: bool = False,
                     style: SceneStyle = V1) -> dict[str, float]:
    """Strict accuracy (exact scene, per attribute) on fresh renders; the lenient mean beside it."""
    rng = random.Random(seed)
    scenes = [sc if style is V1 else dataclasses.replace(sc, objects=tuple(
        dataclasses.replace(o, says_size=True, says_position=True) for o in sc.objects))
        for sc in _random_scenes(rng, count, style)]  # the checker reads every attribute, named or not
    images = render_batch(scenes, rng, style=style)
    if degrade:
        images = _degrade(images, torch.Generator().manual_seed(seed))
    seen = []
    for start in range(0, count, 256):
        seen += read_images(model, images[start : start + 256])
    result = strict_accuracy(scenes, seen)
    result["lenient_mean"] = lenient_accuracy(scenes, seen)["mean"]
    return result


def save_checker(model: SceneChecker, folder: Path = CHECKER_DIR) -> None:
    from safetensors.torch import save_file

    from specdiff.lab.embedded.pipeline import write_checksums

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "checker.safetensors")
    write_checksums(folder)


def load_checker(style: SceneStyle | Path = V1) -> SceneChecker:
    """The shipped checker for a scene style (or the checker in a folder), hash-checked."""
    from safetensors.torch import load_file

    from specdiff.lab.embedded.pipeline import verify_model_folder

    folder = style if isinstance(style, Path) else CHECKER_DIRS[style.name]
    verify_model_folder(folder, required=("checker.safetensors",))
    model = SceneChecker()
    model.load_state_dict(load_file(folder / "checker.safetensors"))
    return model.eval()


def frechet_floor(model: SceneChecker, count: int = 64, style: SceneStyle = V1) -> float:
    """Fréchet distance between two render sets of the same held-out prompts: the scale's floor."""
    from specdiff.lab.embedded.scenes import held_out_prompts

    scenes = held_out_prompts(count, style=style)
    first = checker_features(model, render_batch(scenes, random.Random(0), style=style))
    second = checker_features(model, render_batch(scenes, random.Random(1), style=style))
    return frechet_distance(first, second)


@torch.no_grad()
def checker_features(model: SceneChecker, images: torch.Tensor) -> np.ndarray:
    return model.embed(images.float().clamp(0, 1)).numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true")
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--style", default="v1", choices=("v1", "v2"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    style = get_style(args.style)
    if args.train:
        model = train_checker(steps=args.steps, style=style)
        save_checker(model, CHECKER_DIRS[style.name])
    if args.evaluate:
        model = load_checker(style)
        for degrade in (False, True):
            acc = evaluate_checker(model, degrade=degrade, style=style)
            label = "noisy/blurred renders" if degrade else "clean renders"
            print(f"checker accuracy on 2000 fresh {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
        floor = frechet_floor(model, style=style)
        print(f"Fréchet floor (renders vs renders of the 64 held-out prompts, other jitter): {floor:.1f}")


if __name__ == "__main__":
    main()
