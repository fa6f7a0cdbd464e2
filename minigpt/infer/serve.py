"""An OpenAI-compatible HTTP server for a run: /v1/models, /v1/completions, /v1/chat/completions.

FastAPI + uvicorn (the `serve` extra). Requests wait in a queue; one worker thread takes up to
`max_batch` of them that share sampling settings and decodes them as one batch with the static KV
cache (minigpt.generate), so concurrent requests share each forward pass. Tokens reach each
request as they are generated: streamed as server-sent events (`"stream": true`) or gathered into
one response. A request stops at its own max_tokens or at end-of-text; when every request of a
batch has stopped, or its client has gone, the batch ends early and its slots are free for the
queue. Bad requests get a 4xx with an OpenAI-style JSON error body; the server keeps serving.

Chat uses a plain template: one "role: content" line per message, then "assistant:".
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from minigpt.core.errors import UserError
from minigpt.infer.evaluate import next_logprobs, token_logprobs
from minigpt.infer.generate import IncrementalText, filtered_probs, generate_ids
from minigpt.train.checkpoint import load_run


@dataclass(frozen=True)
class Limits:
    """What the server refuses before any work: a missing or wrong API key (401, every endpoint but /health),
    a body over max_body_bytes or without a length (413, 411), max_tokens over max_tokens (400)."""
    api_key: str = ""  # "": no key asked (the default on 127.0.0.1)
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_queue: int = 256  # requests waiting beyond the running batch; more get 503 with Retry-After


class _Request(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    seed: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids, batches of token ids
    logprobs: int | None = Field(None, ge=0, le=20)  # the legacy API's: the top-N log-probabilities per token
    echo: bool = False  # return (and, with logprobs, score) the prompt too


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def chat_prompt(messages: list[ChatMessage]) -> str:
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    sampling: tuple  # (temperature, top_p, seed): jobs batch together only when equal
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # text deltas, then None
    text: IncrementalText | None = None  # the tokens generated, as text
    done: bool = False
    cancelled: bool = False
    finish_reason: str = "length"
    t_submit: float = 0.0  # perf_counter at submission, at the first token (metrics)
    t_first: float = 0.0


class Engine:
    """The queue and the one worker thread that batches and decodes."""

    def __init__(self, model, eot: int | None, max_batch: int) -> None:
        self.model, self.eot, self.max_batch = model, eot, max_batch
        self.pending: queue.Queue[Job] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for tests and logs)
        self.cancelled = 0  # requests whose client went away before they finished
        self.open_jobs: list[Job] = []  # submitted, for the queue limit (event-loop side only)
        self.metrics = None  # a ServeMetrics when prometheus-client is installed
        threading.Thread(target=self._run, daemon=True, name="minigpt-decode").start()

    def submit(self, job: Job) -> None:
        job.t_submit = time.perf_counter()
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(job.ids))
        self.open_jobs.append(job)
        self.pending.put(job)

    def unfinished(self) -> int:
        """Requests taken and not finished (decoding or queued); the finished are forgotten here."""
        self.open_jobs = [j for j in self.open_jobs if not (j.done or j.cancelled)]
        return len(self.open_jobs)

    def _run(self) -> None:
        held: list[Job] = []  # queued jobs whose sampling differs from the batch being formed
        while True:
            first = held.pop(0) if held else self.pending.get()
            batch = [first] + [j for j in held if j.sampling == first.sampling][: self.max_batch - 1]
            held = [j for j in held if j not in batch]
            while len(batch) < self.max_batch:
                try:
                    job = self.pending.get(timeout=0.02)  # a moment for concurrent requests to join
                except queue.Empty:
                    break
                (batch if job.sampling == first.sampling else held).append(job)
            batch = [j for j in batch if not j.cancelled]
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        self.batches.append(len(batch))
        if self.metrics is not None:
            self.metrics.running.set(len(batch))
        temperature, top_p, seed = batch[0].sampling
        try:
            generate_ids(self.model, [j.ids for j in batch], max(j.max_tokens for j in batch), temperature=temperature,
                         top_p=top_p, seed=seed if seed is not None else int(time.time()), eot_id=None,
                         on_token=lambda column: self._deliver(batch, column))
        except Exception as e:  # a bug: end the requests with it rather than leave them waiting
            for j in batch:
                j.finish_reason = f"error: {e}"
        for j in batch:
            if not j.done:
                self._finish(j, j.finish_reason)
        if self.metrics is not None:
            self.metrics.running.set(0)
            for j in batch:
                self.metrics.finished(j)

    def _deliver(self, batch: list[Job], column: list[int]) -> bool:
        """Hand each row's new token to its request; True when every row is done (decoding ends)."""
        for j, token in zip(batch, column):
            if j.done:
                continue
            if j.cancelled:
                self.cancelled += 1
                self._finish(j, "cancelled")
                continue
            if self.eot is not None and token == self.eot:
                self._finish(j, "stop")
                continue
            j.t_first = j.t_first or time.perf_counter()
            piece = j.text.push(token)
            if piece:
                j.loop.call_soon_threadsafe(j.out.put_nowait, piece)
            if len(j.text.tokens) >= j.max_tokens:
                self._finish(j, "length")
        return all(j.done for j in batch)

    @staticmethod
    def _finish(j: Job, reason: str) -> None:
        j.done, j.finish_reason = True, reason
        j.loop.call_soon_threadsafe(j.out.put_nowait, None)


