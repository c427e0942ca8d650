"""Prompt alignment: how well a scene read from an image matches the scene its prompt asked for.

Two scores, from any reader (the CNN checker or the pixel reader):

- strict (the headline): each asked object is matched to the object read in its asked
  cell (or, when the caption left the position open, to an unmatched object of the same
  colour and shape anywhere); its colour, shape and size must be right there. Objects
  that no asked object matched are unasked objects. An image is the *exact scene* when
  the background and every attribute the caption names are right and nothing unasked
  is drawn.
- lenient (the first benchmark's score, kept for continuity): an asked attribute counts
  when any object has it, and unasked objects are ignored.

Every alignment figure should stand beside its chance level: the same score of images
of other prompts (`chance_level`).
"""

from __future__ import annotations

import numpy as np

from specdiff.lab.embedded.scenes import Scene, SceneObject

ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def match_objects(asked: Scene, seen: Scene) -> list[SceneObject | None]:
    """For each asked object, the seen object it is matched with (None: nothing there)."""
    free = list(seen.objects)
    matches: list[SceneObject | None] = [None] * len(asked.objects)
    # Objects with a stated position first: they claim their cell.
    for i, obj in enumerate(asked.objects):
        if obj.says_position:
            found = [o for o in free if o.position == obj.position]
            if found:
                matches[i] = found[0]
                free.remove(found[0])
    for i, obj in enumerate(asked.objects):
        if not obj.says_position:
            found = sorted((o for o in free if o.colour == obj.colour),
                           key=lambda o: (o.shape != obj.shape, o.size != obj.size))
            if found:
                matches[i] = found[0]
                free.remove(found[0])
    return matches


def strict_hits(asked: Scene, seen: Scene) -> dict:
    """Per attribute a list of 1/0 (only attributes the caption names), unasked object count, exact scene."""
    hits: dict[str, list[int]] = {name: [] for name in ATTRIBUTES}
    background = int(asked.background == seen.background)
    hits["background"].append(background)
    exact = bool(background)
    for obj, match in zip(asked.objects, match_objects(asked, seen)):
        right = {
            "colour": match is not None and match.colour == obj.colour,
            "shape": match is not None and match.shape == obj.shape,
            "size": match is not None and match.size == obj.size,
            "position": match is not None and match.position == obj.position,
        }
        named = {"colour", "shape"} | ({"size"} if obj.says_size else set()) | (
            {"position"} if obj.says_position else set())
        for name in named:
            hits[name].append(int(right[name]))
        exact &= match is not None and all(right[n] for n in named)
    unasked = len(seen.objects) - sum(m is not None for m in match_objects(asked, seen))
    return {"hits": hits, "unasked": unasked, "exact": int(exact and unasked == 0)}


def lenient_hits(asked: Scene, seen: Scene) -> dict[str, list[int]]:
    """The first benchmark's score: per attribute 1/0 for every attribute the prompt asked for.

    Each asked object is matched to the object seen in its cell (position right), else to
    the seen object sharing most of its attributes (position wrong); with nothing seen,
    all its attributes count as missed.
    """
    hits = {name: [] for name in ATTRIBUTES}
    hits["background"].append(int(asked.background == seen.background))
    for obj in asked.objects:
        at_cell = [o for o in seen.objects if o.position == obj.position]
        if at_cell:
            match = at_cell[0]
        elif seen.objects:
            match = max(seen.objects, key=lambda o: (o.colour == obj.colour) + (o.shape == obj.shape) + (o.size == obj.size))
        else:
            match = None
        hits["position"].append(int(bool(at_cell)))
        for name in ("colour", "shape", "size"):
            hits[name].append(int(match is not None and getattr(match, name) == getattr(obj, name)))
    return hits


def lenient_accuracy(asked: list[Scene], seen: list[Scene]) -> dict[str, float]:
    totals = {name: [] for name in ATTRIBUTES}
    for a, s in zip(asked, seen):
        for name, values in lenient_hits(a, s).items():
            totals[name].extend(values)
    result = {name: float(np.mean(v)) if v else float("nan") for name, v in totals.items()}
    result["mean"] = float(np.nanmean([result[n] for n in ATTRIBUTES]))
    return result


def strict_accuracy(asked: list[Scene], seen: list[Scene]) -> dict[str, float]:
    """exact_scene rate, strict per-attribute accuracy, unasked objects per image."""
    if len(asked) != len(seen):
        raise ValueError(f"{len(asked)} asked scenes but {len(seen)} read ones")
    totals = {name: [] for name in ATTRIBUTES}
    exact, unasked = [], []
    for a, s in zip(asked, seen):
        scored = strict_hits(a, s)
        for name, values in scored["hits"].items():
            totals[name].extend(values)
        exact.append(scored["exact"])
        unasked.append(scored["unasked"])
    result = {"exact_scene": float(np.mean(exact))}
    result.update({name: float(np.mean(v)) if v else float("nan") for name, v in totals.items()})
    result["unasked_per_image"] = float(np.mean(unasked))
    return result


def chance_level(asked: list[Scene], seen: list[Scene]) -> dict[str, float]:
    """Strict scores of each image against another prompt's scene (the list rotated by one)."""
    if len(asked) < 2:
        raise ValueError("the chance level needs at least two prompts")
    return strict_accuracy(asked, seen[1:] + seen[:1])
