"""The public surface: every exported name imports; `import jattn` does not pull in flax."""

import subprocess
import sys

import jattn


def test_every_public_name_imports():
    for name in jattn.__all__:
        assert getattr(jattn, name) is not None, name


def test_public_functions_have_docstrings_with_examples():
    for name in jattn.__all__:
        obj = getattr(jattn, name)
        assert obj.__doc__ and ">>>" in obj.__doc__, name


def test_import_does_not_import_flax():
    code = "import sys, jattn; sys.exit(1 if any(m == 'flax' or m.startswith('flax.') for m in sys.modules) else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)
