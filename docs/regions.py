"""The generated regions of the README and the docs, from the committed benchmark results.

    python docs/regions.py          # rewrite them from bench/results/README.json
    python docs/regions.py --check  # exit 1 if one differs (tests/test_docs.py checks the same)

- ``docs/performance.md`` between ``<!-- perf:start -->`` and ``<!-- perf:end -->``: the whole
  Performance section, as ``python -m bench.report bench/results/README.json --readme
  docs/performance.md`` writes it.
- ``README.md`` between ``<!-- headline:start -->`` and ``<!-- headline:end -->``: the attention
  table of that section and its plot, the landing page's headline numbers.
- ``README.md`` between ``<!-- common:start -->`` and ``<!-- common:end -->``: the common case (short
  sequences, decode steps, causal, compile time) against jax.nn and Flax, one line per part, from
  ``bench/results/common-case-cpu.json`` (``python -m bench.common_case``); ``docs/performance.md``
  between ``<!-- common-rows:start -->`` and ``<!-- common-rows:end -->``: every row of it.
- ``docs/performance.md`` between ``<!-- common-gpu:start -->`` and ``<!-- common-gpu:end -->``, and
  ``<!-- auto-rule-gpu:start -->`` and ``<!-- auto-rule-gpu:end -->``: the same suite's rows and the
  auto rule's measurements on a GPU (``bench/results/common-case-gpu.json``, ``auto-rule-gpu.json``;
  ``bash bench/device_check.sh`` made them).

All come from ``bench``'s own formatting (``bench.report``, ``bench.table``,
``bench.common_case_report``), so no number is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common_case_report, report, table  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "README.json"
COMMON = ROOT / "bench" / "results" / "common-case-cpu.json"
README = ROOT / "README.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
PERF = ("<!-- perf:start -->", "<!-- perf:end -->")
HEADLINE = ("<!-- headline:start -->", "<!-- headline:end -->")
COMMON_SUMMARY = ("<!-- common:start -->", "<!-- common:end -->")
COMMON_ROWS = ("<!-- common-rows:start -->", "<!-- common-rows:end -->")
COMMON_GPU = ROOT / "bench" / "results" / "common-case-gpu.json"
AUTO_RULE_GPU = ROOT / "bench" / "results" / "auto-rule-gpu.json"
GPU_ROWS = ("<!-- common-gpu:start -->", "<!-- common-gpu:end -->")
GPU_AUTO_RULE = ("<!-- auto-rule-gpu:start -->", "<!-- auto-rule-gpu:end -->")


def results() -> dict:
    return json.loads(RESULTS.read_text())


def performance_region(doc: dict) -> str:
    """What ``bench.report`` writes into ``docs/performance.md`` (the plot's path relative to the page)."""
    return report.performance_section(doc, plot="../bench/results/README.png")


def headline_region(doc: dict) -> str:
    """The README's headline: the attention table of the same run, its memory at the longest sequence, the plot."""
    meta, cfg = doc["meta"], doc["config"]
    shape = f"batch {cfg['batch']}, {cfg['heads']} heads, dim {cfg['dim']}, {cfg['dtype']}"
    peer = report.first_peer(doc)
    return "\n\n".join(
        [
            f"`jattn.dot_product_attention` (the blockwise kernel) against `jax.nn.dot_product_attention` "
            f"on a {meta['cpu_count']}-core {meta['backend'].upper()} ({shape}); median time, in brackets "
            f"jattn's time over {peer}'s (below 1 is faster):",
            table.render_markdown(table.attention_pivot(doc["results"])),
            memory_sentence(doc["results"], peer),
            "![attention time, memory and ratio to jax.nn against sequence length](bench/results/README.png)",
        ]
    )


def memory_sentence(results: list[dict], peer: str) -> str:
    """The forward pass's temporary memory at the longest sequence, jattn against the peer."""
    forward = [r for r in results if r["suite"] == "attention" and r["params"]["mode"] == "fwd"]
    forward = [r for r in forward if not r["params"]["causal"] and r.get("temp_bytes") is not None]
    longest = max(r["params"]["seq"] for r in forward)
    temp = {r["impl"]: r["temp_bytes"] for r in forward if r["params"]["seq"] == longest}
    ours = next(impl for impl in temp if impl.startswith("jattn:"))
    return (
        f"Memory stays O(N): at T = {longest} the forward pass needs {table.fmt_bytes(temp[ours])} of "
        f"temporaries, {peer} {table.fmt_bytes(temp[peer])} (XLA's compiled `memory_analysis()`)."
    )


def region(text: str, markers: tuple[str, str]) -> str:
    """What lies between the markers, stripped."""
    start, end = markers
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"missing {start} ... {end}")
    return text[i + len(start) : j].strip()


def common_region(doc: dict, *, rows: bool, plot: str) -> str:
    """The common-case result: one line per part (README) or every row (docs), with its run and plot."""
    table_ = common_case_report.full_markdown(doc) if rows else common_case_report.summary_markdown(doc)
    image = f"![each row's ratio against its target]({plot})"
    return "\n\n".join([common_case_report.run_line(doc), table_, image])


def auto_rule_region(doc: dict) -> str:
    """A ``bench.auto_rule`` run: its command and machine, then every case with what the rule picks."""
    m = doc["machine"]
    line = (f"Made by `{doc['command']}` on backend `{m['backend']}` ({m['device_kind']}), {doc['rounds']} "
            f"interleaved rounds, medians; crossovers `{json.dumps(doc['crossovers'])}`.")  # fmt: skip
    for i, earlier in enumerate(common_case_report.kept_origins(doc), 1):
        line += f" Cases marked (kept {i}) are from an earlier run on the same kind of device: `{earlier}`."
    return "\n\n".join([line, common_case_report.auto_rule_markdown(doc)])


def expected() -> list[tuple[Path, tuple[str, str], str]]:
    """(file, markers, body) of every generated region."""
    doc, common, gpu = results(), json.loads(COMMON.read_text()), json.loads(COMMON_GPU.read_text())
    png = "bench/results/common-case-cpu.png"
    return [
        (PERFORMANCE, PERF, performance_region(doc)),
        (README, HEADLINE, headline_region(doc)),
        (README, COMMON_SUMMARY, common_region(common, rows=False, plot=png)),
        (PERFORMANCE, COMMON_ROWS, common_region(common, rows=True, plot=f"../{png}")),
        (PERFORMANCE, GPU_ROWS, common_region(gpu, rows=True, plot="../bench/results/common-case-gpu.png")),
        (PERFORMANCE, GPU_AUTO_RULE, auto_rule_region(json.loads(AUTO_RULE_GPU.read_text()))),
    ]


def stale() -> list[str]:
    """The files whose region differs from what the results give."""
    return [
        f"{path.relative_to(ROOT)} ({markers[0]})"
        for path, markers, body in expected()
        if region(path.read_text(), markers) != body.strip()
    ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if out := stale():
            print("stale, run `python docs/regions.py`:", ", ".join(out))
            return 1
        return 0
    for path, (start, end), body in expected():
        path.write_text(report.replace_region(path.read_text(), body, start=start, end=end))
        print(f"rewrote {path.relative_to(ROOT)} {start}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