def create_app(model, tokenizer, model_name: str, eot: int | None, max_batch: int = 8,
               limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="minigpt", description=f"OpenAI-compatible API for {model_name}")
    engine = Engine(model, eot, max_batch)
    app.state.engine = engine
    block = model.config.block_size
    rope = model.config.pos_emb == "rope"
    _add_error_handlers(app)
    _add_guard(app, limits)

    _add_health_and_metrics(app, engine, model_name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minigpt"}]}

    prepare = functools.partial(_prepare, model_name, tokenizer, block, rope, limits.max_tokens)

    async def run(request: Request, prompts: list[str], body, chat: bool):
        loop = asyncio.get_running_loop()
        # tokenizing is CPU work: off the event loop, so a large prompt does not stall every other client
        _admit(engine, limits, len(prompts))
        ids = await asyncio.to_thread(lambda: [prepare(body.model, p, body.max_tokens) for p in prompts])
        jobs = [Job(i, body.max_tokens, (body.temperature, body.top_p, body.seed), loop,
                    text=IncrementalText(tokenizer)) for i in ids]
        for j in jobs:
            engine.submit(j)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            return StreamingResponse(_sse(request, jobs[0], rid, model_name, chat), media_type="text/event-stream")
        texts = []
        for j in jobs:
            parts = []
            while (delta := await j.out.get()) is not None:
                parts.append(delta)
            texts.append("".join(parts))
        return _response(rid, model_name, jobs, texts, chat)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompts = _prompts(body.prompt, tokenizer)
        if body.logprobs is None and not body.echo:  # the batching engine takes texts
            prompts = [tokenizer.decode(p) if isinstance(p, list) else p for p in prompts]
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "streaming takes one prompt", code=None)
        if body.logprobs is not None or body.echo:
            if body.stream:
                raise ApiError(400, "logprobs and echo are answered whole: set stream to false", code=None)
            _check_model(body.model, model_name)
            return await asyncio.to_thread(_scored, model, tokenizer, model_name, prompts, body)
        return await run(request, prompts, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await run(request, [chat_prompt(body.messages)], body, chat=True)

    return app


def _add_health_and_metrics(app: FastAPI, engine: Engine, model_name: str) -> None:
    """GET /health (no key asked: for load balancers) and GET /metrics in Prometheus' text format
    (prometheus-client); 501 saying what to install without it."""

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    try:
        from minigpt.infer.metrics import ServeMetrics

        engine.metrics = ServeMetrics(engine)
    except ImportError:
        engine.metrics = None

    @app.get("/metrics")
    async def metrics():
        if engine.metrics is None:
            raise ApiError(501, "metrics need prometheus-client: pip install 'minigpt[serve]'", "server_error")
        body, kind = engine.metrics.exposition()
        return Response(body, media_type=kind)


def _admit(engine: Engine, limits: Limits, n: int) -> None:
    """503 with Retry-After when n more requests would wait beyond the running batch and the queue."""
    if engine.unfinished() + n > engine.max_batch + limits.max_queue:
        raise ApiError(503, f"the queue is full ({limits.max_queue} requests wait beyond the running batch of "
                            f"{engine.max_batch}): retry shortly", "server_error", "queue_full", {"Retry-After": "1"})


def _check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}", code="model_not_found")


