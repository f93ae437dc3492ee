"""`posttrain studio [--runs DIR] [--host 127.0.0.1] [--port 7860] [--api-key KEY]`."""

from __future__ import annotations

import argparse
import sys

from posttrain.serve.cli import LOCAL_HOSTS
from posttrain.studio.app import Studio, create_app


class StudioError(Exception):
    """A bad command line, reported as one line."""


def studio_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain studio", description="A local web app to launch, watch, compare "
                                "and talk to runs (see docs/studio.md).")
    p.add_argument("--runs", default="runs", help="the folder of runs it shows, and where launched runs go "
                   "(default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=None, help="require this key (open /?key=KEY once in the browser)")
    p.add_argument("--log-level", default="warning")
    return p


def check_host(host: str, api_key: str | None) -> None:
    if host not in LOCAL_HOSTS and not api_key:
        raise StudioError(f"refusing to bind {host} without --api-key: the studio starts training runs, so anyone "
                          "who can reach this machine could use it. Pass --api-key KEY, or bind 127.0.0.1")


def studio_main(argv: list[str]) -> int:
    a = studio_parser().parse_args(argv)
    check_host(a.host, a.api_key)
    try:
        import uvicorn

    except ImportError as e:
        raise StudioError(f"posttrain studio needs the studio extra: pip install 'posttrain[studio]' ({e})") from None
    studio = Studio(a.runs, api_key=a.api_key)
    print(f"posttrain studio: {studio.runs} on http://{a.host}:{a.port}/", file=sys.stderr)
    uvicorn.run(create_app(studio), host=a.host, port=a.port, log_level=a.log_level)
    return 0
