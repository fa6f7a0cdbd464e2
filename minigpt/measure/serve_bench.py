"""`minigpt bench serve`: a bounded load generator against an OpenAI-compatible server on this machine.

Requests arrive at a rate (Poisson: exponential gaps; or fixed gaps), at most `concurrency` in flight (a
later arrival waits for a free client), each a streamed /v1/completions of a random token-id prompt with
a length drawn uniformly from a range and `max_tokens` drawn uniformly too, or from an exponential distribution
capped at the range's top (`output_dist`: the long tail of real answers; Daniel et al. 2023, "How continuous
batching enables 23x throughput in LLM inference", drew their output lengths so) (`ignore_eos`, so the lengths
are the ones asked). Per request it times the first streamed text (TTFT) and the end (end-to-end latency);
time per output token TPOT = (end-to-end - TTFT) / (output tokens - 1), output tokens from the usage the
server streams last, and the request's own speed 1 / TPOT tokens/s: what a reader of that answer sees.
Throughput is all output tokens over the wall time from the first arrival to the last answer. The same
figures `vllm bench serve` reports (its definitions). Standard library only; no client-side tokenizer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import socket
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass

from minigpt.core.errors import UserError

MAX_REQUESTS = 10_000  # a load generator for one's own server, not a flood


@dataclass(frozen=True)
class Load:
    url: str = "http://127.0.0.1:8000/v1"
    rate: float = 1.0  # requests per second; 0: all at once
    arrivals: str = "poisson"  # or "fixed"
    requests: int = 32
    concurrency: int = 16
    prompt_tokens: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (32, 64)
    output_dist: str = "uniform"  # or "exponential": LO + Exp(mean output_mean - LO), capped at HI
    output_mean: float | None = None  # exponential only; None: the middle of output_tokens
    seed: int = 0
    api_key: str = ""
    timeout_s: float = 300.0
    ttft_slo_s: float = 1.0  # goodput's targets (vLLM's --goodput): the first text within a second,
    tpot_slo_s: float = 1 / 30  # and at least 30 tokens/s after it, a reader's pace
    texts: tuple[str, ...] = ()  # text prompts, in turn (any server takes them); none: random token ids


def check_load(load: Load) -> None:
    """Everything checked before the first request: one line naming the problem."""
    parts = urllib.parse.urlsplit(load.url)
    if parts.scheme != "http" or not parts.hostname:
        raise UserError(f"--url {load.url}: give the server's http URL, e.g. http://127.0.0.1:8000/v1")
    if not _loopback(parts.hostname):
        raise UserError(f"--url {load.url}: bench serve loads a server on this machine only (127.0.0.1, ::1, localhost)")
    if load.output_dist not in ("uniform", "exponential"):
        raise UserError(f"--output-dist {load.output_dist}: choose uniform or exponential")
    lo, hi = load.output_tokens
    if load.output_mean is not None and load.output_dist != "exponential":
        raise UserError("--output-mean sets the exponential's mean: give it with --output-dist exponential")
    if load.output_mean is not None and not lo < load.output_mean <= hi:
        raise UserError(f"--output-mean {load.output_mean:g}: give a mean above {lo} and at most {hi} (--output-tokens)")
    if load.arrivals not in ("poisson", "fixed"):
        raise UserError(f"--arrivals {load.arrivals}: choose poisson or fixed")
    if not 1 <= load.requests <= MAX_REQUESTS or load.concurrency < 1 or load.rate < 0:
        raise UserError(f"--requests must be 1 to {MAX_REQUESTS}, --concurrency at least 1, --rate at least 0")
    for name, (lo, hi) in (("--prompt-tokens", load.prompt_tokens), ("--output-tokens", load.output_tokens)):
        if not 1 <= lo <= hi:
            raise UserError(f"{name} {lo}:{hi}: give LO:HI with 1 <= LO <= HI")


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError, UnicodeError):
        return False


def server_model(load: Load) -> dict:
    """The first model the server lists (GET /models), with the context it reports; one line if none answers."""
    try:
        with urllib.request.urlopen(_request(load, "/models"), timeout=10) as r:
            return json.loads(r.read())["data"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"no OpenAI-compatible server answers at {load.url} ({e}): start one, e.g. "
                        f"'minigpt serve --run RUN'") from None


def server_gauge(load: Load, name: str) -> float | None:
    """A value the server exposes at /metrics beside its /v1 (Prometheus text; None when it has none)."""
    root = load.url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(_request(Load(**{**asdict(load), "url": root}), "/metrics"), timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _request(load: Load, path: str, body: dict | None = None) -> urllib.request.Request:
    headers = {"content-type": "application/json"}
    if load.api_key:
        headers["authorization"] = f"Bearer {load.api_key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(load.url.rstrip("/") + path, data, headers)


def _one(load: Load, model: str, prompt: list[int] | str, max_tokens: int, t_arrive: float) -> dict:
    """One streamed completion: its arrival, first text, end, output tokens, and error (None when it succeeded)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if not isinstance(prompt, str):  # token ids: random, so the lengths asked are kept (a text load ends where it ends)
        body["ignore_eos"] = True
    out = {"arrive": t_arrive, "first": None, "end": None, "prompt_tokens": len(prompt), "output_tokens": 0, "error": None,
           "chunks": [], "text": ""}  # the arrival time of every streamed piece of text (ITL: the gaps between them)
    try:
        with urllib.request.urlopen(_request(load, "/completions", body), timeout=load.timeout_s) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if any(c.get("text") for c in event.get("choices", [])):
                    out["chunks"].append(time.perf_counter())
                    out["text"] += "".join(c.get("text") or "" for c in event["choices"])
                    if out["first"] is None:
                        out["first"] = out["chunks"][-1]
                if event.get("usage"):
                    out["output_tokens"] = event["usage"]["completion_tokens"]
                    out["prompt_tokens"] = event["usage"].get("prompt_tokens", out["prompt_tokens"])
        out["end"] = time.perf_counter()
    except (OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {getattr(e, 'code', '')} {e}"[:200]
    return out


def output_length(load: Load, rng: random.Random) -> int:
    """One request's max_tokens: uniform over output_tokens, or LO + an exponential draw of mean output_mean - LO,
    capped at HI (the cap holds the few draws beyond it: the mean drawn is a little below output_mean)."""
    lo, hi = load.output_tokens
    if load.output_dist == "uniform" or lo == hi:
        return rng.randint(lo, hi)
    mean = load.output_mean if load.output_mean is not None else (lo + hi) / 2
    return min(hi, lo + round(rng.expovariate(1 / (mean - lo))))


def load_plan(load: Load, vocab: int = 256) -> tuple[list[tuple[list[int] | str, int]], random.Random]:
    """The requests a load sends, (prompt, max_tokens) each, and the generator that goes on to draw the gaps."""
    rng, plan = random.Random(load.seed), []
    for i in range(load.requests):  # the prompt then its length, request by request (a seed's plan stays the same)
        prompt = load.texts[i % len(load.texts)] if load.texts else \
            [rng.randrange(1, vocab) for _ in range(rng.randint(*load.prompt_tokens))]
        plan.append((prompt, output_length(load, rng)))
    return plan, rng


def run_load(load: Load, model: str, vocab: int = 256) -> dict:
    """Send the load; the figures of its requests (see the module doc), and the sequences a minigpt server preempted
    meanwhile (its /metrics; None from another server)."""
    preempted = server_gauge(load, "minigpt_preemptions")
    plan, rng = load_plan(load, vocab)
    gaps = [0.0 if load.rate == 0 else rng.expovariate(load.rate) if load.arrivals == "poisson" else 1 / load.rate
            for _ in plan]
    slots, results, threads = threading.Semaphore(load.concurrency), [], []
    start = time.perf_counter()
    due = start
    for i, ((prompt, max_tokens), gap) in enumerate(zip(plan, gaps)):
        due += gap
        time.sleep(max(0.0, due - time.perf_counter()))
        slots.acquire()  # the concurrency cap: an arrival waits for a free client

        def send(prompt=prompt, max_tokens=max_tokens, arrive=time.perf_counter(), i=i):
            try:
                results.append({**_one(load, model, prompt, max_tokens, arrive), "index": i})
            finally:
                slots.release()
        threads.append(threading.Thread(target=send, daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = server_gauge(load, "minigpt_preemptions")
    return {**summarize(results, wall, load), "preemptions": after - preempted if None not in (preempted, after) else None}


def _percentiles(values: list[float], scale: float = 1.0) -> dict | None:
    if not values:
        return None
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"mean": round(statistics.fmean(values) * scale, 3), "p50": round(q[49] * scale, 3),
            "p90": round(q[89] * scale, 3), "p99": round(q[98] * scale, 3)}


def summarize(results: list[dict], wall_s: float, load: Load) -> dict:
    # tokens that never became visible text (partial UTF-8 of random ids): the reader saw them at the end
    ok = [{**r, "first": r["end"] if r["first"] is None else r["first"]} for r in results if r["error"] is None]
    tpot = [(r["end"] - r["first"]) / (r["output_tokens"] - 1) for r in ok
            if r["output_tokens"] > 1 and r["first"] < r["end"]]
    speeds = [1 / t for t in tpot if t > 0]
    out_tokens = sum(r["output_tokens"] for r in ok)
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]  # every gap, pooled (vLLM's ITL)
    good = [r for r in ok if r["first"] - r["arrive"] <= load.ttft_slo_s and (
        r["output_tokens"] <= 1 or (r["end"] - r["first"]) / (r["output_tokens"] - 1) <= load.tpot_slo_s)]
    texts = [r["text"] for r in sorted(results, key=lambda r: r.get("index", 0))]
    return {
        "rate_requests_per_s": load.rate or None, "arrivals": load.arrivals if load.rate else "all at once",
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:3],
        "duration_s": round(wall_s, 3),
        "request_throughput_per_s": round(len(ok) / wall_s, 4),
        "output_tokens": out_tokens,
        "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in ok), 1) if ok else None,
        # the answers in request order, hashed: two servers of the same weights (greedy) give the same
        "answers_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16],
        "output_throughput_tokens_per_s": round(out_tokens / wall_s, 2),
        "ttft_ms": _percentiles([r["first"] - r["arrive"] for r in ok], 1e3),
        "tpot_ms": _percentiles(tpot, 1e3),
        "e2e_ms": _percentiles([r["end"] - r["arrive"] for r in ok], 1e3),
        "itl_ms": _percentiles(itl, 1e3),
        "goodput_requests_per_s": round(len(good) / wall_s, 4),
        "goodput_slo": {"ttft_ms": round(load.ttft_slo_s * 1e3, 3), "tpot_ms": round(load.tpot_slo_s * 1e3, 3)},
        # the reader's speed: p50 is the typical request, p10 the slowest tenth (the 90th percentile of TPOT)
        "per_user_tokens_per_s": None if not speeds else {
            "p50": round(statistics.median(speeds), 2),
            "p10": round(statistics.quantiles(speeds, n=10, method="inclusive")[0], 2) if len(speeds) > 1 else speeds[0]},
    }