def _prepare(model_name: str, tokenizer, block: int, rope: bool, limit: int, name: str, prompt: str,
             max_tokens: int) -> list[int]:
    """The prompt's tokens, or the 4xx that refuses it."""
    _check_model(name, model_name)
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens = {max_tokens} is over this server's limit of {limit} (serve --max-tokens-limit)")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ApiError(400, "the prompt is empty")
    if len(ids) >= block:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {block}: shorten it",
                       code="context_length_exceeded")
    if not rope and len(ids) + max_tokens > block:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {block}",
                       code="context_length_exceeded")
    return ids


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def _add_guard(app: FastAPI, limits: Limits) -> None:
    app.add_middleware(_Guard, limits=limits)


class _Guard:
    """The API key and the body size, checked before a body is read or a handler runs. Plain ASGI (not
    Starlette's BaseHTTPMiddleware, which wraps `receive` and hides a streaming client's disconnect)."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        send = _counting(scope, send)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limits = self.limits
        if limits.api_key and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                return _error(401, "a missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server "
                                   "was started with (serve --api-key or MINIGPT_API_KEY)", "invalid_api_key")
        if scope.get("method") == "POST":
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "send the body with a Content-Length header (chunked bodies are not taken)")
            if int(length) > limits.max_body_bytes:
                return _error(413, f"the body is {int(length):,} bytes; this server takes at most "
                                   f"{limits.max_body_bytes:,} (serve --max-body-bytes)")
        return None


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _counting(scope, send):
    """`send`, counting the response's status per endpoint in the app's metrics (when there are any)."""
    engine = getattr(scope["app"].state, "engine", None) if "app" in scope else None
    metrics = getattr(engine, "metrics", None)
    if metrics is None:
        return send
    endpoint = scope.get("path") if scope.get("path") in ENDPOINTS else "other"

    async def counted(message):
        if message["type"] == "http.response.start":
            metrics.requests.labels(endpoint, str(message["status"])).inc()
        await send(message)

    return counted


def _add_error_handlers(app: FastAPI) -> None:
    """Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a 4xx status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}}, e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return JSONResponse({"error": {"message": f"{where or 'body'}: {first.get('msg')}", "type": "invalid_request_error",
                                       "param": where or None, "code": None}}, 400)


