"""``python -m posttrain.report RUN_DIR... [--out FILE] [--title T]``; also what ``posttrain report`` calls."""

from __future__ import annotations

import argparse
import sys

from posttrain.report.page import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="posttrain report",
        description="Rebuild report.html from one or more run directories; several runs share axes.",
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output HTML file (default: <first run dir>/report.html)")
    parser.add_argument("--title", default=None, help="page title")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dirs, args.out, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"posttrain report: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
