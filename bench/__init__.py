"""jattn's benchmark harness: ``python -m bench`` (see ``bench/__main__.py``).

Outside the package and never imported by it. Every case is compiled once
(compile time reported separately), then timed over repeated
``block_until_ready`` calls; memory is XLA's compiled ``memory_analysis()``.
Suites are plain modules registered in ``bench.suites``; each yields
``bench.case.Case`` objects that the runner measures, one at a time, recording
errors instead of stopping.
"""
