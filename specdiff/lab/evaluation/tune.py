"""`specdiff tune`: the fastest setting that meets a quality target, on the user's own model and prompts.

    specdiff tune --target "psnr>=30" --budget 20
    specdiff tune --model /models/sd3-medium --prompts prompts.txt --target "ssim>=0.85"

Every method has one main speed knob (KNOBS; fewer steps for full compute) along which quality
falls roughly monotonically. The tuner evaluates each method's default, then bisects the knob to the
fastest value that still meets the target on the calibration prompts, then tries the method's
secondary fields at and just past that point. The search is joint in the step count: each cache is
searched at every count of the steps axis (default: the model's steps and half of them), its
schedule scaled to that count (`scale_schedule`), beside plain fewer steps, so that a cache on
fewer steps is chosen when it is the fastest setting that holds. Search speed is the
FLOPs ratio (deterministic, cheap to count); the finalists (each method's fastest passing setting and
its default) are then timed interleaved with full compute, one prompt at a time, on prompts the search
never saw, and the chosen setting is reported with its verification figures, never its calibration score.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from specdiff.configs import FORMAT, config_from_record, load_config, read_tuned, save_config, write_atomically  # noqa: F401
from specdiff.engine.policy import ConfigError, PolicyConfig

METRICS = {
    "psnr": "PSNR in dB against full compute's image (same prompt and seed); per image capped at 100",
    "ssim": "SSIM against full compute's image (same prompt and seed)",
    "alignment": "strict scene alignment: percent of the asked attributes drawn right (embedded scene models)",
    "clip": "CLIP score of image and prompt (needs --clip-model)",
}
_AGAINST_FULL = ("psnr", "ssim")  # measured against full compute: full compute scores the maximum
FEWER_STEPS = "full"  # in --methods: full compute with fewer steps


@dataclasses.dataclass(frozen=True)
class SpeedKnob:
    """A method's main speed setting: quality falls roughly monotonically as the field moves from
    `slowest` to `fastest` (both within the field's allowed range)."""

    field: str
    slowest: float
    fastest: float
    integer: bool = False


# method -> (its speed knob, other values of secondary fields worth trying at the knob's best point);
# methods tuned by default are those listed (a study method is tuned when named in --methods)
KNOBS: dict[str, tuple[SpeedKnob, dict[str, tuple]]] = {
    "specdiff": (SpeedKnob("cache_ratio", 0.3, 0.97),
                 {"speculative_steps": (0, 1, 3), "warmup_steps": (2, 6), "reset_steps": ((), (14,))}),
    "ras": (SpeedKnob("cache_ratio", 0.2, 0.97), {"warmup_steps": (2, 6), "metric": ("l2",)}),
    "random": (SpeedKnob("cache_ratio", 0.2, 0.97), {}),
    "fora": (SpeedKnob("interval", 2, 10, integer=True), {}),
    "taylorseer": (SpeedKnob("interval", 2, 12, integer=True), {"order": (0, 2), "warmup_steps": (2, 5)}),
    "firstblock": (SpeedKnob("threshold", 0.01, 0.6), {}),
    "toca": (SpeedKnob("interval", 2, 10, integer=True), {"recompute_ratio": (0.05, 0.2)}),
}
STUDY_KNOBS = {"specdiff-study": (SpeedKnob("cache_ratio", 0.3, 0.97), {"importance": ("change",)})}


@dataclasses.dataclass(frozen=True)
class Target:
    """`metric>=value`, or `metric>=full-X` (X below full compute's own score on the same prompts)."""

    metric: str
    value: float
    relative: bool
    text: str

    def threshold(self, full_score: float) -> float:
        return full_score + self.value if self.relative else self.value


def parse_target(text: str) -> Target:
    match = re.fullmatch(r"\s*([A-Za-z_]+)\s*>=\s*(full)?\s*([+-]?\s*\d+(?:\.\d*)?|[+-]?\s*\.\d+)?\s*", text or "")
    if not match or (match.group(2) is None and match.group(3) is None):
        raise ConfigError(f"--target {text!r}: write METRIC>=VALUE or METRIC>=full-X, e.g. psnr>=30 or "
                          f"alignment>=full-2 (metrics: {', '.join(METRICS)})")
    metric = match.group(1).lower()
    if metric not in METRICS:
        raise ConfigError(f"--target {text!r}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    relative = match.group(2) is not None
    number = float(match.group(3).replace(" ", "")) if match.group(3) else 0.0
    if relative and metric in _AGAINST_FULL:
        raise ConfigError(f"--target {text!r}: {metric} is measured against full compute's image, so full "
                          f"compute has no score of its own to subtract from; give a number, e.g. {metric}>=30")
    if relative and number > 0:
        raise ConfigError(f"--target {text!r}: nothing can score above full compute's own {metric}; use full-X")
    if metric == "alignment" and not relative and 0 < number <= 1:
        number *= 100  # a fraction: 0.99 means 99 %
    return Target(metric, number, relative, text.strip())


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the search: a method's config (None: full compute) and the number of steps."""

    method: str
    config: PolicyConfig | None
    steps: int

    reference_steps: int | None = None  # the model's own step count (None: the same as steps)

    @property
    def label(self) -> str:
        """As `specdiff bench --methods` reads it: the fields that differ from the method's default
        (scaled to this step count), then steps=N when the method runs fewer steps than the model."""
        if self.config is None:
            return f"{FEWER_STEPS}:steps={self.steps}"
        fewer = self.reference_steps is not None and self.steps != self.reference_steps
        default = _scaled(type(self.config)(), self.steps, self.reference_steps) if fewer else type(self.config)()
        changed = [f"{f.name}={_show(getattr(self.config, f.name))}" for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != getattr(default, f.name)]
        changed += [f"steps={self.steps}"] * fewer
        return self.method + (":" + ",".join(changed) if changed else "")

    def fields(self) -> dict:
        return {} if self.config is None else dataclasses.asdict(self.config)


def _show(value) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value)) if value else "()"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclasses.dataclass
class Evaluation:
    setting: Setting
    per_prompt: np.ndarray  # the metric per calibration prompt
    flops: int
    seconds: float
    score: float = 0.0
    speedup_flops: float = 0.0
    meets: bool = False


