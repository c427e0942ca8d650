"""The benchmark runner: smoke run on a tiny pipeline, and sharding over 2 processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from specdiff.lab.cli import main

ARGS = ["--model", "tiny-sd3", "--methods", "full", "fora", "specdiff:cache_ratio=0.5,warmup_steps=1",
        "--num-prompts", "3", "--batch-size", "1", "--steps", "4"]


def test_bench_writes_every_artefact(tmp_path, capsys):
    assert main(["bench", *ARGS, "--out", str(tmp_path)]) == 0
    for name in ("results.json", "results.md", "pareto.png", "grid.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    methods = [row["method"] for row in data["summary"]]
    assert methods == ["full", "fora", "specdiff:cache_ratio=0.5,warmup_steps=1"]
    full = data["summary"][0]
    assert full["flops_ratio"] == 1.0 and full["speedup_wallclock_median"] == 1.0
    fora = data["summary"][1]
    assert fora["flops_ratio"] > 1.2  # FORA skips blocks at 2 of 4 steps
    assert sorted(i for b in data["batches"] if b["method"] == "full" for i in b["prompt_indices"]) == [0, 1, 2]
    assert "| fora |" in capsys.readouterr().out


def test_results_json_is_strict_json_and_the_folder_is_printed(tmp_path, capsys):
    # full compute against itself: PSNR is infinite, written as null with the reason beside it
    assert main(["bench", "--model", "tiny-sd3", "--methods", "full", "--num-prompts", "1", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.json").read_text()

    def refuse(token):
        raise ValueError(f"non-standard JSON number {token}")

    data = json.loads(text, parse_constant=refuse)
    assert data["summary"][0]["psnr_mean"] is None and "identical" in data["summary"][0]["psnr_mean_why"]
    assert f"results in {tmp_path}" in capsys.readouterr().out


def test_full_compute_with_fewer_steps_is_a_baseline(tmp_path):
    assert main(["bench", "--model", "tiny-sd3", "--methods", "full", "full:steps=2", "--num-prompts", "1",
                 "--batch-size", "1", "--steps", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert rows[1]["method"] == "full:steps=2"
    assert rows[1]["flops_ratio"] == pytest.approx(2.0, rel=0.01)  # half the steps, half the transformer FLOPs
    assert rows[1]["psnr_mean"] < 100  # a different image from the 4-step one


def test_bad_method_spec_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--model", "tiny-sd3", "--methods", "specdiff:cache_ratio=2", "--out", str(tmp_path)]) == 2
    assert "cache_ratio must be in" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny-sd3", "--methods", "full:steps=0", "--out", str(tmp_path)]) == 2
    assert "steps=N" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny-sd3", "--methods", "specdiff:reset_steps=(12,22)", "--out", str(tmp_path)]) == 2
    assert "reset_steps=12/22" in capsys.readouterr().err


def test_two_processes_give_the_same_numbers_as_one(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["bench", *ARGS, "--out", str(single)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as probe:  # a free port: a fixed one can still be held by an earlier run
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "specdiff.lab.evaluation.benchmark", *ARGS, "--out", str(sharded)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    one = json.loads((single / "results.json").read_text())
    two = json.loads((sharded / "results.json").read_text())
    assert two["meta"]["processes"] == 2
    done = sorted(i for b in two["batches"] if b["method"] == "full" for i in b["prompt_indices"])
    assert done == [0, 1, 2]  # no prompt lost or done twice
    for a, b in zip(one["summary"], two["summary"]):
        assert a["method"] == b["method"]
        assert (a["psnr_mean"] is None and b["psnr_mean"] is None) or a["psnr_mean"] == pytest.approx(b["psnr_mean"], rel=1e-6)
        assert a["ssim_mean"] == pytest.approx(b["ssim_mean"], rel=1e-6)
        assert a["flops_per_image"] == b["flops_per_image"]


def test_diffusers_peer_runs_in_the_same_table(tmp_path):
    peer = "diffusers-taylorseer:cache_interval=3,disable_cache_before_step=2"
    assert main(["bench", "--model", "tiny-sd3", "--methods", "full", peer, "--num-prompts", "1",
                 "--batch-size", "1", "--steps", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert rows[1]["method"] == peer
    assert rows[1]["flops_ratio"] > 1.3  # its hooks really skipped work
    assert rows[1]["psnr_mean"] > 20


def test_peer_refuses_what_it_cannot_run(tmp_path, capsys):
    from specdiff.lab.evaluation.methods import parse_method
    from specdiff.lab.evaluation.peers import diffusers_cache
    from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

    spec = parse_method("diffusers-fbc:threshold=0.1")
    with pytest.raises(ValueError, match="FLUX only"):
        with diffusers_cache(tiny_sd3_pipeline(), *spec.peer):
            pass


def test_cache_dit_peer_runs_and_is_removed(tmp_path):
    import torch

    from specdiff.lab.evaluation.peers import diffusers_cache
    from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a cat", num_inference_steps=8, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run()
    with diffusers_cache(pipe, "cache-dit-dbcache", {"residual_diff_threshold": 10.0, "max_warmup_steps": 2}):
        cached = run()
    assert not torch.equal(cached, plain)  # it skipped blocks
    assert torch.equal(run(), plain)  # and is gone afterwards
    assert "forward" not in vars(pipe.transformer)


def test_cache_dit_on_the_embedded_pipeline_leaves_it_clean():
    from specdiff.lab.evaluation.peers import diffusers_cache
    from specdiff.lab.embedded.pipeline import load_scene_pipeline

    pipe = load_scene_pipeline()
    with diffusers_cache(pipe, "cache-dit-dbcache", {}):
        pass
    assert "forward" not in vars(pipe.transformer)


def test_prompt_file_clip_score_and_saved_images(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from specdiff.lab.evaluation.clip_score import ClipScorer
    from specdiff.lab.tiny_pipelines import save_tiny_clip

    save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue car\na green tree\n")
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny-sd3", "--methods", "full", "fora", "--num-prompts", "3", "--batch-size", "2",
                 "--steps", "4", "--prompts", str(prompts), "--clip-model", str(tmp_path / "clip"), "--save-images",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert all(0.0 <= row["clip_score"] <= 100.0 for row in data["summary"])
    full, fora = data["summary"]
    assert abs(full["clip_fd_to_full"]) < 1e-6 < fora["clip_fd_to_full"]  # full compute against itself: zero
    # the table's score is each saved image scored against its own prompt line
    saved = sorted((out / "images" / "full").glob("*.png"))
    assert [p.name for p in saved] == ["00000.png", "00001.png", "00002.png"]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in saved])).permute(0, 3, 1, 2) / 255.0
    scores = ClipScorer(str(tmp_path / "clip")).score(images, ["a red fox", "a blue car", "a green tree"])
    assert data["summary"][0]["clip_score"] == pytest.approx(float(scores.mean()), abs=1e-4)


def test_missing_clip_model_or_short_prompt_file_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny-sd3", "--clip-model", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "--clip-model" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n")
    assert main(["bench", "--model", "tiny-sd3", "--prompts", str(prompts), "--num-prompts", "2", "--out", str(out)]) == 2
    assert "has 1 prompts" in capsys.readouterr().err
    assert not out.exists()


def test_other_sizes_skip_the_checker_and_bad_sizes_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--model", "embedded", "--methods", "full", "specdiff:speculative_steps=0", "--num-prompts",
                 "1", "--steps", "4", "--height", "48", "--width", "32", "--out", str(out)]) == 0
    assert "checker reads 32 x 32 scenes only" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert (data["meta"]["height"], data["meta"]["width"]) == (48, 32)
    assert "align_exact_scene" not in data["summary"][0]
    bad = tmp_path / "bad"
    assert main(["bench", "--model", "embedded", "--methods", "full", "--num-prompts", "1", "--height", "33", "--out",
                 str(bad)]) == 2
    assert "--height must be a positive multiple of 2" in capsys.readouterr().err
    assert main(["bench", "--methods", "full", "--height", "0", "--out", str(bad)]) == 2
    assert not bad.exists()


class StandInInception(torch.nn.Module):
    """Same call as the TorchScript inception-2015-12-05.pt (uint8 in, features out); not the real network."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 3 images: the covariances are singular
