"""examples/serve.py runs (quick settings, in-process): continuous batching over the paged cache gives
every request the greedy tokens of decoding it alone with the contiguous KV cache, with one compiled step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve.py"


def load_example():
    spec = importlib.util.spec_from_file_location("examples_serve", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_serve_quick_matches_the_contiguous_cache_with_one_compilation(capsys):
    result = load_example().main(["--quick", "--no-progress"])
    assert result["matches"] and all(result["matches"].values()), result["matches"]
    assert result["compilations"] == 1
    assert result["peak"] > 1 and result["page_waits"] > 0  # requests overlapped and queued for pages
    assert "7/7" in capsys.readouterr().out