def _margin(per_prompt: np.ndarray, margin: float | str, reference: np.ndarray | None = None) -> float:
    """How far above the threshold a calibration mean must be: a number, or "auto" = one standard error
    over the calibration prompts (a setting just at the target on a few prompts misses it on others
    about half the time; one standard error makes that about one in six). For a target relative to full
    compute (`reference`: full compute's per-prompt scores) the error of the paired difference, since
    both are measured on the same prompts."""
    if margin != "auto":
        return float(margin)
    if len(per_prompt) < 2:
        return 0.0
    values = per_prompt if reference is None else per_prompt - reference
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _bootstrap(values: np.ndarray, statistic=np.mean, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of `statistic` over resampled prompts."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(statistic(values)), float(statistic(values))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(rounds, len(values)))
    stats = np.array([statistic(values[p]) for p in picks])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


class _Scorer:
    """The target metric per prompt, for images against full compute's images of the same prompts."""

    def __init__(self, pipe, metric: str, clip=None) -> None:
        self.metric, self.clip, self.checker = metric, clip, None
        if metric == "alignment":
            from specdiff.lab.embedded.checker import load_checker

            self.checker = load_checker(pipe.style)

    def __call__(self, images: torch.Tensor, reference: torch.Tensor, prompts: list[str], scenes) -> np.ndarray:
        from specdiff.lab.evaluation.metrics import psnr, ssim

        if self.metric == "psnr":
            return np.array([min(psnr(r, i), 100.0) for r, i in zip(reference, images)])
        if self.metric == "ssim":
            return np.array([ssim(r, i) for r, i in zip(reference, images)])
        if self.metric == "clip":
            return np.asarray(self.clip.score(images, prompts), dtype=float)
        from specdiff.lab.embedded.alignment import strict_hits
        from specdiff.lab.embedded.checker import read_images

        seen = read_images(self.checker, images)
        values = []
        for asked, drawn in zip(scenes, seen):
            hits = [h for per_attribute in strict_hits(asked, drawn)["hits"].values() for h in per_attribute]
            values.append(100.0 * sum(hits) / len(hits))
        return np.array(values)


class _KnobSearch:
    """Bisection of one method's speed knob (position 0 = slowest value, 1 = fastest), then its
    secondary fields at and just past the best point. Yields settings; told whether each met the target."""

    def __init__(self, method: str, make: Callable[[float, dict], Setting], knob: SpeedKnob,
                 default_position: float | None, alternatives: dict[str, tuple]) -> None:
        self.method, self.make, self.knob, self.alternatives = method, make, knob, alternatives
        self.passing: float | None = None  # fastest position known to meet the target
        self.failing: float | None = None  # slowest position known to miss it
        self.tried: set[float] = set()
        self.default_position = default_position
        self._secondary = None
        self.done = False

    def value(self, position: float):
        k = self.knob
        raw = k.slowest + position * (k.fastest - k.slowest)
        return int(round(raw)) if k.integer else round(raw, 3)

    def _position(self, value) -> float:
        k = self.knob
        return (value - k.slowest) / (k.fastest - k.slowest)

    def record(self, position: float, meets: bool) -> None:
        self.tried.add(position)
        if meets and (self.passing is None or position > self.passing):
            self.passing = position
        if not meets and (self.failing is None or position < self.failing):
            self.failing = position

    def next_setting(self) -> tuple[Setting, float | None] | None:
        """(setting, knob position or None for a secondary try), or None when finished."""
        if self.done:
            return None
        if self._secondary is None:
            position = self._next_position()
            if position is not None:
                return self.make(self.value(position), {}), position
            if self.passing is None:  # even the slowest value misses: no secondary tries
                self.done = True
                return None
            self._secondary = self._secondary_settings()
        if self._secondary:
            return self._secondary.pop(0), None
        self.done = True
        return None

    def _next_position(self) -> float | None:
        if self.default_position is not None and self.default_position not in self.tried:
            return self.default_position
        if self.passing is None:
            return None if 0.0 in self.tried else 0.0
        if self.failing is None:
            return None if 1.0 in self.tried else 1.0
        low, high = self.passing, self.failing
        if self.knob.integer:
            a, b = self.value(low), self.value(high)
            if abs(b - a) <= 1:
                return None
            return self._position((a + b) // 2 if b > a else (a + b + 1) // 2)
        if high - low < 0.03:
            return None
        return (low + high) / 2

    def _secondary_settings(self) -> list[Setting]:
        points = [self.passing] + ([self.failing] if self.failing is not None else [])
        settings = []
        for field, values in self.alternatives.items():
            for value in values:
                for position in points:
                    try:
                        settings.append(self.make(self.value(position), {field: value}))
                    except ConfigError:
                        pass  # an alternative that does not fit this point (e.g. warm-up past the steps)
        return settings


def _scaled(config: PolicyConfig, steps: int, reference_steps: int | None) -> PolicyConfig:
    """`config` (its schedule written for the model's step count) for a run of `steps` steps."""
    from specdiff.lab.evaluation.methods import scale_schedule

    if reference_steps is None or steps == reference_steps:
        return config
    return scale_schedule(config, steps, reference=reference_steps)


def _make_setting(method: str, steps: int, reference_steps: int | None = None
                  ) -> tuple[Callable[[float, dict], Setting], SpeedKnob, object]:
    """(make(knob value, other fields) -> Setting, the knob, the default knob value or None). A method
    searched at fewer steps than the model's (`reference_steps`) has its schedule scaled to them,
    the secondary fields' values included (they are written for the model's step count)."""
    from specdiff.lab.studies import POLICIES

    if method == FEWER_STEPS:
        knob = SpeedKnob("steps", steps, min(2, steps), integer=True)
        return (lambda value, extra: Setting(FEWER_STEPS, None, int(value))), knob, None
    config_type = POLICIES[method][0]
    knob = {**KNOBS, **STUDY_KNOBS}.get(method, (None, {}))[0]
    if knob is None:
        raise ConfigError(f"--methods: {method} has no speed setting to tune")

    def make(value, extra):
        config = _scaled(config_type(**{knob.field: value, **extra}), steps, reference_steps)
        return Setting(method, config, steps, reference_steps)

    return make, knob, getattr(config_type(), knob.field)


def parse_steps_axis(text: str | None, steps: int) -> list[int]:
    """--steps-axis: step counts at which every cache is searched, e.g. "28,14" (default: the model's
    steps and half of them; "none": the model's steps only). Fewer steps alone is searched anyway."""
    if text is None:
        return sorted({steps, max(2, round(steps / 2))}, reverse=True)
    if text.strip().lower() == "none":
        return [steps]
    counts = []
    for item in text.replace(" ", "").split(","):
        if not item.isdigit() or not 2 <= int(item) <= steps:
            raise ConfigError(f"--steps-axis {text!r}: give step counts from 2 to --steps {steps} separated by "
                              "commas, e.g. 28,14, or none")
        counts.append(int(item))
    return sorted(set(counts), reverse=True)


def tunable_methods() -> list[str]:
    """The methods tuned by default."""
    return list(KNOBS) + [FEWER_STEPS]


@dataclasses.dataclass
class TuneResult:
    target: Target
    threshold: float
    full_score: float
    chosen: dict | None  # the verification row of the chosen setting (None: nothing held the target)
    comparison: list[dict]  # verification rows: every method's default and its fastest passing setting
    tried: list[dict]  # every calibration evaluation
    meta: dict
    closest: dict | None = None  # when nothing held: the verified setting that missed by least (not chosen)

    @property
    def config(self) -> PolicyConfig | None:
        return None if self.chosen is None else config_from_record(self.chosen, "the tune result")

    @property
    def steps(self) -> int | None:
        return None if self.chosen is None else self.chosen["num_inference_steps"]

    def to_json(self) -> dict:
        from specdiff.lab.evaluation.report import strict_json

        chosen = self.chosen or {}
        return strict_json({
            "format": FORMAT,
            "method": chosen.get("method"), "config": chosen.get("config"),
            "num_inference_steps": chosen.get("num_inference_steps"), "label": chosen.get("label"),
            "target": self.target.text, "metric": self.target.metric, "metric_means": METRICS[self.target.metric],
            "threshold": self.threshold, "full_compute_score_calibration": self.full_score,
            "met": self.chosen is not None,
            "calibration": {k: chosen.get(k) for k in ("calibration_score", "calibration_speedup_flops")} if self.chosen else None,
            "verification": {k: chosen.get(k) for k in (
                "verification_score", "verification_score_ci95", "verification_threshold", "verification_full_score",
                "verification_difference_to_full_ci95", "holds", "misses_by", "speedup_wallclock_median",
                "speedup_wallclock_ci95", "speedup_flops")} if self.chosen else None,
            "closest_not_met": None if self.closest is None else {
                k: self.closest.get(k) for k in ("label", "method", "config", "num_inference_steps",
                                                 "verification_score", "misses_by", "speedup_wallclock_median")},
            **self.meta,
            "comparison": self.comparison, "tried": self.tried,
        })


class _Runner:
    """Generates prompts with a setting (the benchmark's `generate_images`: one seeded generator per
    prompt, synchronised timing); prompt i of a run uses seed + i."""

    def __init__(self, pipe, extra: dict, seed: int, batch_size: int) -> None:
        self.pipe, self.extra, self.seed, self.batch_size = pipe, extra, seed, batch_size
        self.device = torch.device(getattr(pipe, "device", "cpu"))

    def _images(self, prompts, first_index, steps):
        from specdiff.lab.evaluation.benchmark import generate_images

        seeds = [self.seed + first_index + k for k in range(len(prompts))]
        return generate_images(self.pipe, prompts, seeds, steps, self.extra, self.device)

    def run(self, setting: Setting, prompts: list[str], first_index: int, count_flops: bool = True):
        """(images, FLOPs, seconds) for every prompt, in batches; FLOPs counted on the way."""
        from specdiff.lab.evaluation.flops import count_module_flops
        from specdiff.lab.evaluation.methods import MethodSpec

        images, flops = [], 0
        spec = MethodSpec(setting.label, setting.config, steps=setting.steps)
        tic = time.perf_counter()
        with spec.active(self.pipe):
            for start in range(0, len(prompts), self.batch_size):
                chunk, out = prompts[start : start + self.batch_size], []
                generate = lambda: out.append(self._images(chunk, first_index + start, setting.steps)[0])  # noqa: E731
                if count_flops:
                    flops += count_module_flops(generate, self.pipe.transformer)
                else:
                    generate()
                images.append(out[0])
        return torch.cat(images), flops, time.perf_counter() - tic

    def timed(self, setting: Setting, prompt: str, index: int):
        """(image, seconds) of one prompt, timed alone."""
        from specdiff.lab.evaluation.methods import MethodSpec

        with MethodSpec(setting.label, setting.config, steps=setting.steps).active(self.pipe):
            return self._images([prompt], index, setting.steps)


def tune(pipe, prompts: list[str] | None = None, target: str | Target = "psnr>=30", *, calibration: int = 8,
         verify: int = 16, budget_minutes: float = 20.0, methods: list[str] | None = None, steps: int = 28,
         seed: int = 0, out=None, clip=None, margin: float | str = "auto", rank: str = "flops", batch_size: int = 8,
         pipeline_kwargs: dict | None = None, model_name: str | None = None, progress: bool = True,
         steps_axis: list[int] | str | None = None) -> TuneResult:
    """Find the fastest setting that meets `target` on `calibration` prompts, then verify it on the
    next `verify` prompts. `steps_axis`: the step counts each cache is searched at (parse_steps_axis;
    default `steps` and half of them). `prompts` needs calibration + verify entries (None: the embedded model's
    held-out scenes). `clip` is a ClipScorer for clip targets. With `out`, writes tuned.json,
    summary.md and pareto.png there (tuned.json last; an interrupted run leaves none)."""
    from specdiff.lab.embedded.pipeline import ScenePipeline

    started = time.perf_counter()
    target = parse_target(target) if isinstance(target, str) else target
    names = list(methods) if methods else tunable_methods()
    known = tunable_methods() + list(STUDY_KNOBS)
    for name in names:
        if name not in known:
            raise ConfigError(f"--methods: unknown method {name!r}; choose from {', '.join(known)} "
                              f"({FEWER_STEPS} = full compute with fewer steps)")
    for option, value, low in (("--calibration", calibration, 1), ("--verify", verify, 1), ("--steps", steps, 2),
                               ("--batch-size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{option} must be an integer of at least {low}, got {value!r}")
    if not (isinstance(budget_minutes, (int, float)) and math.isfinite(budget_minutes) and budget_minutes > 0):
        raise ConfigError(f"--budget must be a positive number of minutes, got {budget_minutes!r}")
    if margin != "auto" and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)):
        raise ConfigError(f"--margin must be auto or a number in the metric's units, got {margin!r}")
    axis = parse_steps_axis(steps_axis, steps) if not isinstance(steps_axis, list) else steps_axis
    if any(isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= steps for n in axis) or not axis:
        raise ConfigError(f"--steps-axis {steps_axis!r}: step counts from 2 to --steps {steps}")
    axis = sorted(set(axis), reverse=True)
    if rank not in ("flops", "wallclock"):
        raise ConfigError(f"--rank must be flops or wallclock, got {rank!r}")
    if target.metric == "clip" and clip is None:
        raise ConfigError(f"--target {target.text!r} needs --clip-model (a local CLIP folder or hub-cache id)")
    is_scene = isinstance(pipe, ScenePipeline)
    need = calibration + verify
    if prompts is None:
        if not is_scene:
            raise ConfigError("--prompts is needed for this model: a text file with one prompt per line "
                              f"({need} = --calibration {calibration} + --verify {verify})")
        from specdiff.lab.embedded.scenes import held_out_prompts

        scenes = held_out_prompts(need, style=pipe.style)
        prompts = [s.caption() for s in scenes]
    else:
        prompts = list(prompts)
        if len(prompts) < need:
            raise ConfigError(f"the prompts hold {len(prompts)}, but --calibration {calibration} + --verify "
                              f"{verify} need {need} (calibration and verification prompts never overlap)")
        prompts = prompts[:need]
        scenes = None
        if is_scene:
            from specdiff.lab.embedded.scenes import parse_caption

            parsed = [parse_caption(p) for p in prompts]
            scenes = parsed if all(s is not None for s in parsed) else None
    if target.metric == "alignment" and scenes is None:
        why = "its prompts are not all scene captions" if is_scene else "this model has no scene checker"
        raise ConfigError(f"--target {target.text!r}: alignment is measured on the embedded scene models only, "
                          f"and {why}; use psnr, ssim or clip")
    extra = dict(pipeline_kwargs or {})
    calib_prompts, verify_prompts = prompts[:calibration], prompts[calibration:]
    calib_scenes = scenes[:calibration] if scenes else None
    verify_scenes = scenes[calibration:] if scenes else None

    scorer = _Scorer(pipe, target.metric, clip)
    runner = _Runner(pipe, extra, seed, batch_size)
    pipe.set_progress_bar_config(disable=True)
    full = Setting(FEWER_STEPS, None, steps)
    runner.run(Setting(FEWER_STEPS, None, 2), calib_prompts[:1], 0, count_flops=False)  # warm-up
    reference, full_flops, full_seconds = runner.run(full, calib_prompts, 0)
    full_per_prompt = scorer(reference, reference, calib_prompts, calib_scenes)
    full_score = float(np.mean(full_per_prompt))
    threshold = target.threshold(full_score)
    if target.metric not in _AGAINST_FULL and threshold > full_score:
        raise ConfigError(f"--target {target.text!r}: full compute itself scores {full_score:.2f} on the calibration "
                          f"prompts, below {threshold:.2f}; no faster setting can be expected to meet it")
    # The budget: one evaluation per method and the verification must fit (the latter is estimated from
    # one prompt's full-compute time, times every finalist and default, plus full compute itself).
    _, one_prompt = runner.timed(full, verify_prompts[0], calibration)
    # each verified setting: every verification prompt timed alone; accelerated ones take about 0.6 of full's time
    verify_estimate = one_prompt * len(verify_prompts) * (1 + 0.6 * 2 * len(names))
    searched = [(name, count) for count in axis for name in names if name != FEWER_STEPS]
    searched += [(FEWER_STEPS, steps)] * (FEWER_STEPS in names)
    minimum = time.perf_counter() - started + full_seconds * len(searched) + verify_estimate
    budget = budget_minutes * 60
    if minimum > budget:
        raise ConfigError(f"--budget {budget_minutes:g} minutes is too small for one evaluation of each of the "
                          f"{len(searched)} searches ({len(names)} methods, steps axis {','.join(map(str, axis))}) and "
                          f"the verification (about {minimum / 60:.1f} minutes on this machine); give --budget "
                          f"{math.ceil(minimum / 60 * 1.5)}, fewer --methods or a shorter --steps-axis")
    batch_one_factor = one_prompt * len(calib_prompts) / full_seconds  # one prompt per call vs batched

    def verification_seconds() -> float:
        """The verification of today's finalists, from their calibration times: each prompt timed alone,
        then one batched pass counting FLOPs, for full compute and (per method and step count) its default
        and its best."""
        seconds = full_seconds
        for name, count in searched:  # its default and its fastest passing setting so far, if they met the target
            mine = [e for e in order if e.setting.method == name and e.meets
                    and (name == FEWER_STEPS or e.setting.steps == count)]
            default = _default_setting(name, steps)
            seconds += sum(e.seconds for e in mine if count == steps and default is not None
                           and e.setting.label == default.label)
            seconds += min((e.seconds for e in mine), default=0.0)
        return seconds * len(verify_prompts) / len(calib_prompts) * batch_one_factor

    evaluations: dict[str, Evaluation] = {}
    order: list[Evaluation] = []

    def evaluate(setting: Setting) -> Evaluation:
        if setting.label in evaluations:
            return evaluations[setting.label]
        images, flops, seconds = runner.run(setting, calib_prompts, 0)
        per_prompt = scorer(images, reference, calib_prompts, calib_scenes)
        result = Evaluation(setting, per_prompt, flops, seconds, score=float(np.mean(per_prompt)),
                            speedup_flops=full_flops / max(flops, 1))
        paired = full_per_prompt if target.relative else None
        result.meets = result.score - _margin(per_prompt, margin, paired) >= threshold
        evaluations[setting.label] = result
        order.append(result)
        return result

    searches = []
    for name, count in searched:
        make, knob, default_value = _make_setting(name, count if name != FEWER_STEPS else steps, steps)
        position = None
        if default_value is not None:
            position = (default_value - knob.slowest) / (knob.fastest - knob.slowest)
        alternatives = {} if name == FEWER_STEPS else {**KNOBS, **STUDY_KNOBS}[name][1]
        search = _KnobSearch(name, make, knob, position, alternatives)
        if name == FEWER_STEPS:
            search.record(0.0, True)  # all the steps: the reference itself
        searches.append(search)

    bar = tqdm(desc=f"tune {target.text}", unit="setting", disable=not progress)
    out_of_time = False
    while any(not s.done for s in searches):
        for search in searches:
            slowest = max((e.seconds for e in order), default=full_seconds)  # room for one more evaluation
            if time.perf_counter() + slowest + verification_seconds() > started + budget:
                out_of_time = True
                break
            step = search.next_setting()
            if step is None:
                continue
            setting, position = step
            result = evaluate(setting)
            if position is not None:
                search.record(position, result.meets)
            bar.update(1)
            best = max((e for e in order if e.meets), key=lambda e: e.speedup_flops, default=None)
            bar.set_postfix_str(f"best {best.setting.label} {best.speedup_flops:.2f}x FLOPs" if best else "best: none yet")
        if out_of_time:
            break
    bar.close()

    # Finalists: per method and step count its fastest passing setting, and the method's default (the
    # comparison the user needs).
    finalists: list[tuple[Evaluation, str]] = []
    for name, count in searched:
        mine = [e for e in order if e.setting.method == name and (name == FEWER_STEPS or e.setting.steps == count)]
        passing = [e for e in mine if e.meets]
        if passing:
            finalists.append((max(passing, key=lambda e: e.speedup_flops), "tuned"))
        default = _default_setting(name, steps)
        if count == steps and default is not None and default.label in evaluations:
            entry = evaluations[default.label]
            if not any(f is entry for f, _ in finalists):
                finalists.append((entry, "default"))
            else:
                finalists = [(f, "tuned (= default)" if f is entry else role) for f, role in finalists]
    comparison = _verify(runner, scorer, full, finalists, verify_prompts, verify_scenes, calibration, threshold, target,
                         bar=progress)
    chosen, closest = pick(comparison, "calibration_speedup_flops" if rank == "flops" else "speedup_wallclock_median")
    from specdiff import __version__

    meta = {
        "model": model_name or type(pipe).__name__, "library_version": __version__, "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "steps": steps, "seed": seed, "calibration_prompts": calibration, "verification_prompts": verify,
        "methods": names, "steps_axis": axis, "budget_minutes": budget_minutes, "margin": margin,
        "speed_used_to_choose": ("FLOPs ratio on the calibration prompts" if rank == "flops"
                                 else "median wall-clock ratio on the verification prompts"),
        "search_stopped_by_budget": out_of_time,
        "elapsed_minutes": (time.perf_counter() - started) / 60, "device": str(runner.device),
        "threads": torch.get_num_threads(), "pipeline_kwargs": {k: v for k, v in extra.items()},
    }
    tried = [{"label": e.setting.label, "method": e.setting.method, "config": e.setting.fields(),
              "num_inference_steps": e.setting.steps, "calibration_score": e.score,
              "speedup_flops": e.speedup_flops, "meets": e.meets, "seconds": e.seconds} for e in order]
    result = TuneResult(target, threshold, full_score, chosen, comparison, tried, meta, closest)
    if out is not None:
        write_outputs(result, Path(out))
    return result


def pick(comparison: list[dict], key: str) -> tuple[dict | None, dict | None]:
    """(chosen, closest): the fastest by `key` of the settings that met the target on the calibration
    prompts AND hold it on the verification prompts (marked "chosen"); when none holds, no choice, and
    the verified setting that misses by least, as the closest (marked, never chosen)."""
    candidates = [r for r in comparison if r["calibration_meets"] and r.get("verification_score") is not None]
    holding = [r for r in candidates if r["holds"]]
    chosen = max(holding, key=lambda r: r[key], default=None)
    if chosen is not None:
        chosen["chosen"] = True
        return chosen, None
    verified = [r for r in comparison if r.get("verification_score") is not None]
    closest = min(verified, key=lambda r: (r["misses_by"], -r[key]), default=None)
    if closest is not None:
        closest["closest_not_met"] = True
    return None, closest


def _default_setting(name: str, steps: int) -> Setting | None:
    from specdiff.lab.studies import POLICIES

    if name == FEWER_STEPS:
        return None  # full compute's default is the reference itself
    return Setting(name, POLICIES[name][0](), steps)


def _verify(runner: _Runner, scorer: _Scorer, full: Setting, finalists, prompts, scenes, first_index: int,
            threshold: float, target: Target, bar: bool = True) -> list[dict]:
    """Every finalist and full compute, one prompt at a time, interleaved: metric and wall-clock per prompt."""
    verified = [(e, role) for e, role in finalists if e.meets]  # a default that missed is listed, not re-run
    settings = [full] + [e.setting for e, _ in verified]
    times = {s.label: [] for s in settings}
    images = {s.label: [] for s in settings}
    runner.timed(full, prompts[0], first_index)  # warm-up
    for k, prompt in enumerate(tqdm(prompts, desc="verify", disable=not bar)):
        for setting in settings:
            image, seconds = runner.timed(setting, prompt, first_index + k)
            images[setting.label].append(image)
            times[setting.label].append(seconds)
    reference = torch.cat(images[full.label])
    full_per_prompt = scorer(reference, reference, prompts, scenes)
    if target.relative:  # "full-X" means full compute's score on these prompts, minus X
        threshold = target.threshold(float(np.mean(full_per_prompt)))
    rows = []
    for evaluation, role in finalists:
        label = evaluation.setting.label
        if not evaluation.meets:
            rows.append({
                "label": label, "method": evaluation.setting.method, "role": role,
                "config": evaluation.setting.fields(), "num_inference_steps": evaluation.setting.steps,
                "calibration_score": evaluation.score, "calibration_meets": False,
                "calibration_speedup_flops": evaluation.speedup_flops, "speedup_flops": evaluation.speedup_flops,
                "verification_score": None, "holds": None, "chosen": False,
            })
            continue
        per_prompt = scorer(torch.cat(images[label]), reference, prompts, scenes)
        ratios = np.array(times[full.label]) / np.array(times[label])
        score = float(np.mean(per_prompt))
        rows.append({
            "label": label, "method": evaluation.setting.method, "role": role,
            "config": evaluation.setting.fields(), "num_inference_steps": evaluation.setting.steps,
            "calibration_score": evaluation.score, "calibration_meets": evaluation.meets,
            "calibration_speedup_flops": evaluation.speedup_flops,
            "verification_score": score, "verification_score_ci95": list(_bootstrap(per_prompt)),
            "verification_threshold": threshold,
            "verification_full_score": float(np.mean(full_per_prompt)),
            # paired with full compute on the same prompts: much tighter than the score's own interval
            "verification_difference_to_full_ci95": list(_bootstrap(per_prompt - full_per_prompt)),
            "holds": score >= threshold, "misses_by": max(0.0, threshold - score),
            "speedup_flops": evaluation.speedup_flops,  # counted on the calibration prompts
            "speedup_wallclock_median": float(np.median(ratios)),
            "speedup_wallclock_ci95": list(_bootstrap(ratios, np.median)),
            "seconds_per_image_median": statistics.median(times[label]),
            "full_seconds_per_image_median": statistics.median(times[full.label]),
            "chosen": False,
        })
    return rows


def summary_markdown(result: TuneResult) -> str:
    t, m = result.target, result.meta
    lines = [f"# specdiff tune: {t.text}", ""]
    lines.append(f"Model {m['model']}, {m['steps']} steps, seed {m['seed']}; metric: {METRICS[t.metric]}. "
                 f"Threshold {result.threshold:.3f} (full compute scores {result.full_score:.3f} on the "
                 f"{m['calibration_prompts']} calibration prompts). Verification on {m['verification_prompts']} "
                 f"other prompts, each timed alone, interleaved with full compute; 95 % intervals by bootstrap "
                 f"over prompts. A setting meets the target when its calibration mean clears it by "
                 f"{('one standard error' + (' of its difference to full compute' if t.relative else '')) if m['margin'] == 'auto' else m['margin']}. "
                 f"Chosen by: {m['speed_used_to_choose']}. Caches searched at "
                 f"{', '.join(map(str, m.get('steps_axis', [m['steps']])))} steps (schedules scaled to each count), "
                 "beside plain fewer steps.")
    lines.append("")
    if result.chosen is None and result.closest is not None:
        c = result.closest
        lines.append(f"**No setting held the target on the verification prompts.** Closest, not met: "
                     f"`{c['label']}` — {t.metric} {c['verification_score']:.3f} there, misses by "
                     f"{c['misses_by']:.3f}; {c['speedup_wallclock_median']:.2f}x wall-clock. Nothing is written "
                     "to load: loosen the target, or run it with the closest setting knowingly.")
        lines.append("")
    elif result.chosen is None:
        lines.append("**No setting met the target on the calibration prompts.** Best found per method:")
        lines.append("")
        best = {}
        for row in result.tried:
            if row["method"] not in best or row["calibration_score"] > best[row["method"]]["calibration_score"]:
                best[row["method"]] = row
        for row in best.values():
            lines.append(f"- {row['label']}: {row['calibration_score']:.3f} ({row['speedup_flops']:.2f}x FLOPs)")
        lines.append("")
    else:
        c = result.chosen
        verdict = "holds" if c["holds"] else f"misses by {c['misses_by']:.3f}"
        against = (f" against full compute's {c['verification_full_score']:.3f} there (threshold "
                   f"{c['verification_threshold']:.3f}; difference to full, 95 % CI "
                   f"{c['verification_difference_to_full_ci95'][0]:+.3f} to {c['verification_difference_to_full_ci95'][1]:+.3f})"
                   if t.relative else "")
        lines.append(f"**Chosen: `{c['label']}`** — on the verification prompts {t.metric} "
                     f"{c['verification_score']:.3f} (95 % CI {c['verification_score_ci95'][0]:.3f}-"
                     f"{c['verification_score_ci95'][1]:.3f}){against}; the target {verdict}; "
                     f"{c['speedup_wallclock_median']:.2f}x wall-clock (95 % CI {c['speedup_wallclock_ci95'][0]:.2f}-"
                     f"{c['speedup_wallclock_ci95'][1]:.2f}), {c['speedup_flops']:.2f}x in FLOPs.")
        lines.append("")
    lines.append("| setting | role | calibration score | meets (calib.) | verification score (95 % CI) | holds | "
                 "FLOPs ratio (calib.) | wall-clock speed-up (95 % CI) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in sorted(result.comparison, key=lambda r: (-r["calibration_meets"], -r["speedup_flops"])):
        mark = " **(chosen)**" if r["chosen"] else ""
        if r["verification_score"] is None:
            lines.append(f"| `{r['label']}` | {r['role']} | {r['calibration_score']:.3f} | no | not verified (missed "
                         f"on calibration) | - | {r['speedup_flops']:.2f}x | - |")
            continue
        lo, hi = r["verification_score_ci95"]
        wlo, whi = r["speedup_wallclock_ci95"]
        lines.append(f"| `{r['label']}`{mark} | {r['role']} | {r['calibration_score']:.3f} | "
                     f"{'yes' if r['calibration_meets'] else 'no'} | {r['verification_score']:.3f} ({lo:.3f}-{hi:.3f}) | "
                     f"{'yes' if r['holds'] else 'no'} | {r['speedup_flops']:.2f}x | "
                     f"{r['speedup_wallclock_median']:.2f}x ({wlo:.2f}-{whi:.2f}) |")
    lines.append("")
    front = joint_front(result.tried)
    if front:
        lines.append("The front on the calibration prompts (no other setting tried is both faster in FLOPs and "
                     "better): " + "; ".join(f"`{r['label']}` {r['speedup_flops']:.2f}x, {r['calibration_score']:.3f}"
                                            for r in front) + ".")
        lines.append("")
    lines.append(f"{len(result.tried)} settings tried in {m['elapsed_minutes']:.1f} minutes"
                 + (" (the search stopped at the budget)" if m["search_stopped_by_budget"] else "") + "; all in tuned.json.")
    return "\n".join(lines) + "\n"


def joint_front(tried: list[dict]) -> list[dict]:
    """The settings tried that no other beats on both FLOPs ratio and calibration score, fastest last."""
    front = [r for r in tried if not any(
        o["speedup_flops"] >= r["speedup_flops"] and o["calibration_score"] >= r["calibration_score"]
        and (o["speedup_flops"] > r["speedup_flops"] or o["calibration_score"] > r["calibration_score"])
        for o in tried)]
    return sorted(front, key=lambda r: r["speedup_flops"])


def pareto_figure(result: TuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    methods = sorted({r["method"] for r in result.tried})
    model_steps = result.meta.get("steps")
    markers = "o^sDv<>"
    counts = sorted({r["num_inference_steps"] for r in result.tried if r["method"] != FEWER_STEPS}, reverse=True)
    for i, method in enumerate(methods):
        for k, count in enumerate(counts if method != FEWER_STEPS else [None]):
            rows = [r for r in result.tried if r["method"] == method and count in (None, r["num_inference_steps"])]
            if rows:
                label = method if count in (None, model_steps) else f"{method} on {count} steps"
                ax.scatter([r["speedup_flops"] for r in rows], [r["calibration_score"] for r in rows], s=22,
                           color=f"C{i % 10}", marker=markers[k % len(markers)], label=label)
    front = joint_front(result.tried)
    ax.plot([r["speedup_flops"] for r in front], [r["calibration_score"] for r in front], color="black",
            linewidth=0.8, alpha=0.6, label="front")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c["calibration_speedup_flops"]], [c["calibration_score"]], marker="*", s=260, color="black",
                   label=f"chosen: {c['label']}", zorder=5)
    ax.axhline(result.threshold, color="grey", linestyle="--", linewidth=1, label=f"target {result.target.text}")
    ax.set_xlabel("FLOPs ratio to full compute (calibration prompts)")
    ax.set_ylabel(f"{result.target.metric} (calibration prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: TuneResult, final: Path) -> None:
    """tuned.json, summary.md, pareto.png under `final`, via a temporary folder; tuned.json last."""
    final.mkdir(parents=True, exist_ok=True)
    (final / "tuned.json").unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=final))
    try:
        (work / "summary.md").write_text(summary_markdown(result), encoding="utf-8")
        pareto_figure(result, work / "pareto.png")
        (work / "tuned.json").write_text(json.dumps(result.to_json(), indent=1, allow_nan=False), encoding="utf-8")
        for name in sorted(os.listdir(work), key=lambda n: n == "tuned.json"):
            os.replace(work / name, final / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
