"""Packaging: one source for the version, and the built wheel works where a user installs it.

The slow test is `make wheel-check`: it builds the sdist and the wheel (the wheel from the sdist, as
`python -m build` does), checks them with `twine check --strict`, installs the wheel into a fresh
virtual environment and runs tests/packaging_smoke.py there, first without flax, then with the
`nnx` extra. It needs the `packaging` extra (build, twine) and the package index (jax, flax).
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile

import pytest

import jattn

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_installed_metadata_has_the_package_version():
    assert importlib.metadata.version("jattn") == jattn.__version__


def test_version_has_one_source():
    """pyproject reads the version from jattn/__init__.py; the changelog's newest release is that version."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["hatch"]["version"]["path"] == "jattn/__init__.py"
    releases = re.findall(r"^## \[(\d[^\]]*)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == jattn.__version__, releases


def test_license_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def _run(args, **kwargs):
    """Runs a command, failing the test with its output if it fails; returns its seconds."""
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return time.perf_counter() - start


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    for tool in ("build", "twine"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed: pip install -e '.[packaging]' (make wheel-check does)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    seconds = {}

    dist = tmp_path / "dist"
    seconds["build"] = _run([sys.executable, "-m", "build", "--outdir", dist, ROOT], env=env)
    (wheel,) = dist.glob("jattn-*.whl")
    (sdist,) = dist.glob("jattn-*.tar.gz")
    assert wheel.name.startswith(f"jattn-{jattn.__version__}-py3-none-any")
    assert sdist.name == f"jattn-{jattn.__version__}.tar.gz"
    seconds["twine check"] = _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], env=env)

    wheel_files = zipfile.ZipFile(wheel).namelist()
    info = f"jattn-{jattn.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in wheel_files and "jattn/py.typed" in wheel_files
    assert {f.split("/")[0] for f in wheel_files} == {"jattn", info}, "the wheel holds only the package"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Provides-Extra: nnx" in metadata
    sdist_files = [f.split("/", 1)[1] for f in tarfile.open(sdist).getnames() if "/" in f]
    for needed in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "conftest.py", "tests/test_packaging.py"):
        assert needed in sdist_files, needed
    junk = re.compile(r"(^|/)(\.venv|\.hypothesis|\.\w+_cache|__pycache__|\.git)(/|$)")  # envs, caches
    unwanted = [f for f in sdist_files if junk.search(f)]
    assert not unwanted, unwanted
    # the README's figures, the auto rule's evidence and the common-case run the README's tables come from
    kept = ("bench/results/README", "bench/results/auto-rule-", "bench/results/common-case-")
    assert not [f for f in sdist_files if f.startswith("bench/results/") and not f.startswith(kept)], sdist_files

    venv = tmp_path / "venv"
    seconds["venv"] = _run([sys.executable, "-m", "venv", venv], env=env)
    python = venv / "bin" / "python"
    smoke = shutil.copy(ROOT / "tests" / "packaging_smoke.py", tmp_path)  # run outside the checkout
    seconds["install"] = _run([python, "-m", "pip", "install", "-q", wheel], env=env, cwd=tmp_path)
    seconds["core smoke"] = _run([python, smoke, "core"], env=env, cwd=tmp_path)
    seconds["install [nnx]"] = _run([python, "-m", "pip", "install", "-q", f"{wheel}[nnx]"], env=env, cwd=tmp_path)
    seconds["nnx smoke"] = _run([python, smoke, "nnx"], env=env, cwd=tmp_path)
    print("wheel check seconds:", {k: round(v, 1) for k, v in seconds.items()})
