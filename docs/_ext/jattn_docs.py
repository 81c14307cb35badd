"""Sphinx glue for jattn's docs: pictures, signatures as written, public names, an offline site.

- ``builder-inited``: draws the pictures of ``figures.py`` into ``docs/_generated/`` (gitignored).
- ``autodoc-process-signature``: jattn's signatures keep their annotations as the source writes them,
  the shape annotations included (``signatures.py``).
- ``missing-reference``: a type named by where it is defined (``jattn.masks._positions.Causal``, as
  autodoc writes an evaluated annotation) links to where it is documented (``jattn.masks.Causal``).
  Only objects a public module exports are mapped; anything else stays a broken reference.
- ``build-finished``: fails the build if a page loads anything from the network (a script, a
  stylesheet, an image or a font), so the site works offline.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import figures
import offline
import signatures
from sphinx.errors import ExtensionError
from sphinx.ext.autodoc.preserve_defaults import update_defvalue


def draw_figures(app) -> None:
    figures.draw_all(Path(app.srcdir) / "_generated")


def signature_as_written(app, what, name, obj, options, signature, return_annotation):
    if signature is None or not name.startswith("jattn.") or what not in ("function", "method", "class"):
        return None
    update_defvalue(app, obj.__init__ if isinstance(obj, type) else obj, False)  # defaults as source text
    return signatures.source_signature(obj)


def _lookup(dotted: str):
    """The object at a dotted path such as ``jattn.masks._positions.Causal``, or None."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def resolve_private_path(app, env, node, contnode):
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("jattn.") or "._" not in target:
        return None
    public = signatures.public_names().get(id(_lookup(target)))
    if public is None:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], public, node, contnode)


def check_offline(app, exception) -> None:
    if exception is None and app.builder.format == "html" and (remote := offline.remote_assets(Path(app.outdir))):
        raise ExtensionError("the site loads assets from the network (it must work offline):\n" + "\n".join(remote))


def setup(app):
    app.connect("builder-inited", draw_figures)
    app.connect("autodoc-process-signature", signature_as_written)
    app.connect("missing-reference", resolve_private_path)
    app.connect("build-finished", check_offline)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
