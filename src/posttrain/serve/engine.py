"""Continuous batching over one KV cache, with a different adapter per row.

One thread owns the model. Each turn of its loop:

1. runs queued commands (loading or unloading an adapter) while no forward is in flight;
2. drops cancelled and finished rows from the batch (and the cache);
3. admits waiting requests up to `max_batch` rows: their prompts are prefilled together,
   left-padded, and their caches join the running cache (both sides left-padded to one width);
4. decodes one token for every running row in a single forward.

So a request joins between two decoding steps instead of waiting for the batch to drain
(Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-based Generative
Models", iteration-level scheduling). Every row carries its own attention-mask row and
position ids, so padding columns are never attended and a row computes what it would
compute alone: greedy output does not depend on what else is in the batch (tested).

Prompt tuning rows prefill from their virtual embeddings followed by the prompt; prefix
tuning rows start with their prefix keys and values in the cache; both then decode like
any other row.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch

from posttrain.models.adapters.prompt import kv_geometry
from posttrain.rollout import SamplingParams, default_stop_ids, sample_next
from posttrain.serve.adapters import AdapterSet, ServedAdapter
from posttrain.serve.requests import Delta, Request, TokenLogprob, _Detokenizer

log = logging.getLogger(__name__)


class Engine:
    """The serving loop. `submit` is thread-safe; results arrive through `Request.on_delta`."""

    def __init__(self, model, tokenizer, *, max_batch: int = 64, adapters: Optional[AdapterSet] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.adapters = adapters or AdapterSet(model)
        self.stop_ids = default_stop_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "steps": 0, "prefills": 0,
                      "generated_tokens": 0, "max_running": 0}
        self._waiting: "queue.Queue[Request]" = queue.Queue()
        self._commands: "queue.Queue[tuple[Callable, Future]]" = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        # the running batch: rows, their cache, attention-mask rows and next positions
        self._rows: list[Request] = []
        self._cache = None
        self._mask: Optional[torch.Tensor] = None  # [B, W] long
        self._pos: Optional[torch.Tensor] = None  # [B] long
        self._last: Optional[torch.Tensor] = None  # [B] long, the token each row feeds next

    # ---- public, any thread ----

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="posttrain-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the running and waiting requests, then end the loop."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> Request:
        if self._stop:
            raise RuntimeError("the engine is shutting down")
        self.stats["requests"] += 1
        if request.params.seed is not None and not request.params.greedy:
            request._generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        if request.stream or request.params.stop:
            request._detok = _Detokenizer(self.tokenizer)
        self._waiting.put(request)
        self._wake.set()
        return request

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread between two steps (e.g. loading an adapter); returns a Future."""
        fut: Future = Future()
        self._commands.put((lambda: fn(*args), fut))
        self._wake.set()
        return fut

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Optional[str] = None) -> Request:
        """Blocking convenience for Python callers and tests: submit one request and wait for it."""
        done = threading.Event()
        req = Request(prompt_ids, params, self.adapters.adapters[adapter] if adapter else None,
                      on_delta=lambda d: done.set() if d.finish_reason else None)
        self.submit(req)
        done.wait()
        return req

    def in_use(self, adapter: ServedAdapter) -> bool:
        """Whether a running or waiting request uses `adapter` (call on the engine thread)."""
        return any(r.adapter is adapter for r in self._rows + list(self._waiting.queue))

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return self._waiting.qsize()

    # ---- the engine thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                self._run_commands()
                self._drop_finished()
                joiners = []
                try:
                    self._admit(joiners)
                    if self._rows:
                        self._decode()
                except Exception:  # a failed forward ends the requests in it, not the server
                    log.exception("serving step failed; its requests end with finish_reason 'error'")
                    self._fail(joiners + self._rows)
                if not self._rows:
                    if self._stop and self._waiting.empty():
                        return
                    self._wake.wait(0.05)
                    self._wake.clear()

    def _fail(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r.finish_reason is None:
                r.finish_reason = "error"
                self._deliver(r)
        self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None

    def _run_commands(self) -> None:
        while not self._commands.empty():
            fn, fut = self._commands.get()
            try:
                fut.set_result(fn())
            except Exception as e:  # handed to the caller, who turns it into an HTTP error
                fut.set_exception(e)

    def _drop_finished(self) -> None:
        for r in self._rows:
            if r.cancelled and r.finish_reason is None:
                r.finish_reason = "cancelled"
                self.stats["cancelled"] += 1
        keep = [i for i, r in enumerate(self._rows) if r.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        # columns no remaining row attends to are dropped with the rows: one copy of the cache
        first = int(mask.any(0).nonzero()[0, 0])
        self._cache = _build_cache(self.model.config, [(k[idx, :, first:], v[idx, :, first:]) for k, v in
                                                       _layers(self._cache)])
        self._mask, self._pos, self._last = mask[:, first:], self._pos[idx], self._last[idx]
        self._rows = [self._rows[i] for i in keep]

    def _admit(self, joiners: list[Request]) -> None:
        while len(self._rows) + len(joiners) < self.max_batch:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            if req.cancelled:
                req.finish_reason = "cancelled"
                self.stats["cancelled"] += 1
                continue
            joiners.append(req)
        if not joiners:
            return
        logits, cache, mask, pos = self._prefill(joiners)
        self.stats["prefills"] += 1
        self._merge(joiners, cache, mask, pos)
        start = len(self._rows) - len(joiners)
        self._emit(list(range(start, len(self._rows))), logits)

    def _prefill(self, reqs: list[Request]):
        """Prefill the new requests in one left-padded batch: (last logits [b, V], cache, mask, next positions)."""
        model, dev = self.model, self.device
        n_prefix = [r.adapter.num_virtual_tokens if r.adapter is not None and r.adapter.prefix is not None else 0
                    for r in reqs]
        n_prompt = [r.adapter.num_virtual_tokens if r.adapter is not None and r.adapter.prompt is not None else 0
                    for r in reqs]
        lengths = [n + len(r.prompt_ids) for n, r in zip(n_prompt, reqs)]
        P, L, b = max(n_prefix), max(lengths), len(reqs)
        ids = torch.full((b, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, P + L), dtype=torch.long)
        pos = torch.zeros((b, L), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = lengths[i]
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, P - n_prefix[i]:P] = 1
            mask[i, P + L - n:] = 1
            pos[i, L - n:] = torch.arange(n_prefix[i], n_prefix[i] + n)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        inputs = {"input_ids": ids}
        if any(n_prompt):
            embeds = model.get_input_embeddings()(ids)
            for i, r in enumerate(reqs):
                if n_prompt[i]:
                    s = L - lengths[i]
                    embeds[i, s:s + n_prompt[i]] = r.adapter.prompt.to(embeds.dtype)
            inputs = {"inputs_embeds": embeds}
        past = None
        if P:
            layers = model.config.num_hidden_layers
            _, kv, hd = kv_geometry(model.config)
            dtype = model.get_input_embeddings().weight.dtype
            data = []
            for layer in range(layers):
                k = torch.zeros(b, kv, P, hd, dtype=dtype, device=dev)
                v = torch.zeros_like(k)
                for i, r in enumerate(reqs):
                    if n_prefix[i]:
                        k[i, :, P - n_prefix[i]:] = r.adapter.prefix[2 * layer]
                        v[i, :, P - n_prefix[i]:] = r.adapter.prefix[2 * layer + 1]
                data.append((k, v))
            past = _build_cache(model.config, data)
        else:
            past = _build_cache(model.config, None)
        self.adapters.rows.set(self._lora_ids(reqs))
        logits = model(**inputs, attention_mask=mask, position_ids=pos, cache=past, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        return logits, past, mask, pos[:, -1] + 1

    def _lora_ids(self, reqs: list[Request]) -> Optional[torch.Tensor]:
        ids = [self.adapters.lora_index(r.adapter.name if r.adapter else None) for r in reqs]
        if not any(ids):
            return None  # no row uses LoRA: the layers run their plain base only
        return torch.tensor(ids, device=self.device)

    def _merge(self, reqs, cache, mask, pos) -> None:
        last = torch.zeros(len(reqs), dtype=torch.long, device=self.device)
        if not self._rows:
            self._rows, self._cache, self._mask, self._pos, self._last = list(reqs), cache, mask, pos, last
            return
        W = max(self._mask.shape[1], mask.shape[1])
        merged = [(torch.cat([_pad_left(k0, W), _pad_left(k1, W)]), torch.cat([_pad_left(v0, W), _pad_left(v1, W)]))
                  for (k0, v0), (k1, v1) in zip(_layers(self._cache), _layers(cache))]
        self._cache = _build_cache(self.model.config, merged)
        self._mask = torch.cat([_pad_left(self._mask, W), _pad_left(mask, W)])
        self._pos = torch.cat([self._pos, pos])
        self._last = torch.cat([self._last, last])
        self._rows = self._rows + list(reqs)

    def _decode(self) -> None:
        B = len(self._rows)
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], B)
        self._mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], dim=1)
        self.adapters.rows.set(self._lora_ids(self._rows))
        logits = self.model(input_ids=self._last[:, None], attention_mask=self._mask,
                            position_ids=self._pos[:, None], cache=self._cache, use_cache=True).logits[:, -1]
        self._pos = self._pos + 1
        self._emit(list(range(B)), logits)

    def _emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """Pick the next token of each row in `rows` (logits[i] is row rows[i]'s) and deliver it."""
        chosen = logits.argmax(-1)
        want_lp = [i for i, r in enumerate(rows) if self._rows[r].logprobs is not None]
        logp = torch.log_softmax(logits[want_lp].float(), -1) if want_lp else None
        for i, r in enumerate(rows):
            req = self._rows[r]
            if not req.params.greedy:
                chosen[i] = sample_next(logits[i:i + 1], req.params, req._generator)[0][0]
        self._last[torch.tensor(rows, device=self.device)] = chosen
        toks = chosen.tolist()
        self.stats["generated_tokens"] += len(rows)
        for i, r in enumerate(rows):
            req = self._rows[r]
            if req.finish_reason is not None:
                continue
            tok = toks[i]
            if req.logprobs is not None:
                lp = logp[want_lp.index(i)]
                top = torch.topk(lp, req.logprobs) if req.logprobs else None
                req.token_logprobs.append(TokenLogprob(tok, float(lp[tok]), [] if top is None else
                                                  list(zip(top.indices.tolist(), top.values.tolist()))))
            self._advance(req, tok)

    def _advance(self, req: Request, tok: int) -> None:
        req.tokens.append(tok)
        if tok in self.stop_ids and not req.ignore_eos:
            req.finish_reason = "stop"
        elif len(req.tokens) >= req.params.max_new_tokens:
            req.finish_reason = "length"
        # the end-of-sequence token is counted in usage but is not part of the text
        visible = req.tokens[:-1] if req.finish_reason == "stop" else req.tokens
        if req._detok is not None:
            req.text += req._detok.step(visible)
            for s in req.params.stop:
                at = req.text.find(s)
                if at >= 0:
                    req.text, req.finish_reason = req.text[:at], "stop"
        elif req.finish_reason is not None:
            req.text = self.tokenizer.decode(visible, skip_special_tokens=True)
        if req.finish_reason is not None:
            self.stats["finished"] += 1
        if req.stream or req.finish_reason is not None:
            self._deliver(req)

    def _deliver(self, req: Request) -> None:
        end = len(req.text)
        if req.finish_reason is None and req.params.stop:
            # hold back text that may still become a stop string
            end = max(req._sent, end - max(len(s) for s in req.params.stop) + 1)
        lps = req.token_logprobs[req._lp_sent:]
        req._lp_sent = len(req.token_logprobs)
        delta = Delta(req.text[req._sent:end], [], lps, req.finish_reason)
        req._sent = end
        req.on_delta(delta)


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k, v) for k, v, *_ in cache]


def _build_cache(config, data):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=data, config=config)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (dim 1 of a mask [B, W], dim 2 of keys [B, H, W, D]) on the left."""
    dim = 1 if t.dim() == 2 else 2
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Block until no request is running or waiting (tests, draining)."""
    t0 = time.monotonic()
    while engine.num_running or engine.num_waiting:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the engine did not drain")
        time.sleep(0.01)