CONVENTION = ("measured against a running server: TTFT = arrival to first streamed text; TPOT = (end-to-end - TTFT) / "
              "(output tokens - 1); ITL = every gap between streamed pieces of text, pooled over requests; goodput = "
              "requests meeting both goodput_slo targets (TTFT, TPOT) / wall time (vLLM's definitions); "
              "per-user tokens/s = 1 / TPOT per request; output throughput = all output tokens / "
              "wall time; token-id prompts, greedy, ignore_eos; percentiles over the completed requests (a request whose "
              "tokens never became visible text has its TTFT at its end and no TPOT)")


def bench_serve(load: Load, rates: list[float], progress=None) -> dict:
    """A sweep over arrival rates against one server: one point (summarize) per rate. `progress(line)` hears of
    each point as it is measured (a sweep takes minutes)."""
    check_load(load)
    model = server_model(load)
    context = model.get("max_model_len")
    if context and load.prompt_tokens[1] + load.output_tokens[1] > context:
        raise UserError(f"--prompt-tokens up to {load.prompt_tokens[1]} + --output-tokens up to {load.output_tokens[1]} "
                        f"exceed the served model's context of {context}: shorten the ranges")
    vocab = int(model.get("vocab_size") or 256)
    points = []
    for r in rates:
        points.append(run_load(Load(**{**asdict(load), "rate": r}), model["id"], vocab))
        _said(progress, "", r, points[-1], len(points), len(rates))
    return {"bench": "serve", "url": load.url, "model": model["id"], "max_model_len": context, "vocab_size": vocab,
            "server": model.get("minigpt"), "load": {k: v for k, v in asdict(load).items() if k not in ("api_key", "url", "rate")},
            "points": points, "measured_at": time.time(), "convention": CONVENTION}


