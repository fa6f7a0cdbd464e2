"""An OpenAI-compatible HTTP server for a run: /v1/models, /v1/completions, /v1/chat/completions.

FastAPI + uvicorn (the `serve` extra). Requests wait in a queue; one decode thread runs the engine
(minigpt.infer.engine): a request joins the running batch at the next decode step when a row is free and the paged
KV cache has blocks for its prompt, so concurrent requests share each forward pass, and each row stops on its own
(end-of-text, a stop string, max_tokens, the context, its client gone) and frees its row and blocks at once (`--batching static` instead runs a batch to
its end before the next). Tokens reach each request as they are generated: streamed as server-sent events
(`"stream": true`) or gathered into one response. Bad requests get a 4xx with an OpenAI-style JSON error body
before any work; the server keeps serving.

Chat uses a plain template (one "role: content" line per message, then "assistant:"), or for a post-trained run
(its tokenizer has the chat tokens) the template it was trained with (data/chat.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hmac
import itertools
import json
import math
import signal
import socket
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt.core.device import device_name, keep_freed_memory
from minigpt.core.errors import UserError
from minigpt.data.chat import CHAT_TOKENS, ROLES, holds_chat_token, prompt_text
from minigpt.infer.engine import Sampling, Sequence
from minigpt.infer.evaluate import token_logprobs
from minigpt.infer.detokenize import IncrementalText
from minigpt.nn.torch_private import prepack_linears
from minigpt.infer.scheduler import Job, Scheduler
from minigpt.run.load import load_run


@dataclass(frozen=True)
class Limits:
    """What the server refuses before any work: a missing or wrong API key (401, every endpoint but /health), a body
    over max_body_bytes or without a length (413, 411; the body read and dropped first, up to DRAIN_BYTES
    and DRAIN_SECONDS), max_tokens, n or prompt tokens over their limits (400), more requests than the queue
    holds (503 with Retry-After)."""
    api_key: str = ""  # "": no key asked (the default on 127.0.0.1)
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_queue: int = 256  # choices waiting beyond the running batch; more get 503 with Retry-After
    max_n: int = 16  # choices per request (and never more than the running batch)
    max_prompt_tokens: int = 0  # 0: the model's context less one


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM's extension; 0 = off
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None  # up to 4 strings that end the text (not returned)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False  # vLLM's extension: go on past end-of-text (load benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4 or any(not x for x in stops):
            raise ApiError(400, "stop: give at most 4 strings, none empty", param="stop")
        return stops


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
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers, self.param = status, message, kind, code, headers, param


def chat_prompt(messages: list[ChatMessage], template: bool = False) -> str:
    """The plain template, or for a run whose tokenizer has the chat tokens (a post-trained run) the one it was
    trained with (data/chat.py): <|user|>...<|end|> per message, then <|assistant|>; generation stops at <|end|>,
    the run's stop token. A message may not carry a chat token itself (it would open a turn of its own)."""
    if not template:
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role = {m.role!r}: this model was trained on {', '.join(ROLES)}",
                           param="messages")
        if holds_chat_token(m.content):
            raise ApiError(400, f"messages[{i}].content holds a chat token ({', '.join(CHAT_TOKENS)}): remove it",
                           param="messages")
    return prompt_text([{"role": m.role, "content": m.content} for m in messages])  # tokenized off the event loop


