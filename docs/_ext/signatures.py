"""jattn's signatures as its source writes them, for the API reference.

jattn's modules use ``from __future__ import annotations``, so every annotation is the source text,
e.g. ``Float[ArrayLike, "*batch q_seq heads dim"]``. Evaluated (what autodoc shows by default),
jaxtyping spells that out as a union over every array type with private module paths. Here the text
stays, and only the names in it change, to ones a reader and Sphinx can look up:

- a jattn object: its public name (``_block_mask.BlockMask`` -> ``jattn.masks.BlockMask``);
- a ``Literal`` alias: the values it allows (``Implementation`` -> ``Literal['reference', ...]``);
- a name reached through a module alias: the module's real name (``nnx.Rngs`` -> ``flax.nnx.Rngs``);
- a private jattn class: its full path (a reference the strict build then reports).

Shape strings are left as they are.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import sys
import typing

PUBLIC_MODULES = (
    "jattn",
    "jattn.masks",
    "jattn.score_mods",
    "jattn.sharding",
    "jattn.testing",
    "jattn.nnx",
    "jattn.paged",
)
NAME = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.\w+)*")  # a dotted name
QUOTED = re.compile(r"""('[^']*'|"[^"]*")""")  # a string inside an annotation: a jaxtyping shape


@functools.cache
def public_names() -> dict[int, str]:
    """``id(object) -> "jattn.module.Name"`` for every class and function a public module exports."""
    names: dict[int, str] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in exported:
            obj = getattr(module, name)
            if callable(obj):
                names.setdefault(id(obj), f"{module_name}.{name}")
    return names


def _resolve(dotted: str, namespace: dict) -> tuple[bool, object]:
    head, *rest = dotted.split(".")
    if head not in namespace:
        return False, None
    value = namespace[head]
    for attr in rest:
        if not hasattr(value, attr):
            return False, None
        value = getattr(value, attr)
    return True, value


def qualified(dotted: str, namespace: dict) -> str:
    """The name to show for ``dotted`` as written in a module whose globals are ``namespace``."""
    found, value = _resolve(dotted, namespace)
    if not found or value is None or isinstance(value, (str, int, float, bool)):
        return dotted
    if id(value) in public_names():
        return public_names()[id(value)]
    if typing.get_origin(value) is typing.Literal:
        return inspect.formatannotation(value).removeprefix("typing.")
    head = dotted.split(".")[0]
    if "." in dotted and inspect.ismodule(namespace[head]):
        return namespace[head].__name__ + dotted[len(head) :]
    if isinstance(value, type) and value.__module__.startswith("jattn"):
        return f"{value.__module__}.{value.__qualname__}"
    return dotted


def annotation(text_or_type, namespace: dict) -> str:
    """An annotation as written, its names qualified, its strings untouched."""
    text = text_or_type if isinstance(text_or_type, str) else inspect.formatannotation(text_or_type)
    pieces = QUOTED.split(text)  # odd pieces are the strings
    return "".join(
        piece if i % 2 else NAME.sub(lambda m: qualified(m.group(0), namespace), piece)
        for i, piece in enumerate(pieces)
    )


def default(value) -> str:
    """A default's text: ``autodoc_preserve_defaults`` makes its repr the source text; a repr that is no
    Python (``<function f at 0x...>``) becomes ``...``, since Sphinx parses the signature as Python."""
    text = repr(value)
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return "..."
    return text


def source_signature(obj) -> tuple[str, str | None] | None:
    """``(parameters, return annotation)`` of a function, or of a class's constructor (without ``self``:
    a metaclass such as Flax's would otherwise give ``(*args, **kwargs)``)."""
    function = obj.__init__ if isinstance(obj, type) else obj
    try:
        sig = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:] if isinstance(obj, type) else list(sig.parameters.values())
    namespace = getattr(function, "__globals__", None) or vars(sys.modules[obj.__module__])
    parts, star = [], False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {annotation(p.annotation, namespace)}"
        if p.default is not p.empty:
            text += f" = {default(p.default)}" if p.annotation is not p.empty else f"={default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    returns = None
    if not isinstance(obj, type) and sig.return_annotation is not sig.empty:
        returns = annotation(sig.return_annotation, namespace)
    return f"({', '.join(parts)})", returns
