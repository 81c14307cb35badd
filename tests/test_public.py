"""The public surface: every exported name imports; `import jattn` does not pull in flax."""

import ast
import pathlib
import re
import subprocess
import sys

import jax

import jattn


def test_every_public_name_imports():
    for name in jattn.__all__:
        assert getattr(jattn, name) is not None, name


def test_public_functions_have_docstrings_with_examples():
    for name in jattn.__all__:
        obj = getattr(jattn, name)
        if isinstance(
            obj, (tuple, dict)
        ):  # a constant (IMPLEMENTATIONS, DEFAULT_BLOCK_SIZES), documented where defined
            continue
        assert obj.__doc__ and ">>>" in obj.__doc__, name


def test_implementations_are_public_and_valid_choices():
    assert jattn.IMPLEMENTATIONS == ("reference", "blockwise", "xla", "cudnn")
    q = jax.ShapeDtypeStruct((1, 300, 2, 8), jax.numpy.float32)
    assert jattn.auto_implementation(q, q, q, backend="cpu") in jattn.IMPLEMENTATIONS


def test_nothing_outside_the_package_imports_a_private_jattn_name():
    """bench/, examples/ and the README use only public names (tests may look inside the kernels)."""
    root = pathlib.Path(jattn.__file__).resolve().parent.parent
    private = re.compile(r"(from\s+jattn(\.\w+)*\s+import\s+[^\n]*\b_\w+|jattn(\.\w+)*\._\w+|from\s+jattn\._)")
    sources = [*root.glob("bench/**/*.py"), *root.glob("examples/**/*.py"), root / "README.md"]
    sources += [*root.glob("docs/**/*.md")]
    offenders = [f"{p.relative_to(root)}: {m.group(0)}" for p in sources for m in private.finditer(p.read_text())]
    assert not offenders, offenders


def test_import_does_not_import_flax():
    code = "import sys, jattn; sys.exit(1 if any(m == 'flax' or m.startswith('flax.') for m in sys.modules) else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_private_modules_never_import_public_ones():
    """Layers point one way: jattn's private modules import private ones only (jattn.nnx, a client of the
    public API above the core, is exempt); a public module only re-exports or calls private code."""
    package = pathlib.Path(jattn.__file__).resolve().parent
    public = {"jattn.masks", "jattn.score_mods", "jattn.sharding", "jattn.testing", "jattn.nnx", "jattn.paged"}
    offenders = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[:2] == ("jattn", "nnx") or not any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        module = ".".join(p for p in parts if p != "__init__")
        here = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                # `from .masks import _combine` names a private module inside a public package: allowed.
                private_only = all(a.name.startswith("_") for a in node.names)
                names = [target] if node.module and not private_only else []
                names += [f"{target}.{a.name}" for a in node.names if not node.module]
                names += [f"{target}.{a.name}" for a in node.names if node.module and a.name in _SUBMODULES]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{module} imports {n}" for n in names if n in public]
    assert not offenders, offenders


_SUBMODULES = {"masks", "score_mods", "sharding", "testing", "nnx", "paged"}


def test_jax_internals_are_imported_in_one_module_only():
    """Every non-public JAX name jattn uses goes through jattn/_jax_compat.py (one place to check on upgrades)."""
    package = pathlib.Path(jattn.__file__).resolve().parent
    internal = re.compile(r"\bjax\.(core|interpreters|extend|_src)\b|from jax\.(core|interpreters|extend|_src)\b")
    offenders = [
        f"{path.relative_to(package)}:{n}"
        for path in package.rglob("*.py")
        if path.name != "_jax_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if internal.search(line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, offenders
