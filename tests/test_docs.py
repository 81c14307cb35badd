"""The documentation cannot drift: every code block of every page runs, every public name has an entry.

Each page's ```python blocks run in order in one namespace (they build on each other, as a reader
pastes them), with JAX's default promotion rules, as a user's code runs. The sequence-parallel page
runs in a subprocess on 4 simulated CPU devices, so its sharding claims are checked on a real mesh.
The site itself is built by ``make docs`` (strict), not here.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import pytest

import jattn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts and "_generated" not in p.parts)
ON_DEVICES = {"sequence-parallel.md": 4}  # pages that run on this many simulated CPU devices
# jattn, its public submodules (from __all__) and jattn.nnx (not imported by jattn: it needs flax).
PUBLIC_MODULES = (
    "jattn",
    *(f"jattn.{name}" for name in jattn.__all__ if inspect.ismodule(getattr(jattn, name))),
    "jattn.nnx",
)
NOT_YET_DOCUMENTED: set[str] = set()  # public modules without an API page yet


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def run_blocks(blocks: list[str], name: str) -> None:
    namespace: dict = {"__name__": f"docs.{name}"}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
        # Keras (the drop-in page) passes a NumPy-2 deprecation through; it is Keras's, not the docs'.
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword")
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{name} block {i}", "exec"), namespace)
            except Exception as e:  # pragma: no cover - the message is the point
                pytest.fail(f"{name}: python block {i} failed: {e!r}\n{block}")


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_guides_have_code():
    names = {p.name for p in PAGES_WITH_CODE}
    expected = {"index.md", "getting-started.md", "drop-in.md", "masks.md", "autodiff.md", "sequence-parallel.md"}
    assert expected | {"flax.md"} <= names, sorted(names)


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page):
    name = str(page.relative_to(DOCS))
    devices = ON_DEVICES.get(name)
    if devices is None:
        run_blocks(python_blocks(page), name)
        return
    # A fresh process: the device count is fixed when JAX starts. It inherits XLA_FLAGS (conftest's
    # fast-compile flags) and adds the device count.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import jax
        assert jax.device_count() == {devices}, jax.devices()
        from test_docs import python_blocks, run_blocks
        from pathlib import Path
        run_blocks(python_blocks(Path({str(page)!r})), {name!r})
    """)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def documented_names() -> set[str]:
    """Every ``.. autofunction:: jattn.x`` / ``autoclass`` / ``py:data`` target of the API pages."""
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    found = re.findall(r"\.\. auto(?:function|class|exception|data):: (\S+)", text)
    found += re.findall(r"```\{py:data\} (\S+)", text)
    return set(found)


def public_names() -> set[str]:
    names = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in exported:
            full = f"{module_name}.{name}"
            if full in PUBLIC_MODULES or full in NOT_YET_DOCUMENTED:
                continue  # a module: it has its own page (or is announced as coming)
            names.add(full)
    return names


def test_every_public_name_has_an_api_entry():
    missing = public_names() - documented_names()
    assert not missing, f"add these to docs/api/: {sorted(missing)}"


def test_api_entries_name_real_objects():
    for name in documented_names():
        module_name, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module_name), attr), name


def test_generated_regions_match_the_committed_results():
    sys.path.insert(0, str(DOCS))
    try:
        import regions
    finally:
        sys.path.remove(str(DOCS))
    assert not regions.stale(), "run: python docs/regions.py"


def test_internal_links_point_at_files_that_exist():
    """README links into docs/ (GitHub renders them); the site's own links are checked by the strict build."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs/|bench/|ARCHITECTURE)[^)#\s]*)", readme)
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


def test_the_offline_check_catches_remote_assets(tmp_path):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import offline
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    (tmp_path / "page.html").write_text(
        '<a href="https://github.com/x">a link is fine</a><script src="_static/local.js"></script>'
        '<script src="https://cdn.example/mathjax.js"></script><link rel="stylesheet" href="//fonts.example/f.css">'
    )
    (tmp_path / "style.css").write_text("body { background: url('https://example.com/bg.png') }")
    found = offline.remote_assets(tmp_path)
    assert [f.split(":")[0] for f in found] == ["page.html", "page.html", "style.css"], found
