"""Run reports: ``metrics.jsonl`` (+ ``summary.json``, config, manifest) -> one self-contained HTML page.

Public API::

    build_report(run_dirs, out=None, *, title=None, summary=None, stages=None, sections=None,
                 manifests=None) -> Path
    read_metrics(run_dir) -> list[dict]

The page is rendered from Jinja2 templates (``report/templates``); which curves are drawn and
under which heading is ``report.groups``; a run read for display is ``report.runs.load_run``
(the studio shows runs through the same three).

See docs/report.md.
"""

from posttrain.report.metrics import read_metrics
from posttrain.report.page import Section, build_report

__all__ = ["Section", "build_report", "read_metrics"]