def start_server(run: str, max_batch: int, threads: int, *flags: str) -> tuple:
    """`minigpt serve` (with flags) on a free port of 127.0.0.1 in its own process; (process, Load URL) once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    cmd = serve_command(run, port, max_batch, threads, *flags)
    return launch(cmd, url, f"minigpt serve --run {run}", None, threads, 60.0), url


def serve_command(run: str, port: int, max_batch: int, threads: int, *flags: str) -> list[str]:
    """`minigpt serve` on 127.0.0.1:port, in this Python."""
    import sys

    return [sys.executable, "-m", "minigpt", "serve", "--run", run, "--port", str(port), "--max-batch", str(max_batch),
            "--threads", str(threads), *flags]


def launch(cmd: list[str], url: str, name: str, cpu: int | None = None, threads: int = 1, wait_s: float = 180.0):
    """Start a server process (one torch thread, pinned to `cpu` when given); the process once /models answers."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server that logs every request never blocks on it
    proc = subprocess.Popen(cmd, env=env, preexec_fn=pin, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        try:
            server_model(Load(url))
            return proc
        except UserError:
            if proc.poll() is not None:
                log.seek(0)
                raise UserError(f"{name} did not start: {log.read().strip()[-400:]}") from None
            time.sleep(0.25)
    proc.kill()
    raise UserError(f"{name} did not answer within {wait_s:g} s")


def _said(progress, label: str, rate: float, point: dict, done: int, total: int) -> None:
    if progress is not None:
        tps = point.get("output_throughput_tokens_per_s")
        progress(f"bench serve: {done}/{total} {label}rate {rate:g}/s"
                 f"{' (all at once)' if rate == 0 else ''}: {tps if tps is not None else '?'} output tokens/s (measured)")


def compare_batching(run: str, load: Load, rates: list[float], max_batch: int = 8, threads: int = 1,
                     progress=None, paged_rows: int = 64) -> dict:
    """The same load against three servers of one build: `serve --batching static` (max_batch rows, each a whole
    context), `--batching continuous` with the same rows, and continuous batching in the static server's KV memory
    (max_batch contexts' tokens) as a paged cache of up to paged_rows sequences (`continuous_same_memory`: as many
    as their tokens fit, vLLM's comparison). The rates are interleaved (each server at each rate in turn) so a change
    in the machine's load falls on all three."""
    servers = {}
    try:
        servers["static"] = start_server(run, max_batch, threads, "--batching", "static")
        heads = {"static": bench_serve(Load(**{**asdict(load), "url": servers["static"][1]}), [])}
        kv = str(max_batch * heads["static"]["max_model_len"])
        servers["continuous"] = start_server(run, max_batch, threads, "--batching", "continuous")
        servers["continuous_same_memory"] = start_server(run, paged_rows, threads, "--kv-cache-tokens", kv)
        for b in ("continuous", "continuous_same_memory"):
            heads[b] = bench_serve(Load(**{**asdict(load), "url": servers[b][1]}), [])
        for i, r in enumerate(rates):
            for b, (_, url) in servers.items():
                heads[b]["points"].append(run_load(Load(**{**asdict(load), "url": url, "rate": r}), heads[b]["model"],
                                                   heads[b]["vocab_size"]))
                _said(progress, f"{b}, ", r, heads[b]["points"][-1], i + 1, len(rates))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    return heads
