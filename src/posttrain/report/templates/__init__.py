"""The report's Jinja2 templates, with autoescaping on: a value is text unless marked ``|safe``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

HERE = Path(__file__).parent

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1280px;
color:#1d2433;padding:0 16px;box-sizing:border-box}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:12px;margin:10px 0 4px;color:#667085;text-transform:uppercase;
letter-spacing:.04em}
.meta{color:#667085;font-size:12px}
.scroll{overflow:auto;max-width:100%;max-height:640px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde2ea;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#f3f5f9;position:sticky;top:0}td.t,th.t{text-align:left}
td:first-child,th:first-child{text-align:left;font-weight:600}
.d{display:block;font-size:11px;color:#667085}.up{color:#1a7f37}.down{color:#c62828}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #dde2ea;border-radius:6px;padding:4px;background:#fff}
img{display:block;max-width:100%}
section.stage{border-left:3px solid #dde2ea;padding-left:12px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 14px}
.card{margin:0;border:1px solid #dde2ea;border-radius:6px;padding:8px 12px;min-width:260px;max-width:400px}
.card dt{font-weight:700}.card dd{margin:2px 0;font-size:13px}.card .kv span{color:#667085}
.status{font-size:12px;border-radius:10px;padding:0 8px;background:#eef1f6}
.s-completed{background:#dcf5e3;color:#1a7f37}.s-failed{background:#fde2e1;color:#c62828}
.s-running{background:#e0ecff;color:#1f4fbf}.s-stopped-by-the-guard{background:#fff1c2;color:#9a6700}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
details.more>summary h4{display:inline-block;margin:6px 0}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:420px;font-size:12px}
.warn{color:#9a6700}
"""


@lru_cache(maxsize=None)
def environment(*extra_dirs: str) -> jinja2.Environment:
    """A Jinja2 environment over these templates (and, first, any `extra_dirs`: the studio's)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader([*extra_dirs, str(HERE)]),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False)


def render(name: str, **context) -> str:
    return environment().get_template(name).render(**context)