def _prompts(prompt, tokenizer) -> list[str | list[int]]:
    """The prompts of a completion request: texts, or token-id lists kept as ids (an id outside the
    vocabulary, or an empty prompt, is a 400)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty: give a text or token ids", code=None)
    vocab = tokenizer.get_vocab_size()
    for p in prompt:
        if isinstance(p, list) and (not p or any(not 0 <= i < vocab for i in p)):
            raise ApiError(400, f"a token-id prompt is empty or has an id outside [0, {vocab})", code=None)
    return list(prompt)


MAX_SCORED_TOKENS = 1 << 16  # prompt tokens a logprobs/echo request may ask to score
MAX_SCORED_NEW = 256  # tokens it may generate (each is one forward pass without the KV cache)


def _scored(model, tokenizer, name: str, prompts: list[str], body) -> dict:
    """A completion with the legacy API's logprobs (and echo): each token's log-probability under the model
    (raw: before temperature), the top-N per position, the prompt's own with echo. Scored without the KV
    cache: one forward pass per new token (next_logprobs), then one per window to score (token_logprobs); greedy
    at temperature 0."""
    generator = torch.Generator().manual_seed(body.seed if body.seed is not None else int(time.time()))
    choices, used = [], [0, 0]
    if body.max_tokens > MAX_SCORED_NEW:
        raise ApiError(400, f"max_tokens {body.max_tokens} with logprobs/echo: at most {MAX_SCORED_NEW}", code=None)
    for i, prompt in enumerate(prompts):
        ids = prompt if isinstance(prompt, list) else (tokenizer.encode(prompt).ids or [0])
        text = tokenizer.decode(ids) if isinstance(prompt, list) else prompt
        if len(ids) > MAX_SCORED_TOKENS:
            raise ApiError(400, f"a prompt of {len(ids):,} tokens: at most {MAX_SCORED_TOKENS:,} are scored", code=None)
        new = []
        for _ in range(body.max_tokens):
            probs = filtered_probs(next_logprobs(model, ids + new).unsqueeze(0), body.temperature, 0, body.top_p)
            new.append(int(probs.argmax(-1)) if body.temperature == 0 else int(torch.multinomial(probs, 1, generator=generator)))
        lps, tops = token_logprobs(model, ids + new, max(body.logprobs or 0, 1))
        keep = slice(0, None) if body.echo else slice(len(ids), None)
        tokens = [tokenizer.decode([t]) for t in (ids + new)[keep]]
        logprobs = None if body.logprobs is None else {
            "tokens": tokens, "token_logprobs": lps[keep],
            "top_logprobs": [None if d is None else {tokenizer.decode([k]): v for k, v in list(d.items())[:max(body.logprobs, 1)]}
                             for d in tops[keep]],
            "text_offset": [sum(len(s) for s in tokens[:j]) for j in range(len(tokens))]}
        choices.append({"index": i, "text": (text if body.echo else "") + tokenizer.decode(new), "logprobs": logprobs,
                        "finish_reason": "length"})
        used = [used[0] + len(ids), used[1] + len(new)]
    return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": choices, "usage": {"prompt_tokens": used[0], "completion_tokens": used[1],
                                          "total_tokens": sum(used)}}


def _response(rid: str, name: str, jobs: list[Job], texts: list[str], chat: bool) -> dict:
    usage = {"prompt_tokens": sum(len(j.ids) for j in jobs), "completion_tokens": sum(len(j.text.tokens) for j in jobs)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": j.finish_reason}
                   for i, (j, t) in enumerate(zip(jobs, texts))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": j.finish_reason}
                   for i, (j, t) in enumerate(zip(jobs, texts))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": usage}


async def _sse(request: Request, job: Job, rid: str, name: str, chat: bool):
    """Server-sent events: one chunk per text delta, a last one with the finish reason, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None) -> str:
        choice = ({"index": 0, "delta": {"content": delta} if delta is not None else {}, "finish_reason": finish} if chat
                  else {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish})
        return "data: " + json.dumps({"id": rid, "object": kind, "created": int(time.time()), "model": name,
                                      "choices": [choice]}) + "\n\n"
    try:
        if chat:
            yield "data: " + json.dumps({"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": [
                {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}) + "\n\n"
        while (delta := await job.out.get()) is not None:
            yield chunk(delta, None)
        yield chunk(None, job.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a client that went away frees its slot at the next token


def check_address(host: str, port: int) -> None:
    """Refuse, before the model is loaded, an address this machine cannot listen on: one line."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host} is not an address of this machine ({getattr(e, 'strerror', None) or e}); "
                        f"use e.g. 127.0.0.1") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another "
                            f"address or port") from None


def serve(run_dir: str, host: str, port: int, max_batch: int, device: str = "cpu", quantize: str = "",
          limits: Limits = Limits()) -> None:
    import uvicorn

    check_address(host, port)
    model, tokenizer, cfg, step = load_run(run_dir, device)
    if quantize:
        from minigpt.infer.quantize import quantize_model

        quantize_model(model, quantize)
    name = f"minigpt-{run_dir.rstrip('/').split('/')[-1]}"
    app = create_app(model, tokenizer, name, tokenizer.token_to_id(cfg.sample.stop_token), max_batch, limits)
    print(f"serving {run_dir} (step {step}{', weights ' + quantize if quantize else ''}) as model {name!r} on "
          f"http://{host}:{port}/v1 (batches of up to {max_batch})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
