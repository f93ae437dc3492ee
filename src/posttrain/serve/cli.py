"""`posttrain serve` and `posttrain chat`: load a model and its adapters, then serve or chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from posttrain.serve.engine import Engine
from posttrain.models.adapters import AdapterFormatError, adapter_type, is_adapted, merge, read_adapter
from posttrain.models.loading import load
from posttrain.serve.app import Server, create_app
from posttrain.serve.playground import chat_loop

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeError(Exception):
    """A bad command line or adapter, reported as one line by the CLI."""


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` (or `DIR`, named after its folder) -> {name: dir}, refusing duplicate names."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = _default_name(spec), spec
        if not name or not path:
            raise ServeError(f"--adapter {spec!r}: expected NAME=DIR or DIR")
        if name in out:
            raise ServeError(f"--adapter: the name {name!r} is given twice ({out[name]} and {path})")
        out[name] = path
    return out


def _default_name(path: str) -> str:
    p = Path(path)
    # a run's adapter lives in RUN/model: name it after the run
    return p.parent.name if p.name in ("model", "adapter") and p.parent.name else p.name


def build_engine(model: str, adapters: dict[str, str], *, max_batch: int = 64, dtype: str = "fp32",
                 device: str = "auto", trust_remote_code: bool = False) -> Engine:
    """Load MODEL (a finished run, an HF directory or a hub name) and every adapter on it."""
    for name, path in adapters.items():  # a wrong directory fails before the model loads
        try:
            read_adapter(path)
        except AdapterFormatError as e:
            raise ServeError(f"--adapter {name}={path}: {e}") from None
    m, tok = load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if is_adapted(m):  # MODEL was an adapter run: serve its base with the adapter folded in
        if adapter_type(m) in ("prompt", "prefix"):
            raise ServeError(f"{model} is a {adapter_type(m)}-tuning run, which cannot be merged into its base; "
                             f"serve the base with --adapter NAME={model}")
        merge(m)
        m.requires_grad_(False)
    engine = Engine(m, tok, max_batch=max_batch)
    for name, path in adapters.items():
        if name == model:
            raise ServeError(f"--adapter {name}: that name is the base model's; pick another")
        try:
            engine.adapters.load(name, path)
        except (AdapterFormatError, ValueError) as e:
            raise ServeError(f"--adapter {name}={path}: {e}") from None
    return engine


def check_host(host: str, api_key: Optional[str]) -> None:
    if host not in LOCAL_HOSTS and not api_key:
        raise ServeError(f"refusing to bind {host} without --api-key: anyone who can reach this machine could "
                         "use the model. Pass --api-key KEY (clients then send 'Authorization: Bearer KEY'), "
                         "or bind 127.0.0.1")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain serve", description="An OpenAI-compatible server with per-request "
                                "adapters (see docs/serve.md).")
    p.add_argument("model", help="a finished run, an HF model directory or a hub name")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter (PEFT format: LoRA, rsLoRA, DoRA, prompt, prefix) served as model NAME; repeat")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together (default 64)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's context length)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: MODEL)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-level", default="info")
    return p


def max_model_len(engine: Engine, asked: Optional[int]) -> int:
    limit = getattr(engine.model.config, "max_position_embeddings", None) or 2048
    if asked is None:
        return limit
    if asked < 1 or asked > limit:
        raise ServeError(f"--max-model-len {asked}: must be between 1 and the model's context length {limit}")
    return asked


def serve_main(argv: list[str]) -> int:
    try:
        import uvicorn  # noqa: F401  (the serve extra; checked before the model loads)

    except ImportError as e:
        raise ServeError(f"posttrain serve needs the serve extra: pip install 'posttrain[serve]' ({e})") from None
    a = serve_parser().parse_args(argv)
    check_host(a.host, a.api_key)
    if a.max_batch < 1:
        raise ServeError(f"--max-batch must be >= 1, got {a.max_batch}")
    engine = build_engine(a.model, parse_adapters(a.adapter), max_batch=a.max_batch, dtype=a.dtype,
                          device=a.device, trust_remote_code=a.trust_remote_code)
    server = Server(engine, base_name=a.served_model_name or a.model,
                    max_model_len=max_model_len(engine, a.max_model_len), api_key=a.api_key)
    print(f"posttrain: serving {', '.join(server.names())} on http://{a.host}:{a.port}/v1", file=sys.stderr)
    import uvicorn

    # timeout_graceful_shutdown=None: Ctrl-C stops accepting, then waits for every open request
    uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=None)
    return 0


def chat_main(argv: list[str], stdin=None, stdout=None) -> int:
    p = argparse.ArgumentParser(prog="posttrain chat", description="Chat with a model in the terminal.")
    p.add_argument("model", help="a finished run, an HF model directory or a hub name")
    p.add_argument("--adapter", default=None, help="an adapter directory (PEFT format)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = p.parse_args(argv)
    adapters = {"adapter": a.adapter} if a.adapter else {}
    engine = build_engine(a.model, adapters, max_batch=1, dtype=a.dtype).start()
    try:
        chat_loop(engine, adapter="adapter" if a.adapter else None, system=a.system, max_tokens=a.max_tokens,
                  temperature=a.temperature, top_p=a.top_p, stdin=stdin or sys.stdin, stdout=stdout or sys.stdout)
    finally:
        engine.stop()
    return 0
