"""``bench.common_case``: every part runs at tiny sizes, its rows are consistent, and its report renders.

Timing is never asserted (figures come from ``bench/`` runs, not tests): only that the rows hold what the
report and the README's generated region read, and that each ratio and verdict follow from its figures.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from bench import auto_rule, common_case, common_case_report

TINY = ["--seq", "16", "--option", "none", "mask", "--mode", "fwd", "--dtype", "float32", "--decode-batch", "1",
        "--cache", "3", "--long-seq", "64", "--doc-seq", "64", "--rounds", "1", "--long-rounds", "1",
        "--compile-rounds", "1", "--compile-seq", "16", "--compile-cache", "4", "--min-sample-ms", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("common") / "common.json"
    common_case.main([*TINY, "--out", str(out)])
    return json.loads(out.read_text())


def test_every_part_gives_rows_whose_ratio_and_verdict_follow_from_their_figures(doc):
    rows = doc["rows"]
    assert [p for p in common_case.PARTS if any(r["part"] == p for r in rows)] == list(common_case.PARTS)
    assert {r["case"] for r in rows if r["part"] == "decode"} == {"batch 1 cache 3 fill 1", "batch 1 cache 3 fill 2"}
    for r in rows:
        assert r["ours_value"] > 0 and r["peer_value"] > 0, r
        assert r["ratio"] == pytest.approx(r["ours_value"] / r["peer_value"])
        assert r["met"] == (r["ratio"] <= r["target"])
    assert doc["command"].startswith("python -m bench.common_case --seq 16")


def test_report_tables_and_plot(doc, tmp_path):
    summary = common_case_report.summary_markdown(doc)
    assert len(summary.splitlines()) == 2 + len(common_case.PARTS)
    full = common_case_report.full_markdown(doc)
    assert len(full.splitlines()) == 2 + len(doc["rows"])
    assert "batch 1 cache 3 fill 2" in full
    png = common_case_report.plot(doc, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_interleave_times_each_call_and_a_sample_lasts_long_enough():
    import time

    seen = {"a": 0, "b": 0}

    def call(name, seconds):
        def f():
            seen[name] += 1
            time.sleep(seconds)

        return f

    medians = auto_rule.interleave({"a": call("a", 0.001), "b": call("b", 0.003)}, rounds=3, min_sample_s=0.01)
    assert medians["a"] < medians["b"]
    inner = auto_rule.calls_per_sample({"x": lambda: None}, 0.0)
    assert inner == 1
    assert seen["a"] == seen["b"] and seen["a"] >= 2 + 3 * 3  # warm-up, calibration, >= 3 calls per sample


def test_auto_rule_keep_refreshes_some_cases_and_marks_the_kept_ones(tmp_path):
    earlier_args = ["--seq", "8", "16", "--option", "none", "--mode", "fwd", "--dtype", "float32", "--rounds", "1"]
    earlier = tmp_path / "earlier.json"
    auto_rule.main([*earlier_args, "--no-progress", "--out", str(earlier)])
    later = tmp_path / "later.json"
    doc = auto_rule.main(["--seq", "16", "--option", "none", "--mode", "fwd", "--dtype", "float32", "--rounds", "1",
                          "--no-progress", "--keep", str(earlier), "--out", str(later)])  # fmt: skip
    assert [(r["seq"], "from" in r) for r in doc["records"]] == [(8, True), (16, False)]
    assert doc["records"][0]["from"] == json.loads(earlier.read_text())["command"]
    assert json.loads(later.read_text())["crossovers"] == auto_rule.crossovers(doc["records"])
    assert "T=8 (kept 1)" in common_case_report.auto_rule_markdown(doc)
    # a third run keeps the first run's record with its own origin, not the second run's command
    third = auto_rule.main(["--seq", "32", "--option", "none", "--mode", "fwd", "--dtype", "float32", "--rounds", "1",
                            "--no-progress", "--keep", str(later), "--out", str(tmp_path / "third.json")])  # fmt: skip
    assert [r.get("from") for r in third["records"]] == [doc["records"][0]["from"], doc["command"], None]
    table = common_case_report.auto_rule_markdown(third)
    assert "T=8 (kept 1)" in table and "T=16 (kept 2)" in table and "T=32 |" in table

    for bad, message in ((["--rounds", "2"], "the earlier run had batch 4 and 1 rounds"),
                         (["--batch", "2"], "the earlier run had batch 4")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            auto_rule.main([*earlier_args, *bad, "--no-progress", "--keep", str(earlier), "--out", str(later)])
    other = json.loads(earlier.read_text())
    other["machine"]["device_kind"] = "another device"
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="the earlier run was on"):
        auto_rule.main([*earlier_args, "--no-progress", "--keep", str(elsewhere), "--out", str(later)])


def test_combine_keeps_the_median_runs_row_and_every_ratio():
    def runs(*ratios, cases=("a", "b")):
        pairs = zip(cases, ratios, strict=True)
        return [common_case.row("causal", case, ("ours", r), ("peer", 1.0)) for case, r in pairs]

    rows = common_case.combine([runs(0.60, 0.9), runs(0.50, 0.4), runs(0.56, 0.7)])
    assert [r["case"] for r in rows] == ["a", "b"]
    assert [r["ratio"] for r in rows] == [0.56, 0.7]  # the median run's row, figures and all
    assert [r["ours_value"] for r in rows] == [0.56, 0.7]
    assert [r["met"] for r in rows] == [False, False]  # 0.56 and 0.7 against the causal target 0.55
    assert rows[0]["ratios"] == [0.60, 0.50, 0.56]
    # an even count takes the higher middle (never the better of two), and a case a cut run lacks keeps the others
    rows = common_case.combine([runs(0.60, 0.9), runs(0.50, cases=("a",))])
    assert [(r["ratio"], r["met"], r["ratios"]) for r in rows] == [(0.60, False, [0.60, 0.50]), (0.9, False, [0.9])]
    assert "ratios" not in common_case.combine([runs(0.6, 0.9)])[0]  # one run: its rows as they were
    # a case measured twice in one run (a length given twice) stays two rows
    twice = common_case.combine([runs(0.5, 0.6, cases=("a", "a")), runs(0.7, 0.4, cases=("a", "a"))])
    assert [r["ratios"] for r in twice] == [[0.5, 0.7], [0.6, 0.4]]


def test_repeats_run_a_part_that_many_times_and_report_the_spread(tmp_path, capsys):
    out = tmp_path / "repeated.json"
    doc = common_case.main([*TINY, "--part", "causal", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == doc and doc["repeats"] == 2
    assert [r["case"] for r in doc["rows"]] == ["fwd T=64", "fwd+bwd T=64"]
    for r in doc["rows"]:
        assert len(r["ratios"]) == 2 and r["ratio"] == max(r["ratios"])  # the higher of two
        assert r["ratio"] == pytest.approx(r["ours_value"] / r["peer_value"])
    spread = f"({min(doc['rows'][0]['ratios']):.2f}-{max(doc['rows'][0]['ratios']):.2f})"
    assert spread in common_case_report.full_markdown(doc)
    assert "every ratio the median of 2 runs of its part" in common_case_report.run_line(doc)
    with pytest.raises(SystemExit):
        common_case.parse(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_a_run_cut_short_in_a_later_repeat_keeps_every_measured_ratio(tmp_path, monkeypatch):
    calls = []

    def part(args):  # two rows per run; the second run stops after its first row
        calls.append(None)
        rows = []
        for case, ratio in (("a", 0.5 + len(calls) / 10), ("b", 0.9)):
            if len(calls) == 2 and case == "b":
                raise KeyboardInterrupt
            rows.append(common_case.row("causal", case, ("ours", ratio), ("peer", 1.0)))
            common_case.report(rows[-1], args)
        return rows

    monkeypatch.setattr(common_case, "part_causal", part)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        common_case.main(["--part", "causal", "--repeats", "3", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert [(r["case"], r["ratios"]) for r in doc["rows"]] == [("a", [0.6, 0.7]), ("b", [0.9])]
    assert "every ratio the median of up to 3 runs of its part" in common_case_report.run_line(doc)
