"""`posttrain chat`: a conversation in the terminal, streamed token by token from the serving engine.

Lines starting with ``/`` are commands: ``/reset`` forgets the conversation, ``/quit`` (or
end of input) leaves.
"""

from __future__ import annotations

import threading
from typing import Optional

from posttrain.data.tools import render_prompt
from posttrain.rollout import SamplingParams
from posttrain.serve.engine import Engine
from posttrain.serve.requests import Request


def chat_loop(engine: Engine, *, adapter: Optional[str], system: Optional[str], max_tokens: int,
              temperature: float, top_p: float, stdin, stdout) -> list[dict]:
    """Read user turns from `stdin`, stream answers to `stdout`; returns the conversation."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    served = engine.adapters.adapters[adapter] if adapter else None
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            stdout.write("\n")
            return history
        text = line.strip()
        if text == "/reset":
            history = history[:1] if system else []
            stdout.write("(conversation reset)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = engine.tokenizer(render_prompt(engine.tokenizer, history), add_special_tokens=False)["input_ids"]
        done = threading.Event()

        def show(d, done=done):
            stdout.write(d.text)
            stdout.flush()
            if d.finish_reason is not None:
                done.set()

        stdout.write("model> ")
        req = engine.submit(Request(ids, params, served, stream=True, on_delta=show))
        done.wait()
        stdout.write("\n")
        history.append({"role": "assistant", "content": req.text})
