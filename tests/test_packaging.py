"""Packaging: a wheel built for one torch requires that torch's minor release, so pip refuses it
beside another torch; source and editable installs keep the wide range.

The metadata tests run setup.py's egg_info (no compile). The built-wheel tests read the wheel that
scripts/test.sh builds and installs (``DFM_FUSED_WHEEL``; they skip without it) and ask pip, with
no index, to install it into an environment that holds another torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RELEASE = torch.__version__.split("+")[0]
MAJOR, MINOR = (int(part) for part in RELEASE.split(".")[:2])
WHEEL = os.environ.get("DFM_FUSED_WHEEL")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="DFM_FUSED_WHEEL (a built wheel, set by scripts/test.sh) is unset")


def _torch_specifiers(metadata) -> set[str]:
    requirements = [r for r in metadata.get_all("Requires-Dist") or [] if r.split(";")[0].strip().startswith("torch")]
    assert len(requirements) == 1, f"expected one torch requirement; got {requirements}"
    return set(requirements[0][len("torch"):].replace(" ", "").split(","))


def _egg_info(tmp_path: Path, local_version: str):
    """The metadata setup.py declares, without building anything."""
    env = dict(os.environ, DFM_FUSED_BUILD_CUDA="0", DFM_FUSED_LOCAL_VERSION=local_version)
    run = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return Parser().parsestr((tmp_path / "dfm_fused.egg-info" / "PKG-INFO").read_text())


def test_source_install_admits_any_supported_torch(tmp_path):
    metadata = _egg_info(tmp_path, local_version="0")
    assert _torch_specifiers(metadata) == {">=2.4"}
    assert "+" not in metadata["Version"]


def test_wheel_for_one_torch_requires_its_minor_release(tmp_path):
    metadata = _egg_info(tmp_path, local_version="1")
    assert _torch_specifiers(metadata) == {f">={RELEASE}", f"<{MAJOR}.{MINOR + 1}"}
    assert metadata["Version"].endswith(f"torch{MAJOR}.{MINOR}"), metadata["Version"]


@needs_wheel
def test_built_wheel_requires_the_torch_it_was_built_against():
    with zipfile.ZipFile(WHEEL) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(name).decode())
    # The suite runs on the torch the wheel was built with (scripts/test.sh lends it).
    assert _torch_specifiers(metadata) == {f">={RELEASE}", f"<{MAJOR}.{MINOR + 1}"}
    assert metadata["Version"].endswith(f"torch{MAJOR}.{MINOR}"), metadata["Version"]


def _pip_dry_run(tmp_path: Path, installed_torch: str) -> subprocess.CompletedProcess:
    """``pip install --dry-run WHEEL`` into a fresh environment where torch ``installed_torch`` is installed.

    The environment holds torch's metadata only (what pip reads to resolve); no index and no pip
    configuration, so pip can only keep that torch or fail.
    """
    venv = tmp_path / f"torch-{installed_torch}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    info = Path(purelib) / f"torch-{installed_torch}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {installed_torch}\n")
    (info / "RECORD").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
                           "--no-index", "--disable-pip-version-check", WHEEL],
                          env=env, capture_output=True, text=True, timeout=300)


@needs_wheel
@pytest.mark.parametrize("installed", [f"{MAJOR}.{MINOR - 1}.0" if MINOR else f"{MAJOR - 1}.99.0",
                                       f"{MAJOR}.{MINOR + 1}.0"])
def test_pip_refuses_the_wheel_beside_another_torch_minor(tmp_path, installed):
    run = _pip_dry_run(tmp_path, installed)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "satisfies the requirement torch" in run.stderr, run.stdout + run.stderr


@needs_wheel
def test_pip_accepts_the_wheel_beside_its_torch(tmp_path):
    run = _pip_dry_run(tmp_path, RELEASE)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Would install dfm_fused-" in run.stdout, run.stdout + run.stderr
