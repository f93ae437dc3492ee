"""The playground: one serving engine per base model, adapters loaded on it by run, answers side by side.

Uses the serving engine (`posttrain.serve`): the base model and every adapter of it share one
model in memory and one batch, so "base" and "adapter" answer the same conversation in one
decoding loop, greedy unless a temperature is given.
"""

from __future__ import annotations

import threading
from pathlib import Path

from posttrain.data.tools import render_prompt
from posttrain.rollout import SamplingParams
from posttrain.serve.cli import build_engine
from posttrain.serve.engine import Engine
from posttrain.serve.requests import Request


class ChatError(ValueError):
    """A playground request that cannot be answered (no adapter in the run, a bad message)."""


def adapter_dir(run_dir: Path) -> Path | None:
    """The PEFT adapter a finished run published (``model/`` or ``adapter/`` with adapter_config.json)."""
    for name in ("adapter", "model"):
        d = Path(run_dir) / name
        if (d / "adapter_config.json").is_file():
            return d
    return None


class Playground:
    def __init__(self):
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def engine(self, base: str) -> Engine:
        with self._lock:
            if base not in self._engines:
                self._engines[base] = build_engine(base, {}, max_batch=8).start()
            return self._engines[base]

    def _adapter(self, engine: Engine, name: str, path: Path) -> str:
        if name not in engine.adapters.adapters:
            engine.call(engine.adapters.load, name, str(path)).result()
        return name

    def answer(self, base: str, conversations: dict[str, list[dict]], *, adapters: dict[str, Path],
               max_tokens: int = 64, temperature: float = 0.0) -> dict[str, str]:
        """Each column's next answer to its own conversation: ``"base"`` is the base model, any other
        name an adapter from `adapters` ({name: directory}). Returns {column: text}."""
        for name, messages in conversations.items():
            if name != "base" and name not in adapters:
                raise ChatError(f"column {name!r}: not 'base' and not one of the adapters {sorted(adapters)}")
            if not messages or not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in messages):
                raise ChatError(f"{name}: expected a list of {{role: system|user|assistant, content: text}}")
        if not 1 <= max_tokens <= 1024:
            raise ChatError(f"max_tokens: must be between 1 and 1024, got {max_tokens}")
        if not 0.0 <= temperature <= 2.0:
            raise ChatError(f"temperature: must be between 0 and 2, got {temperature}")
        engine = self.engine(base)
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
        done, reqs = {}, {}
        for name, messages in conversations.items():  # submitted together: one decoding batch
            served = None if name == "base" else engine.adapters.adapters[self._adapter(engine, name, adapters[name])]
            ids = engine.tokenizer(render_prompt(engine.tokenizer, messages), add_special_tokens=False)["input_ids"]
            done[name] = threading.Event()
            reqs[name] = engine.submit(Request(ids, params, served,
                                               on_delta=lambda d, e=done[name]: e.set() if d.finish_reason else None))
        for e in done.values():
            e.wait(300)
        return {name: r.text for name, r in reqs.items()}

    def close(self) -> None:
        for e in self._engines.values():
            e.stop()
        self._engines.clear()
