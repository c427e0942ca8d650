"""`specdiff tune`: the search, tuned.json, its errors, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from specdiff.engine.policy import ConfigError
from specdiff.lab.evaluation.tune import (
    FEWER_STEPS,
    KNOBS,
    STUDY_KNOBS,
    Setting,
    SpeedKnob,
    _KnobSearch,
    load_config,
    parse_target,
    save_config,
    tunable_methods,
    tune,
)
from specdiff.lab.studies import POLICIES

PROMPTS = ["a red fox in the snow", "a city street at night", "a bowl of fruit on a table", "a sailing boat at sea"]


def _search_until_done(search: _KnobSearch, meets) -> list:
    values = []
    while (step := search.next_setting()) is not None:
        setting, position = step
        value = setting.steps
        values.append(value)
        if position is not None:
            search.record(position, meets(value))
    return values


@pytest.mark.parametrize("planted", [0.37, 0.62, 0.9])
def test_bisection_finds_a_planted_float_threshold(planted):
    knob = SpeedKnob("x", 0.2, 0.97)
    make = lambda value, extra: Setting("synthetic", None, value)  # the value rides in `steps` here
    search = _KnobSearch("synthetic", make, knob, default_position=None, alternatives={})
    values = _search_until_done(search, lambda v: v <= planted)
    best = search.value(search.passing)
    assert best <= planted and planted - best < 0.03 * (knob.fastest - knob.slowest) + 1e-9
    assert len(values) <= 8  # bisection, not a grid


@pytest.mark.parametrize("planted", [2, 5, 9, 10])
def test_bisection_finds_a_planted_integer_threshold_exactly(planted):
    knob = SpeedKnob("interval", 2, 10, integer=True)
    make = lambda value, extra: Setting("synthetic", None, value)
    search = _KnobSearch("synthetic", make, knob, default_position=(3 - 2) / 8, alternatives={})
    values = _search_until_done(search, lambda v: v <= planted)
    assert search.value(search.passing) == planted
    assert len(values) == len(set(values)) <= 6


def test_bisection_on_a_decreasing_knob_and_a_method_that_never_meets():
    knob = SpeedKnob("steps", 28, 2, integer=True)  # fewer steps = faster
    make = lambda value, extra: Setting(FEWER_STEPS, None, value)
    search = _KnobSearch(FEWER_STEPS, make, knob, default_position=None, alternatives={})
    search.record(0.0, True)
    _search_until_done(search, lambda steps: steps >= 11)
    assert search.value(search.passing) == 11
    never = _KnobSearch("x", make, knob, default_position=None, alternatives={})
    assert _search_until_done(never, lambda steps: False) == [28]  # the slowest value fails: stop
    assert never.passing is None


def test_every_method_has_a_knob_inside_its_allowed_range():
    table = {**KNOBS, **STUDY_KNOBS}
    for name, (config_type, _) in POLICIES.items():
        if name == "full":
            assert name not in table and FEWER_STEPS in tunable_methods()  # fewer steps is its knob
            continue
        knob, alternatives = table[name]
        for value in (knob.slowest, knob.fastest):
            config_type(**{knob.field: value})  # raises if outside the validated range
        for field, values in alternatives.items():
            for value in values:
                config_type(**{field: value})


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_tuned_json_round_trip_for_every_registered_config(tmp_path, name):
    config_type = POLICIES[name][0]
    changed = {}
    for field in dataclasses.fields(config_type):  # a non-default value where one is easy to make
        value = getattr(config_type(), field.name)
        if isinstance(value, bool):
            changed[field.name] = not value
        elif isinstance(value, tuple):
            changed[field.name] = (3, 7)
    for config in (config_type(), config_type(**changed)):
        save_config(config, tmp_path / "tuned.json", num_inference_steps=20)
        with pytest.warns(UserWarning, match="runs 20 steps"):  # the step count is not in the config
            loaded = load_config(tmp_path / "tuned.json")
        assert type(loaded) is config_type and loaded == config


def test_targets_parse_and_bad_ones_name_the_problem():
    assert parse_target("psnr>=30").value == 30 and not parse_target("psnr>=30").relative
    relative = parse_target("alignment>=full-2")
    assert relative.relative and relative.threshold(80.0) == 78.0
    assert parse_target("alignment>=0.9").value == pytest.approx(90.0)  # a fraction means percent
    assert parse_target(" clip >= full-0.5 ").threshold(30.0) == 29.5
    for text, words in (("lpips>=0.1", "unknown metric"), ("psnr>30", "METRIC>=VALUE"), ("psnr>=", "METRIC>=VALUE"),
                        ("psnr>=full-2", "measured against full compute"), ("clip>=full+1", "full-X")):
        with pytest.raises(ConfigError, match=words):
            parse_target(text)


def test_bad_tuned_files_are_refused_in_one_line(tmp_path):
    cases = {
        "notjson.json": ("{", "not a JSON file"),
        "nomethod.json": (json.dumps({"config": {}}), "expected an object"),
        "unknown.json": (json.dumps({"method": "magic", "config": {}}), "not one of"),
        "field.json": (json.dumps({"method": "fora", "config": {"speed": 2}}), "has no field 'speed'"),
        "range.json": (json.dumps({"method": "fora", "config": {"interval": 0}}), "interval"),
        "unmet.json": (json.dumps({"method": None, "met": False, "target": "psnr>=99"}), "no setting that met"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=words) as error:
            load_config(tmp_path / name)
        assert "\n" not in str(error.value) and name in str(error.value)


@pytest.fixture(scope="module")
def tiny_sd3():
    from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


def test_tune_errors_before_any_search(tiny_sd3):
    kwargs = dict(calibration=2, verify=2, steps=4, methods=["fora"], pipeline_kwargs=dict(height=64, width=64),
                  progress=False)
    with pytest.raises(ConfigError, match="hold 3, but --calibration 2 \\+ --verify 2 need 4"):
        tune(tiny_sd3, PROMPTS[:3], "psnr>=20", **kwargs)
    with pytest.raises(ConfigError, match="alignment is measured on the embedded scene models"):
        tune(tiny_sd3, PROMPTS, "alignment>=full-2", **kwargs)
    with pytest.raises(ConfigError, match="needs --clip-model"):
        tune(tiny_sd3, PROMPTS, "clip>=full-0.5", **kwargs)
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        tune(tiny_sd3, PROMPTS, "psnr>=20", **{**kwargs, "methods": ["magic"]})
    with pytest.raises(ConfigError, match="--budget 0.0001 minutes is too small"):
        tune(tiny_sd3, PROMPTS, "psnr>=20", **{**kwargs, "budget_minutes": 0.0001})


def test_tune_refuses_a_target_full_compute_cannot_meet():
    from specdiff.lab.evaluation.benchmark import load_bench_pipeline

    pipe, extra = load_bench_pipeline("embedded", "cpu")
    with pytest.raises(ConfigError, match="full compute itself scores"):
        tune(pipe, None, "alignment>=0.999", calibration=2, verify=1, steps=2, methods=["fora"], progress=False,
             pipeline_kwargs=extra)


def test_tiny_end_to_end_tune_writes_a_config_that_loads_and_verifies(tiny_sd3, tmp_path):
    result = tune(tiny_sd3, PROMPTS, "psnr>=25", calibration=2, verify=2, steps=6, methods=["fora", FEWER_STEPS],
                  budget_minutes=5, out=tmp_path, pipeline_kwargs=dict(height=64, width=64), progress=False)
    saved = json.loads((tmp_path / "tuned.json").read_text())
    assert {p.name for p in tmp_path.iterdir()} == {"tuned.json", "summary.md", "pareto.png"}
    assert saved["met"] and saved["target"] == "psnr>=25" and saved["library_version"] and saved["date"]
    chosen = result.chosen
    assert chosen["calibration_score"] >= 25 and chosen["calibration_meets"]
    # the reported result is the verification one, with its interval, never the calibration score
    assert saved["verification"]["verification_score"] == pytest.approx(chosen["verification_score"])
    low, high = chosen["verification_score_ci95"]
    assert low <= chosen["verification_score"] <= high
    assert chosen["holds"] == (chosen["verification_score"] >= 25)
    # the pick is at least as fast (FLOPs, calibration) as every passing setting tried
    assert chosen["calibration_speedup_flops"] >= max(t["speedup_flops"] for t in result.tried if t["meets"]) - 1e-9
    import specdiff

    tuned = specdiff.load_tuned(tmp_path / "tuned.json")
    assert tuned.config == result.config and tuned.num_inference_steps == result.steps == saved["num_inference_steps"]
    assert tuned.reference_steps == 6
    assert len(result.tried) >= 3 and any(r["role"] == "default" or "default" in r["role"] for r in result.comparison)
    # the search is joint: FORA was searched on 6 and on 3 steps (the default axis), its warm-up scaled
    assert saved["steps_axis"] == [6, 3]
    on_three = [r for r in result.tried if r["method"] == "fora" and r["num_inference_steps"] == 3]
    assert on_three and all(r["label"].endswith("steps=3") for r in on_three)
    assert all(r["config"] == {"interval": int(r["label"].split("interval=")[1].split(",")[0])} if "interval=" in
               r["label"] else r["config"] == {"interval": 3} for r in on_three)


def test_a_method_searched_on_fewer_steps_has_its_schedule_scaled():
    from specdiff.lab.evaluation.tune import _make_setting

    make, knob, default = _make_setting("specdiff", 14, 28)
    setting = make(0.8, {})
    assert setting.config.warmup_steps == 2 and setting.config.cache_ratio == 0.8  # 4 of 28 -> 2 of 14
    assert setting.label == "specdiff:cache_ratio=0.8,steps=14"
    # a secondary value is written for the model's steps and scaled with the rest: warm-up 6 of 28 -> 3 of 14
    assert make(0.8, {"warmup_steps": 6}).config.warmup_steps == 3
    assert make(0.8, {"warmup_steps": 6}).label == "specdiff:warmup_steps=3,cache_ratio=0.8,steps=14"
    assert _make_setting("specdiff", 28, 28)[0](0.8, {}).label == "specdiff:cache_ratio=0.8"
    # the label reads back in bench as the same config
    from specdiff.lab.evaluation.methods import parse_method

    spec = parse_method(make(0.8, {"warmup_steps": 6}).label)
    assert spec.config == make(0.8, {"warmup_steps": 6}).config and spec.steps == 14


def test_generate_uses_a_tuned_file_and_refuses_mixed_options(tmp_path, capsys):
    from specdiff.lab.cli import main
    from specdiff.policies.fora import FORAConfig

    save_config(FORAConfig(interval=4), tmp_path / "tuned.json", num_inference_steps=5)
    code = main(["generate", "a small blue ring in the center on a black background", "--config",
                 str(tmp_path / "tuned.json"), "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "FORAConfig(interval=4)" in out
    code = main(["generate", "x", "--config", str(tmp_path / "tuned.json"), "--method", "ras", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--config" in err and "--method" in err and err.count("\n") == 1


def test_auto_margin_is_one_standard_error_of_the_calibration_mean():
    import numpy as np

    from specdiff.lab.evaluation.tune import _margin

    values = np.array([28.0, 30.0, 32.0, 34.0])
    assert _margin(values, "auto") == pytest.approx(np.std(values, ddof=1) / 2)
    assert _margin(values, 0.5) == 0.5 and _margin(values[:1], "auto") == 0.0
    # relative targets: the paired difference to full compute, here constant, so no margin
    assert _margin(values, "auto", reference=values + 2.0) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="--margin"):
        tune(object(), PROMPTS, "psnr>=20", margin="wide")


def test_relative_targets_are_rebased_on_full_computes_score_on_the_verification_prompts():
    from specdiff.lab.evaluation.benchmark import load_bench_pipeline

    pipe, extra = load_bench_pipeline("embedded", "cpu")
    result = tune(pipe, None, "alignment>=full-100", calibration=2, verify=2, steps=3, methods=["fora"],
                  progress=False, pipeline_kwargs=extra)
    chosen = result.chosen
    assert chosen["verification_threshold"] == pytest.approx(chosen["verification_full_score"] - 100)
    low, high = chosen["verification_difference_to_full_ci95"]
    assert low <= chosen["verification_score"] - chosen["verification_full_score"] <= high and chosen["holds"]


def _row(label, meets, score, threshold, speed, role="tuned"):
    return {"label": label, "role": role, "calibration_meets": meets, "verification_score": score,
            "holds": None if score is None else score >= threshold,
            "misses_by": None if score is None else max(0.0, threshold - score),
            "calibration_speedup_flops": speed, "speedup_wallclock_median": speed, "chosen": False}


def test_tune_never_chooses_a_setting_that_failed_its_verification():
    """Planted as in a real run: fewer steps fastest but 0.11 below the target on the verification
    prompts, TaylorSeer and SpecDiff slower and holding: the fastest that holds is chosen."""
    from specdiff.lab.evaluation.tune import pick

    rows = [_row("full:steps=7", True, 29.89, 30.0, 3.57), _row("taylorseer:interval=3", True, 35.99, 30.0, 2.20),
            _row("specdiff-study:importance=change", True, 31.82, 30.0, 1.61),
            _row("fora", False, 29.9, 30.0, 2.31, role="default")]
    chosen, closest = pick(rows, "calibration_speedup_flops")
    assert chosen["label"] == "taylorseer:interval=3" and chosen["chosen"] and closest is None
    assert not rows[0]["chosen"]
    # none holds: nothing is chosen; the one missing by least is the closest, marked as not met
    failing = [_row("full:steps=7", True, 29.89, 30.0, 3.57), _row("fora", True, 29.5, 30.0, 2.3)]
    chosen, closest = pick(failing, "calibration_speedup_flops")
    assert chosen is None and closest["label"] == "full:steps=7" and closest["closest_not_met"]
    assert not any(r["chosen"] for r in failing)


def test_a_tune_with_no_holding_setting_writes_nothing_to_load(tmp_path):
    from specdiff.lab.evaluation.tune import TuneResult, parse_target

    closest = _row("full:steps=7", True, 29.89, 30.0, 3.57)
    closest.update(method="full", config={}, num_inference_steps=7)
    result = TuneResult(parse_target("psnr>=30"), 30.0, 100.0, None, [closest], [], {}, closest)
    record = result.to_json()
    assert record["met"] is False and record["method"] is None
    assert record["closest_not_met"]["label"] == "full:steps=7" and record["closest_not_met"]["misses_by"] > 0
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="no setting that met"):
        load_config(path)


def test_tune_chooses_a_cache_on_fewer_steps_when_it_is_the_fastest_that_holds(monkeypatch, tiny_sd3):
    """Planted quality: plain fewer steps meets psnr>=25 down to 15 of 28 steps (1.87x); FORA on 28 steps
    up to interval 3 (3x); FORA on 14 steps up to interval 4 (8x). The joint search finds the last and
    the verification keeps it."""
    import torch

    from specdiff.lab.evaluation import tune as tune_module

    def planted(setting):  # (PSNR against full compute, FLOPs as a share of full compute's)
        if setting.config is None:
            return 10.0 + setting.steps, setting.steps / 28
        interval = setting.config.interval
        if setting.steps == 28:
            return 40.0 - 4 * interval, 1 / interval
        return 38.0 - 3 * interval, 1 / (2 * interval)

    def images(setting, count):
        quality, _ = planted(setting)
        offset = 0.0 if setting.config is None and setting.steps == 28 else 10 ** (-quality / 20)
        return torch.full((count, 3, 8, 8), 0.5 + offset)

    def run(self, setting, prompts, first_index, count_flops=True):
        return images(setting, len(prompts)), int(1e9 * planted(setting)[1]), 0.001 * len(prompts)

    def timed(self, setting, prompt, index):
        return images(setting, 1), 0.001 * planted(setting)[1]

    monkeypatch.setattr(tune_module._Runner, "run", run)
    monkeypatch.setattr(tune_module._Runner, "timed", timed)
    result = tune(tiny_sd3, PROMPTS, "psnr>=25", calibration=2, verify=2, steps=28, methods=["fora", FEWER_STEPS],
                  margin=0.0, progress=False, steps_axis=[28, 14])
    assert result.chosen["label"] == "fora:interval=4,steps=14" and result.chosen["holds"]
    assert result.steps == 14 and result.config.interval == 4
    labels = {r["label"] for r in result.comparison}
    assert {"fora", "full:steps=15", "fora:interval=4,steps=14"} <= labels  # default, plain steps, joint
    front = tune_module.joint_front(result.tried)
    assert front[-1]["speedup_flops"] >= 8 - 1e-6 and "steps=14" in front[-1]["label"]
    # with the caches searched on 28 steps only, the same search picks FORA interval 3
    only = tune(tiny_sd3, PROMPTS, "psnr>=25", calibration=2, verify=2, steps=28, methods=["fora", FEWER_STEPS],
                margin=0.0, progress=False, steps_axis="none")
    assert only.chosen["label"] == "fora" and only.config.interval == 3 and only.steps == 28


def test_steps_axis_is_parsed_and_bad_ones_are_named():
    from specdiff.lab.evaluation.tune import parse_steps_axis

    assert parse_steps_axis(None, 28) == [28, 14] and parse_steps_axis("none", 28) == [28]
    assert parse_steps_axis("10, 28,10", 28) == [28, 10]
    for bad in ("", "abc", "1", "29", "14;7"):
        with pytest.raises(ConfigError, match="--steps-axis"):
            parse_steps_axis(bad, 28)


def test_a_loaded_tuned_setting_carries_its_step_count(tmp_path):
    """A tuned "7 plain steps" loads with its step count (load_tuned), and load_config says that the
    step count is not in the config it returns."""
    import specdiff
    from specdiff.policies.full import FullComputeConfig

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": "specdiff-tuned/1", "method": "full", "config": {}, "num_inference_steps": 7,
                                "steps": 28, "model": "embedded", "met": True}))
    tuned = specdiff.load_tuned(path)
    assert tuned == specdiff.TunedSetting(FullComputeConfig(), 7, "embedded", 28)
    with pytest.warns(UserWarning, match="runs 7 steps \\(the model's own: 28\\); pass num_inference_steps=7"):
        assert specdiff.load_config(path) == FullComputeConfig()


def test_compare_runs_full_compute_at_the_models_steps_and_the_tuned_setting_at_its_own(tmp_path, capsys):
    """A tuned "3 plain steps of 6": --compare times full compute on 6 steps against 3, so the speed-up
    and PSNR are those of fewer steps (before: both ran 3 steps, 1.0x and PSNR inf)."""
    import re

    from specdiff.lab.cli import main

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": "specdiff-tuned/1", "method": "full", "config": {}, "num_inference_steps": 3,
                                "steps": 6, "model": "embedded", "met": True}))
    code = main(["generate", "a large red circle at the top left on a white background", "--config", str(path),
                 "--compare", "--repeats", "1", "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"full compute : .*\(6 steps\)", out) and re.search(r"\n\w+\s*: .*\(3 steps", out)
    psnr = float(re.search(r"PSNR ([0-9.]+|inf) dB", out).group(1))
    assert psnr < 60  # two different step counts: not the same image
    assert "speculation" not in out  # full compute never speculates


def test_save_config_never_writes_a_file_load_config_refuses_or_reads_differently(tmp_path):
    from specdiff.policies.fora import FORAConfig
    from specdiff.policies.specdiff import SpecDiffConfig

    @dataclasses.dataclass(frozen=True)
    class MySpecDiff(SpecDiffConfig):  # not registered: would load back as SpecDiffConfig
        pass

    path = tmp_path / "tuned.json"
    for config, steps, message in [(FORAConfig(), 0, "num_inference_steps"), (FORAConfig(), True, "num_inference_steps"),
                                   (MySpecDiff(), None, "would load back as SpecDiffConfig"),
                                   ({"method": "fora"}, None, "must be a specdiff config")]:
        with pytest.raises(ConfigError, match=message):
            save_config(config, path, num_inference_steps=steps)
        assert not path.exists()
    save_config(FORAConfig(interval=5), path)
    assert load_config(path) == FORAConfig(interval=5)