def test_fid_against_real_images_or_full_compute(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    network = tmp_path / "inception.pt"
    torch.jit.script(StandInInception()).save(str(network))
    common = ["--model", "tiny-sd3", "--methods", "full", "fora", "--num-prompts", "3", "--batch-size", "3",
              "--steps", "4"]
    assert main(["bench", *common, "--save-images", "--out", str(tmp_path / "first")]) == 0
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(noise / f"{i}.png")

    def fid_rows(*extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert main(["bench", *common, "--fid-inception", str(network), *extra, "--out", str(out)]) == 0
        return json.loads((out / "results.json").read_text())["summary"]

    against_full = fid_rows()
    assert abs(against_full[0]["fid"]) < 1e-6  # full compute against itself
    same_images = fid_rows("--fid-reference", str(tmp_path / "first" / "images" / "full"))
    assert abs(same_images[0]["fid"]) < 1e-6  # the same images, read back from PNG
    against_noise = fid_rows("--fid-reference", str(noise))
    assert against_noise[0]["fid"] > 1.0
    assert main(["bench", *common, "--fid-reference", str(noise), "--out", str(tmp_path / "bad")]) == 2
    assert "--fid-reference needs --fid-inception" in capsys.readouterr().err
    assert main(["bench", *common, "--fid-inception", str(tmp_path / "none.pt"), "--out", str(tmp_path / "bad")]) == 2
    assert "never downloads" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_scene_prompts_get_the_strict_metric_with_its_chance_level(tmp_path, capsys):
    prompts = tmp_path / "scenes.txt"
    prompts.write_text("a large red circle at the top left on a white background\n"
                       "a small blue ring at the right and a large green square at the top left on a black background\n")
    assert main(["bench", "--methods", "full", "--prompts", str(prompts), "--num-prompts", "2", "--steps", "3",
                 "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "results.json").read_text())["summary"][0]
    for key in ("align_exact_scene", "align_colour", "align_unasked_per_image", "align_lenient_mean",
                "align_chance_exact_scene"):
        assert 0 <= row[key] <= 9, key
    assert "exact scene" in capsys.readouterr().out
    prose = tmp_path / "prose.txt"
    prose.write_text("a photo of a dog\na red fox\n")
    assert main(["bench", "--methods", "full", "--prompts", str(prose), "--num-prompts", "2", "--steps", "2",
                 "--out", str(tmp_path / "prose")]) == 0
    assert "not scene captions" in capsys.readouterr().out


def test_a_peer_that_cannot_run_is_refused_before_any_generation(tmp_path, capsys, monkeypatch):
    import specdiff.lab.evaluation.benchmark as bench

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before refusing")

    monkeypatch.setattr(bench, "run_shard", no_generation)
    assert main(["bench", "--methods", "full", "diffusers-fbc", "--num-prompts", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specdiff: error: diffusers-fbc") and "CacheMixin" in err and "\n" not in err


def test_other_libraries_log_lines_are_held_back_and_reported(tmp_path, capsys):
    assert main(["bench", "--model", "tiny-sd3", "--methods", "full", "cache-dit-dbcache", "--num-prompts", "1",
                 "--steps", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[Cache-DiT]" not in out and "held back" in out
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert any("cache_dit" in key for key in meta["library_messages"])


@pytest.mark.parametrize("preset", ["tiny", "tiny-flux"])
def test_per_call_engine_benchmark_runs_at_tiny_size(preset, tmp_path, capsys):
    """The per-call benchmark (SD3-medium / FLUX-dev shapes on a real run) through the same code at a tiny size."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_speed.py"
    spec = importlib.util.spec_from_file_location("engine_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--preset", preset, "--repeats", "1", "--calls", "2", "--ratios", "0.5", "0.9",
                        "--device", "cpu", "--out", str(tmp_path / "calls.json")])
    names = [r["method"] for r in rows]
    per_ratio = ["tapped", "tapped, both CFG halves", "untapped"] if preset == "tiny" else ["tapped", "untapped"]
    assert names == ["stock"] + [f"specdiff {ratio} {kind}" for ratio in ("0.5", "0.9") for kind in per_ratio]
    by = {r["method"]: r for r in rows}
    if preset == "tiny":  # a CFG batch: the default's conditional-only taps count half the taps' FLOPs
        assert by["specdiff 0.9 tapped, both CFG halves"]["flops_ratio"] < by["specdiff 0.9 tapped"]["flops_ratio"] \
            < by["specdiff 0.9 untapped"]["flops_ratio"]
    assert by["stock"]["flops_ratio"] == 1.0
    assert 1.3 < by["specdiff 0.5 tapped"]["flops_ratio"] < by["specdiff 0.9 tapped"]["flops_ratio"]
    # untapped calls skip the attention taps: fewer FLOPs than tapped ones at the same ratio
    assert by["specdiff 0.9 untapped"]["flops_ratio"] > by["specdiff 0.9 tapped"]["flops_ratio"]
    assert all(r["calls"] == 2 for r in rows[1:]) and all(r["ms_wall"] > 0 for r in rows)
    # operators counted on a sparse call: taps add operators in every block, planning adds them outside
    assert by["specdiff 0.9 tapped"]["ops_per_block"] > by["specdiff 0.9 untapped"]["ops_per_block"] >= by["stock"]["ops_per_block"] > 10
    assert by["specdiff 0.9 untapped"]["ops_outside_blocks"] > by["stock"]["ops_outside_blocks"]
    assert len(json.loads((tmp_path / "calls.json").read_text())["rows"]) == len(names)
    assert "efficiency" in capsys.readouterr().out


def _load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_its_whole_code_path_tiny_on_the_cpu(tmp_path):
    gpu_speed = _load_benchmark("gpu_speed")
    rows = gpu_speed.main(["--tiny", "--rounds", "1", "--steps", "3", "--latents", "--methods", "stock", "full",
                           "specdiff", "specdiff+graphs", "fora", "--out", str(tmp_path)])
    assert [(r["model"], r["method"]) for r in rows] == [
        (model, method) for model in ("sd3-medium (tiny)", "flux-dev (tiny)")
        for method in ("stock", "full (engine)", "specdiff", "specdiff +graphs", "fora")]
    assert all(r["seconds_median"] > 0 and r["rounds"] == 1 and r["host_ms_per_call"] > 0 for r in rows)
    by = {(r["model"], r["method"]): r for r in rows}
    for model in ("sd3-medium (tiny)", "flux-dev (tiny)"):  # the graph path runs the same FLOPs
        assert by[(model, "specdiff +graphs")]["transformer_flops"] == by[(model, "specdiff")]["transformer_flops"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 10
    assert "speed-up vs stock" in (tmp_path / "results.md").read_text()


def test_gpu_benchmark_reports_a_failing_method_and_goes_on(tmp_path, monkeypatch):
    """A method that fails on the GPU (e.g. a capture error) is reported in its row; the others are timed."""
    gpu_speed = _load_benchmark("gpu_speed")
    from specdiff.engine.graphs import StepGraphs

    def broken(self, *args):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(StepGraphs, "run", broken)
    rows = gpu_speed.main(["--tiny", "--rounds", "1", "--steps", "3", "--latents", "--models", "sd3-medium",
                           "--methods", "stock", "ras+graphs", "ras", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["stock", "ras +graphs", "ras"]
    assert rows[1]["error"] == "RuntimeError: capture failed" and rows[2]["seconds_median"] > 0
    assert "failed: RuntimeError: capture failed" in (tmp_path / "results.md").read_text()


def test_host_overhead_benchmark_counts_operators_and_host_time(tmp_path):
    engine_speed = _load_benchmark("engine_speed")
    rows = engine_speed.main(["--host-overhead", "--preset", "tiny", "--repeats", "1", "--calls", "2",
                              "--out", str(tmp_path / "host.json")])
    by = {r["call"].split(",")[0] if "graph" not in r["call"] else r["call"].split(",")[0] + " graph": r for r in rows}
    assert set(by) == {"stock", "full compute through the engine", "SpecDiff 0.9", "RAS 0.9", "SpecDiff 0.9 graph",
                       "RAS 0.9 graph"}
    # a sparse call issues at least as many operators as a dense one; the graph path issues a handful
    assert by["SpecDiff 0.9"]["operators"] >= by["stock"]["operators"] > 50
    assert by["SpecDiff 0.9 graph"]["operators"] < 20 and by["RAS 0.9 graph"]["operators"] < 20
    assert all(r["host_us"] > 0 and r["calls"] >= 2 for r in rows)


def test_gpu_benchmark_builds_sd3_medium_shapes():
    """The real-size pipeline (one block here): SD3-medium's width and heads, 333 text tokens of width 4096."""
    gpu_speed = _load_benchmark("gpu_speed")
    pipe, call = gpu_speed.real_size_pipeline("sd3-medium", 1, "cpu", torch.bfloat16)
    config = pipe.transformer.config
    assert config.num_attention_heads * config.attention_head_dim == 1536 and config.num_layers == 1
    embeds, _, pooled, _ = pipe.encode_prompt("a fox", "a fox", "a fox", do_classifier_free_guidance=False,
                                              max_sequence_length=call["max_sequence_length"])
    assert tuple(embeds.shape) == (1, 333, 4096) and tuple(pooled.shape) == (1, 2048)
    assert pipe.vae_scale_factor == 8 and call["height"] == 1024


def test_gpu_speed_notices_when_dynamo_hits_its_recompile_limit():
    """Past the limit dynamo runs the code eager without an error; the benchmark must see it."""
    gpu_speed = _load_benchmark("gpu_speed")

    def double(x):
        return x * 2

    compiled = torch.compile(double, backend="eager")
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
            with gpu_speed.RecompileLimitWatch() as within:
                compiled(torch.ones(1))
            with gpu_speed.RecompileLimitWatch() as past:
                compiled(torch.ones(2))  # a second shape, no dynamic shapes: a recompile beyond the limit
    finally:
        torch._dynamo.reset()
    assert within.hits == 0
    assert past.hits == 1
    row = dict(model="m", blocks=1, method="specdiff", seconds_median=1.0, speedup_vs_stock=1.0,
               flops_ratio_vs_stock=2.0, peak_memory_gib=None, peak_vs_stock=None, rounds=1,
               recompile_limit_hits=1, compiled_timing_valid=False)
    assert "not valid" in gpu_speed.table([row], "cpu")


def test_engine_speed_timer_does_not_break_compiled_blocks():
    """The per-call timer marks the span of the blocks from the modules around them: a mark inside a
    compiled block is a graph break that adds host time to every method's compiled calls."""
    import torch._dynamo.utils as dynamo_utils

    import specdiff

    engine_speed = _load_benchmark("engine_speed")
    torch._dynamo.reset()
    for preset in ("tiny", "tiny-flux"):
        model, call = engine_speed.build(engine_speed.PRESETS[preset], 2, torch.device("cpu"), torch.float32)
        timer = engine_speed.CallTimer(model, "cpu")
        specdiff.compile_blocks(model, backend="eager")
        dynamo_utils.counters.clear()
        with torch.inference_mode():
            timed = timer(lambda: call(model, 1, 10))
        assert sum(dynamo_utils.counters["graph_break"].values()) == 0, preset
        assert 0 < timed["blocks_wall"] <= timed["wall"]
    torch._dynamo.reset()


def test_tap_ab_compares_the_taps_with_an_earlier_commit():
    tap_ab = _load_benchmark("tap_ab")
    result = tap_ab.main(["--before", "HEAD", "--rounds", "3", "--active", "64"])  # it checks equal sums first
    assert set(result) == {"before", "now", "parts"} and result["before"] > 0 and result["now"] > 0
    assert all(ms > 0 for ms in result["parts"].values())


def test_compile_variants_counts_graphs_per_method():
    compile_variants = _load_benchmark("compile_variants")
    result = compile_variants.main(["--family", "sd3", "--layers", "1", "--steps", "4"])
    try:
        assert result["counts"]["stock"] >= 1 and result["counts"]["specdiff"] >= 1
        assert result["total"] == sum(result["counts"].values())
    finally:
        torch._dynamo.reset()


def test_diffusers_peers_run_beside_specdiff_on_the_newer_families(tmp_path, capsys):
    """diffusers' TaylorSeer cache in the same table as specdiff on FLUX.2; its FirstBlockCache, whose hook
    fails on FLUX.2 and needs a CacheMixin Z-Image lacks, refused in one line before any generation."""
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny-flux2", "--methods", "full", "specdiff", "diffusers-taylorseer",
                 "--num-prompts", "1", "--steps", "4", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["summary"]
    assert [r["method"] for r in rows] == ["full", "specdiff", "diffusers-taylorseer"]
    for model, why in (("tiny-flux2", "fails inside its hook"), ("tiny-zimage", "CacheMixin")):
        capsys.readouterr()
        code = main(["bench", "--model", model, "--methods", "full", "diffusers-fbc", "--num-prompts", "1",
                     "--out", str(tmp_path / "fbc")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "diffusers-fbc cannot run on" in err[-1] and why in err[-1]
        assert not (tmp_path / "fbc").exists()


def test_compile_families_traces_zimage_whole_and_exact():
    """The family whose step is planned outside its compiled layers and gathered just before the first:
    its layers compile with fullgraph=True (a graph break fails the row) and give the eager output.
    Every family's row: `python benchmarks/compile_families.py` (BENCHMARKS.md section 18)."""
    compile_families = _load_benchmark("compile_families")
    row = compile_families.check("zimage", "ras")
    assert row["fullgraph"], row["error"]
    assert row["blocks"] == 4 and row["max_difference"] == 0.0
