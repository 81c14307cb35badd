"""Sphinx configuration for jattn's documentation site (``make docs``).

Strict by construction: ``make docs`` runs ``sphinx-build -W --keep-going -n``, so a warning,
an unresolved cross-reference (nitpicky mode) or a broken internal link fails the build. Nothing is
fetched at build time: no intersphinx, no MathJax, no web fonts; the theme's assets are copied into
the site, which is viewable offline (``docs/_ext/offline.py`` checks the built HTML).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the pictures run tiny JAX programs: no accelerator needed
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]  # jattn and bench from this checkout; the figures extension

import jattn  # noqa: E402

project = "jattn"
author = "the jattn authors"
copyright = "the jattn authors, Apache-2.0"
release = version = jattn.__version__

extensions = [
    "myst_parser",  # Markdown pages (CommonMark + directives), as JAX's and Flax's docs
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # Google-style docstrings (Args:, Returns:, Raises:, Example:)
    "jattn_docs",  # docs/_ext: the pictures (drawn at build time), public names, an offline check
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]
templates_path: list[str] = []

# --- Markdown ---------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links resolve, and are checked

# --- the API reference --------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"  # the jaxtyping shape annotations stay in the signatures
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# docs/_ext/jattn_docs.py writes jattn's signatures with their annotations as written in the source,
# `Float[ArrayLike, "*batch q_seq heads dim"]`, not as jaxtyping evaluates them (a union over array types).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # an Attributes entry says its shape in words; the evaluated jaxtyping type is noise
napoleon_use_ivar = False  # Attributes: as attribute entries (a `:ivar:` list reads 'a, b: text' as a type)
python_use_unqualified_type_names = True
add_module_names = False
maximum_signature_line_length = 100  # long signatures one parameter a line

# Nitpicky mode (-n) reports every reference Sphinx cannot resolve. References *into* jattn must
# resolve; references to other libraries cannot, since intersphinx would fetch their inventories over
# the network at build time. Those (and only those) are ignored here.
nitpicky = True
_EXTERNAL = r"(jax|jaxlib|jaxtyping|numpy|np|flax|keras|typing|typing_extensions|collections|builtins|abc)"
nitpick_ignore_regex = [
    (r"py:(class|obj|data|func|meth|attr|exc|mod)", _EXTERNAL + r"(\..*)?"),
    # jaxtyping's names as the signatures write them: Float[ArrayLike, "*batch q_seq heads dim"].
    (r"py:class", r"(Array|ArrayLike|Float|Int|Bool|Shaped)"),
    # GradCheckReport's fields are typed with a class jattn.testing does not export (reported upstream):
    # its docstring says what the fields hold.
    ("py:class", "jattn._gradcheck._compare.Mismatch"),
]

# --- HTML ---------------------------------------------------------------------------------------------
html_theme = "furo"  # self-contained: its CSS, JS and search ship in the wheel (no CDN, no web fonts)
html_title = f"jattn {release}"
html_static_path: list[str] = []
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}
pygments_style = "default"
