"""Run reports: ``metrics.jsonl`` (+ ``summary.json``, config, manifest) -> one self-contained HTML page.

Public API::

    build_report(run_dirs, out=None, *, title=None, summary=None, stages=None, sections=None) -> Path
    read_metrics(run_dir) -> list[dict]

See docs/report.md.
"""

from posttrain.report.metrics import read_metrics
from posttrain.report.page import Section, build_report

__all__ = ["Section", "build_report", "read_metrics"]
