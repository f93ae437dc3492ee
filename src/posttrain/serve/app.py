"""The HTTP layer: OpenAI's endpoints (and vLLM's adapter endpoints) over the serving engine.

    GET  /health                    {"status": "ok", "running": .., "waiting": ..}
    GET  /v1/models                 the base and every adapter
    POST /v1/chat/completions       through the model's chat template; tools in, tool_calls out
    POST /v1/completions            plain text prompts
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: any adapter type, while serving
    POST /v1/unload_lora_adapter    {"lora_name"}

Each endpoint turns its body into engine requests (one per choice, `n`), then either waits for
them or streams server-sent events. A client that goes away cancels its requests: a stream's
generator is cancelled by Starlette when the client disconnects, and a plain request watches
for the ASGI ``http.disconnect`` message while it waits.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from posttrain.rollout import SamplingParams
from posttrain.serve import responses
from posttrain.serve.engine import Engine
from posttrain.serve.requests import Delta, Request
from posttrain.serve.protocol import (
    APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, parse_body,
)


class Server:
    """What the endpoints share: the engine, the names it answers to, and the limits."""

    def __init__(self, engine: Engine, *, base_name: str, max_model_len: int, api_key: Optional[str] = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.base_name = base_name
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.created = int(time.time())

    def names(self) -> list[str]:
        return [self.base_name, *self.engine.adapters.adapters]

    def resolve(self, name: str):
        """The adapter a request's `model` names (None: the base); 404 listing the names otherwise."""
        if name == self.base_name:
            return None
        served = self.engine.adapters.adapters.get(name)
        if served is None or served.retired:
            raise APIError(404, f"The model '{name}' does not exist. Available models: {', '.join(self.names())}",
                           param="model", code="model_not_found")
        return served

    def check_length(self, prompt_len: int, max_tokens: Optional[int], field: str) -> int:
        """The completion budget; 400 when the prompt plus `max_tokens` exceeds the context length."""
        room = self.max_model_len - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = f"{prompt_len + (max_tokens or 0)} tokens ({prompt_len} in the prompt, {max_tokens or 0} " \
                    "in the completion)"
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"you requested {asked}. Please reduce the length of the prompt or max_tokens.",
                           param=field, code="context_length_exceeded")
        return max_tokens or room


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if server.engine._thread is None:
            server.engine.start()
        yield
        # uvicorn has already waited for open connections (Ctrl-C drains them); then the loop ends
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="posttrain serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent.encode(), f"Bearer {server.api_key}".encode()):
                err = APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "running": e.num_running, "waiting": e.num_waiting, **e.stats}

    @app.get("/v1/models")
    async def models():
        rows = [{"id": server.base_name, "object": "model", "created": server.created, "owned_by": "posttrain",
                 "root": server.base_name, "parent": None}]
        for name, a in server.engine.adapters.adapters.items():
            rows.append({"id": name, "object": "model", "created": server.created, "owned_by": "posttrain",
                         "root": a.path, "parent": server.base_name, "adapter_type": a.kind})
        return {"object": "list", "data": rows}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HTTPRequest):
        body = parse_body(await request.body(), LoadAdapterRequest)
        if body.lora_name in server.names():
            raise APIError(400, f"The model '{body.lora_name}' is already loaded", param="lora_name")
        try:
            await asyncio.wrap_future(server.engine.call(server.engine.adapters.load, body.lora_name, body.lora_path))
        except (ValueError, OSError) as e:
            raise APIError(400, f"could not load adapter '{body.lora_name}': {e}", param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HTTPRequest):
        body = parse_body(await request.body(), UnloadAdapterRequest)
        if body.lora_name not in server.engine.adapters.adapters:
            raise APIError(404, f"The adapter '{body.lora_name}' is not loaded; loaded: "
                           f"{', '.join(server.engine.adapters.adapters) or 'none'}", param="lora_name")
        served = server.engine.adapters.adapters[body.lora_name]
        served.retired = True  # new requests for it get a 404 from here on
        # requests already using it finish first: the stacks are rebuilt without it afterwards
        while not await asyncio.wrap_future(server.engine.call(_unload_if_unused, server.engine, served)):
            await asyncio.sleep(0.05)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = parse_body(await request.body(), ChatRequest)
        adapter = server.resolve(body.model)
        prompt, forced = responses.render(server.tokenizer, body)
        ids = server.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        limit = server.check_length(len(ids), body.completion_limit(),
                                    "max_completion_tokens" if body.max_completion_tokens else "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        reqs = _requests(server, body, ids, adapter, limit, top)
        shape = responses.ChatShape(body, server.tokenizer, forced)
        if body.stream:
            return _stream(request, reqs, shape)
        if not await _wait(request, reqs):
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        return shape.response(reqs)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = parse_body(await request.body(), CompletionRequest)
        adapter = server.resolve(body.model)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = responses.completion_prompts(server.tokenizer, body.prompt)
        if len(prompts) * body.n > server.engine.max_batch * 4:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than this server takes in one "
                           f"request ({server.engine.max_batch * 4})", param="prompt")
        reqs = []
        for ids in prompts:
            limit = server.check_length(len(ids), body.max_tokens, "prompt")
            reqs += _requests(server, body, ids, adapter, limit, body.logprobs)
        shape = responses.CompletionShape(body, server.tokenizer)
        if body.stream:
            return _stream(request, reqs, shape)
        if not await _wait(request, reqs):
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        return shape.response(reqs)

    return app


def _unload_if_unused(engine: Engine, served) -> bool:
    if engine.in_use(served):
        return False
    engine.adapters.unload(served.name)
    return True


def _requests(server: Server, body, ids, adapter, limit: int, logprobs: Optional[int]) -> list[Request]:
    loop = asyncio.get_running_loop()
    out = []
    for i in range(body.n):
        params = SamplingParams(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stops(), seed=None if body.seed is None else body.seed + i)
        q: asyncio.Queue = asyncio.Queue()
        req = Request(list(ids), params, adapter, logprobs=logprobs, stream=body.stream, ignore_eos=body.ignore_eos,
                      on_delta=lambda d, q=q: loop.call_soon_threadsafe(q.put_nowait, d))
        req.sink = q
        out.append(req)
    for r in out:
        server.engine.submit(r)
    return out


async def _wait(http: HTTPRequest, reqs: list[Request]) -> bool:
    """Wait for every request to finish (True); cancel them all if the client disconnects first (False)."""

    async def finished():
        for r in reqs:
            while (await r.sink.get()).finish_reason is None:
                pass

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.create_task(finished()), asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        done_task.cancel()
        gone_task.cancel()
    if gone_task in done:
        for r in reqs:
            r.cancel()
        return False
    if any(r.finish_reason == "error" for r in reqs):
        raise APIError(500, "generation failed on the server; see its log")
    return True


def _stream(http: HTTPRequest, reqs: list[Request], shape) -> StreamingResponse:
    async def events():
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, r):
            while True:
                d: Delta = await r.sink.get()
                await merged.put((i, d))
                if d.finish_reason is not None:
                    return

        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            for chunk in shape.stream_start():
                yield _sse(chunk)
            left = len(reqs)
            while left:
                i, d = await merged.get()
                for chunk in shape.stream_delta(i, reqs[i], d):
                    yield _sse(chunk)
                left -= d.finish_reason is not None
            for chunk in shape.stream_end(reqs):
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            # reached on normal completion and when Starlette cancels us because the client left
            for p in pumps:
                p.cancel()
            for r in reqs:
                r.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"
