"""The `specdiff` command on the embedded model, and its errors."""

from __future__ import annotations

import json

import pytest

from specdiff.lab.cli import main


def test_generate_compare_prints_speed_and_fidelity_and_saves_images(tmp_path, capsys):
    import re
    import statistics

    code = main([
        "generate", "a large red circle at the top left on a white background", "--steps", "6", "--repeats", "3",
        "--warmup-steps", "2", "--speculative-cfg", "off", "--out", str(tmp_path / "out"), "--quiet", "--summary",
        "--compare",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "speed-up" in out and "PSNR" in out and "SSIM" in out
    assert "sparse" in out  # the per-step summary
    for name in ("reference-full-compute.png", "specdiff.png", "specdiff-native.png", "side_by_side.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # the printed speed-up is the median of the printed per-run ratios
    line = next(l for l in out.splitlines() if l.startswith("speed-up"))
    shown = float(re.search(r"([0-9.]+)x", line).group(1))
    ratios = [float(r) for r in re.search(r"\(([0-9., ]+)\)", line).group(1).split(", ")]
    assert len(ratios) == 3 and shown == pytest.approx(statistics.median(ratios), abs=0.011)


def test_generate_makes_one_image_with_the_method(tmp_path, capsys):
    code = main(["generate", "a small blue ring in the center on a black background", "--steps", "4",
                 "--method", "fora", "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "made" in out and "fora" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fora-native.png", "fora.png"]
    from PIL import Image

    assert Image.open(tmp_path / "out" / "fora.png").size[0] >= 256


def test_words_the_embedded_model_does_not_know_are_named(tmp_path, capsys):
    assert main(["generate", "a photo of a dog", "--steps", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "'dog'" in err and "'photo'" in err and "'a'" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--model", "/no/such/folder"], "no such folder"),
        (["generate", "x", "--cache-ratio", "1.5"], "cache_ratio must be in [0.0, 1.0)"),
        (["generate", "x", "--method", "magic"], "--method must be one of"),
        (["generate", "x", "--method", "ras", "--speculative-steps", "2"], "does not apply"),
        (["generate", "x", "--steps", "0"], "--steps must be at least 1"),
        (["generate", "x", "--method", "fora", "--speculative-cfg", "off"], "does not apply"),
    ],
)
def test_bad_arguments_give_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unsupported_model_folder(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert main(["generate", "x", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "StableDiffusionXLPipeline" in err and "StableDiffusion3Pipeline" in err


def test_local_sd3_folder_loads_offline(tmp_path, capsys):
    from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    code = main([
        "generate", "a cat", "--model", str(tmp_path / "sd3"), "--steps", "5", "--repeats", "1", "--height", "64",
        "--width", "64", "--warmup-steps", "2", "--out", str(tmp_path / "out"), "--quiet",
    ])
    assert code == 0
    assert "StableDiffusion3Pipeline" in capsys.readouterr().out


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("specdiff", "ras", "random", "full"):
        assert name in out


@pytest.mark.parametrize("argv, expected", [
    (["--method", "ras", "--metric", "l2"], "metric='l2'"),
    (["--method", "toca", "--staleness-scale", "1"], "staleness_scale=1.0"),
    (["--method", "specdiff", "--set", "reset_steps=10/20", "--set", "speculative_cfg=true"],
     "reset_steps=(10, 20)"),
    (["--method", "specdiff-study", "--tap-include-text", "on"], "tap_include_text=True"),
])
def test_generate_accepts_every_config_field(argv, expected):
    from specdiff.lab.cli import _build_config, build_parser

    args = build_parser().parse_args(["generate", "x", *argv])
    assert expected in repr(_build_config(args))


def test_every_config_field_has_a_generate_option():
    import dataclasses

    from specdiff.lab.cli import build_parser
    from specdiff.policies.registry import POLICIES

    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for config_type, _ in POLICIES.values():
        for field in dataclasses.fields(config_type):
            assert "--" + field.name.replace("_", "-") in help_text


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["methods", "--help"]])
def test_help_imports_neither_torch_nor_diffusers(argv):
    """`specdiff --help` stays fast: measured by what it imports, not by a wall-clock race."""
    import subprocess
    import sys

    code = ("import sys\nfrom specdiff.lab.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'})\n"
            "print('HEAVY', heavy)") % (argv,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-500:]


def test_settings_that_cache_nothing_are_named(tmp_path, capsys):
    assert main(["generate", "a red circle on a white background", "--steps", "3", "--warmup-steps", "5",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "nothing is cached" in err and "Loading" not in err


def test_every_option_has_help_text():
    from specdiff.lab.cli import build_parser

    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (sub.prog, action.option_strings)


def test_unknown_words_come_with_a_suggestion(tmp_path, capsys):
    from specdiff.lab.embedded.scenes import suggestion

    assert suggestion("big") == "large" and suggestion("upper") == "top" and suggestion("circel") == "circle"
    assert suggestion("dog") is None
    assert main(["generate", "a big red circel at the upper left", "--steps", "2", "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "'big' (did you mean 'large'?)" in err and "'upper' (did you mean 'top'?)" in err
    assert "'circel' (did you mean 'circle'?)" in err


def test_progress_bars_are_labelled_and_the_model_line_names_the_model_as_given(tmp_path, capsys):
    code = main(["generate", "a small blue ring in the center on a black background", "--model", "embedded-v2",
                 "--steps", "3", "--compare", "--repeats", "1", "--method", "fora", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    model_line = next(line for line in captured.out.splitlines() if line.startswith("model:"))
    assert model_line.startswith("model: embedded-v2 scene model;") and "/" not in model_line.split(";")[0]
    for label in ("warm-up", "full compute 1/1", "fora 1/1"):
        assert f"{label}:" in captured.err, label


def test_a_busy_machine_gets_fewer_threads_and_says_so(monkeypatch, tmp_path, capsys):
    import psutil
    import torch

    from specdiff.lab.cli import threads_for_a_busy_machine

    assert threads_for_a_busy_machine(2, busy=0.2, cores=2) is None
    assert threads_for_a_busy_machine(2, busy=1.0, cores=2)[0] == 1
    assert threads_for_a_busy_machine(8, busy=5.0, cores=8)[0] == 3
    assert threads_for_a_busy_machine(1, busy=9.0, cores=2) is None  # one thread is the least
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 90.0)  # others use 90 % of every core
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["generate", "a small blue ring in the center on a black background", "--steps", "2",
                     "--device", "cpu", "--out", str(tmp_path / "out"), "--quiet"]) == 0
        assert "the machine is busy (other work uses 3.6 of 4 cores)" in capsys.readouterr().err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_named_model_is_in_the_help_and_the_default_is_one_place():
    from specdiff.lab.evaluation.bench_args import MODEL_CHOICES, build_parser
    from specdiff.lab.loading import DEFAULT_MODEL, NAMED_MODELS

    assert all(name in MODEL_CHOICES for name in NAMED_MODELS)
    assert MODEL_CHOICES.startswith(f"{DEFAULT_MODEL} (the default)")
    assert build_parser().parse_args([]).model == DEFAULT_MODEL


def test_the_readme_main_command_shows_a_representative_image_on_the_default_model():
    """The first thing a newcomer runs: on the default model the README's prompt, full compute against
    SpecDiff's defaults at 28 steps and seed 0 (as `generate --compare` runs it). The accelerated image
    must read as the same scene as full compute's (the model's own checker) — on the 32 px v1 model it
    lost an object and the background (PSNR 11.5 dB), a worst case rather than a first impression."""
    import re
    from pathlib import Path

    import torch

    import specdiff
    from specdiff.lab.embedded.alignment import strict_hits
    from specdiff.lab.embedded.checker import load_checker, read_images
    from specdiff.lab.embedded.scenes import parse_caption
    from specdiff.lab.evaluation.metrics import psnr
    from specdiff.lab.loading import load_pipeline

    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("needs the repository's README")
    prompt = re.search(r'specdiff generate --compare "([^"]+)"', readme.read_text()).group(1)
    pipe, _ = load_pipeline(None, "cpu")
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(prompt, num_inference_steps=28, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="pt").images

    full = image()
    with specdiff.accelerated(pipe, specdiff.SpecDiffConfig()):
        accelerated = image()
    checker, asked = load_checker(pipe.style), parse_caption(prompt)
    seen_full, seen_accelerated = read_images(checker, torch.cat([full, accelerated]))
    assert strict_hits(asked, seen_accelerated) == strict_hits(asked, seen_full)
    assert psnr(full[0], accelerated[0]) > 20
