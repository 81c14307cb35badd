"""The built site must work offline: find every asset a page would fetch from the network.

``jattn_docs.py`` fails the build on any; ``tests/test_docs.py`` checks this finds them.
"""

from __future__ import annotations

import re
from pathlib import Path

# A remote URL that a browser fetches by itself: in a src=, a <link href> (stylesheets, fonts, preloads),
# a CSS url(...) or @import. Links to other sites (<a href>) are fine: they are followed only on a click.
REMOTE = re.compile(
    r"""(<(?:script|img|iframe|source|video|audio)\b[^>]*\bsrc\s*=\s*["']?(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import\s+["']?(?:https?:)?//)""",
    re.I,
)


def remote_assets(site: Path) -> list[str]:
    """``"page: match"`` for every asset a page of the built site would fetch from the network."""
    found = []
    for path in sorted([*site.rglob("*.html"), *site.rglob("*.css"), *site.rglob("*.js")]):
        found += [
            f"{path.relative_to(site)}: {m.group(0)[:120]}" for m in REMOTE.finditer(path.read_text("utf-8", "replace"))
        ]
    return found