def create_app(model, tokenizer, model_name: str, eot: int | None, max_batch: int = 8,
               limits: Limits = Limits(), batching: str = "continuous", draft=None, k: int = 4,
               engine: dict | None = None) -> FastAPI:
    """The app over one engine; with a draft model every decode step is a speculative round of k draft tokens.
    engine: the Engine's prefill_chunk, kv_tokens and prefix_cache (infer/engine.py)."""
    app = FastAPI(title="minigpt", description=f"OpenAI-compatible API for {model_name}")
    scheduler = Scheduler(model, max_batch, batching, draft, k, **(engine or {}))
    app.state.engine = scheduler
    _add_error_handlers(app)
    _add_guard(app, limits)
    _add_health_and_metrics(app, scheduler, model_name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minigpt",
                                            "max_model_len": model.config.block_size, "vocab_size": model.config.vocab_size,
                                            "minigpt": about}]}

    prepare = functools.partial(_prepare, model_name, tokenizer, model.config.block_size, limits)
    scorer = Scorer(model, tokenizer, model_name, limits)
    about = {"config": dataclasses.asdict(model.config), "batching": batching, "max_batch": max_batch,
             "kv_cache_tokens": scheduler.engine.kv_tokens,
             "speculative": None if draft is None else {"k": k, "draft_config": dataclasses.asdict(draft.config)},
             "device": device_name(model.wte.weight.device), "torch_threads": torch.get_num_threads()}

    submit = functools.partial(_submit, scheduler, tokenizer, eot)
    generate = functools.partial(_generate_whole, scheduler, tokenizer, eot)

    async def run(prompts: list, body, chat: bool):
        _check_choices(body.n, len(prompts), scheduler, limits)
        stops = body.stops()
        # tokenizing is CPU work: off the event loop, so a large prompt does not stall every other client
        ids = await asyncio.to_thread(lambda: [prepare(body.model, p, body.max_tokens) for p in prompts])
        jobs = submit(ids, body, stops)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(jobs, rid, model_name, chat, usage), media_type="text/event-stream")
        texts = await _gather(jobs)
        return _response(rid, model_name, jobs, texts, chat)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompts = _prompts(body.prompt, tokenizer)
        if body.logprobs is not None or body.echo:
            _check_choices(body.n, len(prompts), scheduler, limits)
            return await scorer.score(prompts, body, generate)
        return await run(prompts, body, chat=False)

    template = all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await run([chat_prompt(body.messages, template)], body, chat=True)

    return app


def _submit(scheduler: Scheduler, tokenizer, eot: int | None, ids: list[list[int]], body,
            stops: tuple[str, ...]) -> list[Job]:
    """The request's choices (n per prompt) onto the engine's queue; each job streams its text as it comes. A prompt
    whose n samples this engine's cache could never hold at once is a 400 before any is queued."""
    for p in ids:
        if not scheduler.engine.holds(body.n, len(p)):
            raise ApiError(400, f"n = {body.n} samples of a {len(p)}-token prompt need more than this server's KV cache "
                                f"of {scheduler.engine.kv_tokens} tokens holds (serve --kv-cache-tokens): send a "
                                f"smaller n or a shorter prompt", param="n")
    out, loop = asyncio.Queue(), asyncio.get_running_loop()
    sampling = Sampling(body.temperature, body.top_k, body.top_p)
    stop_ids = frozenset() if body.ignore_eos or eot is None else frozenset([eot])
    groups = [[Job(Sequence(p, body.max_tokens, sampling, body.seed, stop_ids), i * body.n + k, out, loop,
                   IncrementalText(tokenizer, stops)) for k in range(body.n)] for i, p in enumerate(ids)]
    for group in groups:
        for j in group:
            j.seq.tag = j
        scheduler.submit(group)
    return [j for g in groups for j in g]


async def _generate_whole(scheduler: Scheduler, tokenizer, eot: int | None, ids: list[list[int]], body) -> list[Job]:
    """The logprobs path's tokens: generated on the engine as every request's are, awaited whole. A prompt the
    engine's context cannot hold with max_tokens more (a scoring window is block_size + 1 tokens) continues from
    its last tokens that fit, as a sliding window would."""
    room = max(1, scheduler.engine.max_len - body.max_tokens)
    jobs = _submit(scheduler, tokenizer, eot, [p[-room:] for p in ids], body, ())
    await _gather(jobs)
    return jobs


