"""fashion-hf is an installed package: importable from anywhere, one `fashion-hf` command, no path patching."""

import os
import subprocess
import sys

import pytest
from helpers import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fashion_hf_imports_from_outside_the_repository(tmp_path):
    result = run_python("import fashion_hf, fashion_hf.training.train; print(fashion_hf.TASK)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "fashion-tagging"


@pytest.mark.slow
def test_importing_the_library_does_not_import_the_ui(tmp_path):
    result = run_python("import sys, fashion_hf; print('gradio' in sys.modules)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def modules_under(folder: str) -> list[str]:
    """Every module under `folder` of the repository by dotted name, but training scripts (which may import what they
    need)."""
    paths = [path for path in (REPO / folder).rglob("*.py") if "training" not in path.relative_to(REPO).parts]
    return sorted(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for path in paths)


@pytest.mark.slow
def test_neither_the_library_nor_the_app_service_layer_imports_the_ui():
    modules = modules_under("fashion_hf") + modules_under("serving")
    assert {"fashion_hf.pipeline_fashion_tagging", "serving.service"} <= set(modules)
    imports = f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
    result = run_python(imports + "print('gradio' in sys.modules)", cwd=REPO)  # the app's folder: `serving` is there
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def fashion_hf_command(*args, cwd) -> subprocess.CompletedProcess:
    command = os.path.join(os.path.dirname(sys.executable), "fashion-hf")
    return subprocess.run([command, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("subcommand", ["train", "evaluate", "ensemble", "model-card"])
def test_the_console_script_runs_every_subcommand(subcommand, tmp_path):
    result = fashion_hf_command(subcommand, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "--" in result.stdout


@pytest.mark.slow
def test_the_console_script_names_its_commands_and_refuses_an_unknown_one(tmp_path):
    listing = fashion_hf_command("--help", cwd=tmp_path)
    assert listing.returncode == 0 and all(name in listing.stdout for name in ("train", "evaluate", "ensemble"))
    unknown = fashion_hf_command("tarin", cwd=tmp_path)
    assert unknown.returncode != 0 and "unknown command 'tarin'" in unknown.stderr


@pytest.mark.slow
def test_the_train_scripts_run_without_the_repository_on_the_path(tmp_path):
    # `python train/evaluate.py` from another folder: the script finds the installed package, not a patched path.
    result = subprocess.run([sys.executable, str(REPO / "train" / "evaluate.py"), "--help"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--split" in result.stdout


def test_no_module_patches_sys_path():
    patches = tuple(f"sys.path.{method}(" for method in ("insert", "append"))  # spelt so that this file is no match
    patched = [
        str(path.relative_to(REPO))
        for folder in ("fashion_hf", "train", "benchmarks", "tests")
        for path in (REPO / folder).rglob("*.py")
        if any(patch in path.read_text() for patch in patches)
    ]
    assert patched == []