class Scorer:
    """The logprobs/echo path: under the same limits as generation (model, max_tokens, prompt tokens: at most one
    scoring window, block_size + 1 tokens, what lm-eval's API client sends; the queue), and scored one at a time
    on a thread of its own, never the tokenizing pool; at most max_queue wait, beyond that a 503."""

    def __init__(self, model, tokenizer, model_name: str, limits: Limits) -> None:
        self.model, self.tokenizer, self.model_name, self.limits = model, tokenizer, model_name, limits
        self.lock, self.waiting = asyncio.Lock(), 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="minigpt-score")

    async def score(self, prompts: list, body, generate) -> dict:
        """generate(ids, body): the engine's finished jobs for the prompts; then each is scored here."""
        if body.stream:
            raise ApiError(400, "logprobs and echo are answered whole: set stream to false", code=None)
        if body.n != 1 or body.stop:
            raise ApiError(400, "logprobs and echo take n = 1 and no stop strings", code=None)
        if body.max_tokens > MAX_SCORED_NEW:
            raise ApiError(400, f"max_tokens {body.max_tokens} with logprobs/echo: at most {MAX_SCORED_NEW}", code=None)
        block = self.model.config.block_size
        ids = await asyncio.to_thread(lambda: [_prepare(self.model_name, self.tokenizer, block, self.limits,
                                                        body.model, p, body.max_tokens, scoring=True) for p in prompts])
        if self.waiting >= self.limits.max_queue:
            raise ApiError(503, f"{self.waiting} logprobs/echo requests wait to be scored: retry shortly",
                           "server_error", "queue_full", {"Retry-After": "1"})
        self.waiting += 1
        try:
            jobs = await generate(ids, body)
            async with self.lock:
                return await asyncio.get_running_loop().run_in_executor(
                    self.pool, _scored, self.model, self.tokenizer, self.model_name, ids, jobs, prompts, body)
        finally:
            self.waiting -= 1


async def _gather(jobs: list[Job]) -> list[str]:
    """Every choice's whole text, once all have ended; a choice the engine ended with an error is a 500."""
    parts: list[list[str]] = [[] for _ in jobs]
    out, left = jobs[0].out, len(jobs)
    first = jobs[0].index
    while left:
        index, delta = await out.get()
        if delta is None:
            left -= 1
        else:
            parts[index - first].append(delta)
    failed = [j.finish_reason for j in jobs if j.finish_reason.startswith("error")]
    if failed:
        raise ApiError(500, f"generation failed ({failed[0]}): see the server's log", "server_error")
    return ["".join(p) for p in parts]


def _check_choices(n: int, prompts: int, scheduler: Scheduler, limits: Limits) -> None:
    """n within its limits, and room in the queue for every choice of the request (else 503 with Retry-After)."""
    most = min(limits.max_n, scheduler.max_batch)
    if n > most:
        raise ApiError(400, f"n = {n}: this server gives at most {most} choices a request (serve --max-n, "
                            f"--max-batch)", param="n")
    if n * prompts > scheduler.max_batch + limits.max_queue:  # can never fit: retrying cannot help
        raise ApiError(400, f"{prompts} prompt(s) x n = {n} is {n * prompts} sequences; this server holds at most "
                            f"{scheduler.max_batch + limits.max_queue} at once (running batch {scheduler.max_batch} + "
                            f"queue {limits.max_queue}): send fewer prompts or a smaller n", param="n")
    if scheduler.unfinished() + n * prompts > scheduler.max_batch + limits.max_queue:
        raise ApiError(503, f"the queue is full ({limits.max_queue} requests wait beyond the running batch of "
                            f"{scheduler.max_batch}): retry shortly", "server_error", "queue_full", {"Retry-After": "1"})


def _add_health_and_metrics(app: FastAPI, engine: Scheduler, model_name: str) -> None:
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


def _check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}", code="model_not_found")


def _prepare(model_name: str, tokenizer, block: int, limits: Limits, name: str, prompt: str | list[int],
             max_tokens: int, scoring: bool = False) -> list[int]:
    """The prompt's tokens (a text tokenized, or token ids as given), or the 4xx that refuses it. scoring: the prompt
    may fill one scoring window (block + 1 tokens) and prompt + max_tokens may pass `block` (scoring slides a window;
    its work is bounded by max_tokens)."""
    _check_model(name, model_name)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens = {max_tokens} is over this server's limit of {limits.max_tokens} "
                            f"(serve --max-tokens-limit)", param="max_tokens")
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"the prompt is not valid Unicode text ({e.reason} at character {e.start}): send UTF-8 "
                                f"text", param="prompt") from None
    ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt).ids
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    window = block + 1 if scoring else block - 1  # scoring: one window of block + 1 tokens (the last needs no forward)
    most = min(limits.max_prompt_tokens or window, window)
    if len(ids) > most:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server takes at most {most} (context {block}): "
                            f"shorten it", code="context_length_exceeded", param="prompt")
    if not scoring and len(ids) + max_tokens > block:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {block}",
                       code="context_length_exceeded", param="max_tokens")
    return ids


def _error(status: int, message: str, code: str | None = None, param: str | None = None, kind: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    kind = kind or ("authentication_error" if status == 401 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


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
            await _drain(receive, DRAIN_BYTES, DRAIN_SECONDS)
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


# A refused request's body is read and dropped up to this many bytes before the answer goes out (as nginx's
# lingering close): closing a connection with unread bytes makes the client's kernel see a reset, and the
# client loses the 413 / 411 / 401 it was sent. Beyond this many bytes or seconds (a client that declares a
# body and sends it slowly, or not at all) the answer goes out and the connection is closed unread.
DRAIN_BYTES = 16 << 20
DRAIN_SECONDS = 5.0


async def _drain(receive, limit: int, seconds: float) -> None:
    """Read and discard a request's body, at most `limit` bytes of it and for at most `seconds`."""
    async def read() -> None:
        seen = 0
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read(), seconds)
    except asyncio.TimeoutError:
        pass


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
    """Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a 4xx status, including those
    FastAPI raises itself (a body that is not JSON or not UTF-8, an unknown path, a wrong method)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.code, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": [], "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # loc is ("body", character offset): not a field
            at = first.get("loc", ["", "?"])[-1]
            return _error(400, f"the body is not valid JSON (at character {at}: {first.get('ctx', {}).get('error', '')})")
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # a bug or a broken model: still OpenAI's shape
        return _error(500, f"the server failed on this request ({type(e).__name__}); it keeps serving others",
                      code="internal_error", kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = "the body is not valid UTF-8 JSON" if e.status_code == 400 else str(e.detail)
        return _error(e.status_code, message, kind="invalid_request_error", headers=getattr(e, "headers", None))


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


MAX_SCORED_NEW = 256  # tokens a logprobs/echo request may generate (then scored in one window)


def _scored(model, tokenizer, name: str, ids_list: list[list[int]], jobs: list[Job], prompts: list, body) -> dict:
    """A completion with the legacy API's logprobs (and echo): the engine's tokens, each scored under the model
    (raw: before temperature) with the top-N per position, the prompt's own with echo. The prompts come tokenized and
    checked (Scorer): at most one window each, so scoring is one forward pass over prompt + completion."""
    choices, used = [], [0, 0]
    for i, (ids, job, prompt) in enumerate(zip(ids_list, jobs, prompts)):
        new = job.seq.tokens
        text = tokenizer.decode(ids) if isinstance(prompt, list) else prompt
        lps, tops = token_logprobs(model, ids + new, max(body.logprobs or 0, 1))
        if not all(math.isfinite(x) for x in lps[1:]):
            raise ApiError(500, "the model's log-probabilities are not finite (NaN weights?): it cannot be scored",
                           "server_error", "model_error")
        keep = slice(0, None) if body.echo else slice(len(ids), None)
        tokens = [tokenizer.decode([t]) for t in (ids + new)[keep]]
        logprobs = None if body.logprobs is None else {
            "tokens": tokens, "token_logprobs": lps[keep],
            "top_logprobs": [None if d is None else {tokenizer.decode([k]): v for k, v in list(d.items())[:max(body.logprobs, 1)]}
                             for d in tops[keep]],
            "text_offset": list(itertools.accumulate((len(s) for s in tokens[:-1]), initial=0)) if tokens else []}
        choices.append({"index": i, "text": (text if body.echo else "") + tokenizer.decode(new), "logprobs": logprobs,
                        "finish_reason": job.finish_reason})
        used = [used[0] + len(ids), used[1] + len(new)]
    return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": choices, "usage": {"prompt_tokens": used[0], "completion_tokens": used[1],
                                          "total_tokens": sum(used)}}


def _usage(jobs: list[Job]) -> dict:
    prompts = {id(j.seq.prompt): len(j.seq.prompt) for j in jobs}  # the choices of a prompt share its list: counted once
    completion = sum(len(j.text.tokens) for j in jobs)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}


def _response(rid: str, name: str, jobs: list[Job], texts: list[str], chat: bool) -> dict:
    if chat:
        choices = [{"index": j.index, "message": {"role": "assistant", "content": t}, "finish_reason": j.finish_reason}
                   for j, t in zip(jobs, texts)]
    else:
        choices = [{"index": j.index, "text": t, "logprobs": None, "finish_reason": j.finish_reason}
                   for j, t in zip(jobs, texts)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": _usage(jobs)}


async def _sse(jobs: list[Job], rid: str, name: str, chat: bool, usage: bool):
    """Server-sent events: one chunk per text delta (choices interleaved, each with its index), a chunk with each
    choice's finish reason, the usage with stream_options.include_usage, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    by_index = {j.index: j for j in jobs}

    def event(choices: list, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": kind, "created": int(time.time()), "model": name,
                                      "choices": choices, **extra}) + "\n\n"

    def choice(i: int, delta: str | None, finish: str | None) -> dict:
        if chat:
            return {"index": i, "delta": {"content": delta} if delta is not None else {}, "finish_reason": finish}
        return {"index": i, "text": delta or "", "logprobs": None, "finish_reason": finish}
    try:
        if chat:
            yield event([{"index": j.index, "delta": {"role": "assistant"}, "finish_reason": None} for j in jobs])
        left = len(jobs)
        while left:
            index, delta = await jobs[0].out.get()
            if delta is None:
                left -= 1
                yield event([choice(index, None, by_index[index].finish_reason)])
            else:
                yield event([choice(index, delta, None)])
        if usage:
            yield event([], usage=_usage(jobs))
        yield "data: [DONE]\n\n"
    finally:
        for j in jobs:
            j.cancelled = True  # a client that went away frees its rows at the next step


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
          limits: Limits = Limits(), batching: str = "continuous", drain_s: float = 30.0, draft_run: str = "",
          k: int = 4, engine: dict | None = None) -> None:
    """Serve a run until SIGINT/SIGTERM; then stop taking connections and let the requests in flight (streams too)
    finish for up to drain_s seconds before the rest are ended."""
    import uvicorn

    check_address(host, port)
    keep_freed_memory()  # the decode thread's tensors reuse freed memory instead of page-faulting it back each step
    model, tokenizer, cfg, step = load_run(run_dir, device)
    if quantize:
        from minigpt.nn.quantize import quantize_model

        quantize_model(model, quantize)
    if model.wte.weight.device.type == "cpu":  # a server's model only serves: its Linears packed for oneDNN once
        prepack_linears(model)
    draft = None
    if draft_run:
        from minigpt.infer.speculative import check_pair

        draft, draft_tok, _, _ = load_run(draft_run, device)
        check_pair(model, draft, tokenizer.get_vocab(), draft_tok.get_vocab())
        if draft.wte.weight.device.type == "cpu":
            prepack_linears(draft)
    name = f"minigpt-{run_dir.rstrip('/').split('/')[-1]}"
    app = create_app(model, tokenizer, name, tokenizer.token_to_id(cfg.sample.stop_token), max_batch, limits, batching,
                     draft, k, engine)
    spec = f", speculative with {draft_run} drafting {k} tokens a round" if draft_run else ""
    eng = app.state.engine.engine
    if not draft_run:
        spec += (f"; a paged KV cache of {eng.kv_tokens} tokens, prompts prefilled {eng.prefill_chunk} tokens a step "
                 f"beside the decodes, prefix cache {'on' if eng.prefix is not None else 'off'}")
    print(f"serving {run_dir} (step {step}{', weights ' + quantize if quantize else ''}) as model {name!r} on "
          f"http://{host}:{port}/v1 ({batching} batching, up to {max_batch} sequences at once{spec})", flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: a quiet one here, so a
    # drained server exits 0 and says so (SIGINT keeps Python's, KeyboardInterrupt: exit 130)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    engine, drain = app.state.engine, {}

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            drain["in_flight"], drain["ended"] = engine.unfinished(), dict(engine.ended_by)
            await super().shutdown(sockets)

    try:
        DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                      timeout_graceful_shutdown=drain_s)).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    engine.stop()
    print(drain_summary(drain, engine.ended_by, drain_s), flush=True)


def drain_summary(drain: dict, ended_by: dict, drain_s: float) -> str:
    """What the drain did: the requests in flight when it began, how many finished, how many were cut (their
    stream ended by the drain's limit, or by the stop after it)."""
    if not drain:
        return "stopped: 0 requests in flight"
    before = drain["ended"]
    since = {k: ended_by.get(k, 0) - before.get(k, 0) for k in ended_by}
    finished = since.get("stop", 0) + since.get("length", 0)
    cut = since.get("cancelled", 0) + since.get("shutdown", 0) + since.get("error", 0)
    return (f"stopped: {drain['in_flight']} requests in flight at the signal, {finished} finished, {cut} cut "
            f"(the drain's limit is {drain_s:g} s)")
