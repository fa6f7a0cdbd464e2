"""`minigpt serve` against the official openai client on localhost: completions, chat, streaming,
8 concurrent requests batched together, bad requests answered with a 4xx JSON error."""

import concurrent.futures
import contextlib
import json
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


def post(url: str, data: bytes | None, headers: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    """A raw request (the openai client would validate the body before sending it)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def slowed(app, seconds: float = 0.03):
    """Each decode step of the app's engine takes at least `seconds` (a sleep on the decode thread): a request stays
    running while the test acts, however fast or loaded the machine."""
    engine = app.state.engine.engine
    real = engine.step

    def step():
        time.sleep(seconds)
        return real()
    engine.step = step
    try:
        yield
    finally:
        del engine.step  # the class's own again


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus_dir, data_cache):
    from conftest import REPO, serving, tiny_overrides

    from minigpt.core.config import load_config
    from minigpt.infer.serve import create_app
    from minigpt.run.load import load_run
    from minigpt.train.loop import train

    out = tmp_path_factory.mktemp("serve") / "run"
    train(load_config(REPO / "configs" / "tiny.toml", tiny_overrides(corpus_dir, data_cache, out, **{
        "train.max_steps": 2, "model.block_size": 64})), log=lambda *a: None)
    model, tok, cfg, _ = load_run(out)
    # prompts prefilled 16 tokens a step (long ones in chunks) and a prefix cache, as `minigpt serve` runs by default;
    # a paged cache of two contexts (128 tokens) for 8 rows: concurrent requests run while their tokens fit and the
    # newest are preempted when they do not, so every test here also checks outputs through preemption
    app = create_app(model, tok, "minigpt-test", tok.token_to_id(cfg.sample.stop_token), max_batch=8,
                     engine={"prefill_chunk": 16, "kv_tokens": 128})
    with serving(app) as port:
        yield {"url": f"http://127.0.0.1:{port}/v1", "app": app, "parts": (model, tok, cfg), "run": str(out)}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key="none")


def test_models_completion_and_chat(client):
    assert [m.id for m in client.models.list().data] == ["minigpt-test"]
    r = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 8
    again = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    c = client.chat.completions.create(model="minigpt-test", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=6, temperature=0.8)
    assert c.choices[0].message.role == "assistant" and isinstance(c.choices[0].message.content, str)


def test_streaming_gives_the_same_text(client):
    whole = client.completions.create(model="minigpt-test", prompt="import ", max_tokens=10, temperature=0)
    parts = [ch.choices[0].text for ch in client.completions.create(model="minigpt-test", prompt="import ",
                                                                      max_tokens=10, temperature=0, stream=True)]
    assert "".join(parts) == whole.choices[0].text and len(parts) >= 2
    chat = list(client.chat.completions.create(model="minigpt-test", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=5, temperature=0, stream=True))
    assert chat[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_requests_are_batched_and_the_rest_queue(client, server):
    engine = server["app"].state.engine
    before = len(engine.batches)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:  # 12 requests, batches of at most 8
        results = list(pool.map(lambda i: client.completions.create(
            model="minigpt-test", prompt=f"x = {i}", max_tokens=12, temperature=0), range(12)))
    assert all(r.choices[0].text is not None for r in results)
    sizes = engine.batches[before:]  # rows running after each admission
    assert len(sizes) == 12 and 1 < max(sizes) <= 8  # shared forward passes, never more than 8 rows; the rest queued


def test_a_client_that_disconnects_frees_its_slot(client, server):
    engine = server["app"].state.engine
    with slowed(server["app"]):
        stream = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=40, temperature=0.7,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()  # gone after the first token
    r = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=3, temperature=0.7)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert engine.cancelled >= 1


@pytest.mark.parametrize("body, status, words", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": "minigpt-test", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "minigpt-test", "prompt": "word " * 200}, 400, "context"),
    ({"model": "minigpt-test"}, 400, "prompt"),
    ({"model": "minigpt-test", "prompt": []}, 400, "prompt is empty"),
    ({"model": "minigpt-test", "prompt": "x", "seed": 2**70}, 400, "seed"),
    ({"model": "minigpt-test", "prompt": "x", "n": 99}, 400, "at most 8 choices"),
    ({"model": "minigpt-test", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"model": "minigpt-test", "prompt": "x", "max_tokens": 64}, 400, "exceeds the context"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, client, body, status, words):
    code, answer = post(server["url"] + "/completions", json.dumps(body).encode())
    assert code == status and words in answer["error"]["message"], answer
    code, answer = post(server["url"] + "/completions", b"{not json")
    assert code == 400 and "not valid JSON" in answer["error"]["message"] and answer["error"]["param"] is None
    assert client.completions.create(model="minigpt-test", prompt="ok", max_tokens=2).choices  # still serving


def test_completions_answer_logprobs_and_echo_as_the_legacy_api_does(server):
    """`logprobs: N` gives each token's log-probability and the top N; `echo` returns and scores the prompt too
    (its first token has none); token-id prompts are taken as ids; bad values are 400 in OpenAI's shape."""
    body = {"model": "minigpt-test", "prompt": "def f(x):", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    status, out = post(server["url"] + "/completions", json.dumps(body).encode())
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) == 2 and value == pytest.approx(max(top.values()))  # greedy: the top one
    status, echoed = post(server["url"] + "/completions", json.dumps({**body, "echo": True, "prompt": [[5, 6, 7]]}).encode())
    assert status == 200, echoed
    lp = echoed["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == 3 + 3
    for bad in ({**body, "logprobs": 99}, {**body, "prompt": [[]]}, {**body, "prompt": [[10**9]]},
                {**body, "stream": True}, {**body, "max_tokens": 10**6}):
        status, err = post(server["url"] + "/completions", json.dumps(bad).encode())
        assert 400 <= status < 500 and "error" in err, (bad, status, err)


def test_api_key_body_and_max_tokens_limits_answer_in_the_openai_shape(server):
    """A server started with a key and small limits: each refusal is a 4xx in OpenAI's error shape before any
    work, /health answers without the key, and the server keeps serving."""
    from conftest import serving

    from minigpt.infer.serve import Limits, create_app

    model, tok, cfg = server["parts"]
    app = create_app(model, tok, "minigpt-test", tok.token_to_id(cfg.sample.stop_token), max_batch=4,
                     limits=Limits(api_key="s3cret", max_body_bytes=2000, max_tokens=8))
    with serving(app) as port:
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret")
        assert ok.completions.create(model="minigpt-test", prompt="def", max_tokens=4).choices[0].text is not None
        assert post(base + "/health", None, method="GET") == (200, {"status": "ok", "model": "minigpt-test"})
        auth = {"authorization": "Bearer s3cret"}
        code, big = post(base + "/v1/completions", json.dumps({"model": "minigpt-test", "prompt": "x" * 5000}).encode(), auth)
        assert code == 413 and "at most 2,000" in big["error"]["message"]
        code, many = post(base + "/v1/completions", b'{"model": "minigpt-test", "prompt": "a", "max_tokens": 9}', auth)
        assert code == 400 and "limit of 8" in many["error"]["message"]
        code, noauth = post(base + "/v1/completions", b'{"model": "minigpt-test", "prompt": "a"}')
        assert code == 401 and noauth["error"]["code"] == "invalid_api_key"
        assert ok.completions.create(model="minigpt-test", prompt="def", max_tokens=2).choices


def test_a_full_queue_answers_503_with_retry_after_and_frees_when_requests_end(server):
    import time
    import urllib.error
    import urllib.request

    from conftest import serving

    from minigpt.infer.serve import Limits, create_app

    model, tok, cfg = server["parts"]
    app = create_app(model, tok, "minigpt-test", tok.token_to_id(cfg.sample.stop_token), max_batch=1,
                     limits=Limits(max_queue=0))
    with serving(app) as port, slowed(app):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=40, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the one slot is busy, and no request may wait
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=b'{"model": "minigpt-test", "prompt": "a", "max_tokens": 2}',
                                     headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
        assert json.loads(e.value.read())["error"]["code"] == "queue_full"
        stream.close()  # the client goes: its slot frees at the next token
        deadline = time.time() + 20
        while app.state.engine.unfinished() and time.time() < deadline:
            time.sleep(0.05)
        assert client.completions.create(model="minigpt-test", prompt="a", max_tokens=2).choices


def test_metrics_count_requests_tokens_and_latencies(server, client):
    import re
    import urllib.request

    client.completions.create(model="minigpt-test", prompt="def ", max_tokens=5, temperature=0)
    base = server["url"].removesuffix("/v1")
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()

    def value(name):
        m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else None

    assert value('minigpt_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert value("minigpt_prompt_tokens_total") >= 1 and value("minigpt_generation_tokens_total") >= 1
    assert value("minigpt_time_to_first_token_seconds_count") >= 1 and value("minigpt_queue_depth") is not None
    assert value("minigpt_time_per_output_token_seconds_count") >= 1 and value("minigpt_running_batch") is not None


def test_a_repeated_long_prompt_is_found_in_the_prefix_cache_and_answers_the_same(server, client):
    import re
    import urllib.request

    prompt = "def parse(self, text):\n    return [line.strip() for line in text.splitlines()]\n"  # 17 to 62 tokens
    answers = [client.completions.create(model="minigpt-test", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
               for _ in range(2)]
    with urllib.request.urlopen(server["url"].removesuffix("/v1") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    hits = float(re.search(r"^minigpt_prefix_cache_hits_tokens ([0-9.e+]+)$", text, re.M).group(1))
    assert answers[0] == answers[1] and hits >= 16  # at least one 16-token block the second time
    assert 0 < float(re.search(r"^minigpt_prefix_cache_hit_rate ([0-9.e+]+)$", text, re.M).group(1)) <= 1


def test_n_choices_stop_strings_and_streamed_usage(server, client):
    r = client.completions.create(model="minigpt-test", prompt=["def ", "x"], max_tokens=6, temperature=1.0, n=3, seed=5)
    assert [c.index for c in r.choices] == list(range(6)) and r.usage.prompt_tokens < 6 * 2
    assert len({c.text for c in r.choices[:3]}) > 1  # the samples of one prompt differ
    whole = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=12, temperature=0).choices[0].text
    stop = whole[3:5]
    cut = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="minigpt-test", prompt="def ", max_tokens=5, temperature=0.8, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    assert {ch.choices[0].index for ch in chunks if ch.choices} == {0, 1}
    assert 0 < chunks[-1].usage.completion_tokens <= 10 and not chunks[-1].choices  # 5 each at most (end-of-text)


def test_a_request_joining_a_running_batch_gets_the_tokens_it_gets_alone(server, client):
    engine = server["app"].state.engine
    alone = client.completions.create(model="minigpt-test", prompt="import ", max_tokens=10, temperature=0)
    with slowed(server["app"]):
        long = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=40, temperature=0.7, stream=True,
                                         extra_body={"ignore_eos": True})
        it = iter(long)
        next(it)  # the long request is decoding
        before = len(engine.batches)
        joined = client.completions.create(model="minigpt-test", prompt="import ", max_tokens=10, temperature=0)
    # it joined the running batch, not after it (the long one's own admission may be recorded after its first token
    # reached us, so it can be the entry at `before`)
    assert 2 in engine.batches[before:]
    assert joined.choices[0].text == alone.choices[0].text
    assert sum(len(ch.choices[0].text) for ch in it if ch.choices) >= 0  # the long one goes on to its end


def test_requests_beyond_the_paged_cache_are_preempted_and_answer_what_they_answer_alone(server, client):
    """Eight concurrent requests of up to ~45 tokens each in the test server's cache of 128 tokens (8 blocks): they
    start while their prompts fit, the newest are preempted as the others grow, and each answers the text it answers
    alone; /metrics counts the preemptions. n samples the cache could never hold at once are a 400 before any work."""
    import re
    import urllib.request

    engine = server["app"].state.engine.engine
    def ask(prompt: str) -> str:
        return client.completions.create(model="minigpt-test", prompt=prompt, max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    prompts = [f"value_{i} = " for i in range(8)]
    alone = [ask(p) for p in prompts]
    before = engine.preemptions
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == alone
    assert engine.preemptions > before
    with urllib.request.urlopen(server["url"].removesuffix("/v1") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert float(re.search(r"^minigpt_preemptions ([0-9.e+]+)$", text, re.MULTILINE).group(1)) >= engine.preemptions - 1
    assert 0 <= float(re.search(r"^minigpt_kv_cache_usage ([0-9.e+]+)$", text, re.MULTILINE).group(1)) <= 1
    with pytest.raises(openai.BadRequestError, match="KV cache"):  # 4 blocks of prompt + 7 more samples' last: 11 > 8
        client.completions.create(model="minigpt-test", prompt=list(range(1, 61)), max_tokens=2, n=8)


def test_the_server_answers_correctly_after_a_burst_of_bad_and_oversized_requests(server, client):
    import urllib.request

    base = server["url"]
    expected = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=6, temperature=0).choices[0].text
    bodies = [b"\xff\xfe{", b"[1, 2]", b"null", b'{"model": "minigpt-test", "prompt": {"a": 1}}',
              b"x" * (2 << 20), b"x" * (12 << 20),  # over the limit: answered 413 after the body is read, not reset
              json.dumps({"model": "minigpt-test", "prompt": "y" * 50_000}).encode(),
              json.dumps({"model": "minigpt-test", "prompt": [[10**9]]}).encode(),
              json.dumps({"model": "minigpt-test", "prompt": "a", "temperature": "hot"}).encode()]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(base + "/completions", b), bodies * 3))
    for code, body in answers:
        assert 400 <= code < 500 and set(body["error"]) == {"message", "type", "param", "code"}, (code, body)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nowhere", timeout=10)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())
    again = client.completions.create(model="minigpt-test", prompt="def ", max_tokens=6, temperature=0).choices[0].text
    assert again == expected


def test_a_refused_body_sent_slowly_or_never_is_answered_after_the_drain_bound(server, monkeypatch):
    """An oversized body the client declares and then does not send: 413 once the drain's time bound passes."""
    import http.client
    from urllib.parse import urlparse

    from minigpt.infer import serve

    monkeypatch.setattr(serve, "DRAIN_SECONDS", 0.3)
    url = urlparse(server["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)  # a timeout: the server waited for the body
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 << 20))
    conn.endheaders(b"x" * 100)  # and nothing more
    r = conn.getresponse()
    assert r.status == 413 and "serve --max-body-bytes" in r.read().decode()
    conn.close()


def test_sigterm_lets_a_stream_in_flight_finish_then_exits(server, tmp_path):
    """`minigpt serve` in its own process: SIGTERM while a stream is running stops new connections, the stream ends
    with its last tokens and [DONE], and the process exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import REPO, free_port

    run = server["run"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--run", run, "--port", str(port), "--threads", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "serving" in proc.stdout.readline()
        body = json.dumps({"model": "minigpt-run", "prompt": "def ", "max_tokens": 30, "stream": True,
                           "ignore_eos": True}).encode()
        for _ in range(100):
            try:
                r = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                                                  {"content-type": "application/json"}), timeout=30)
                break
            except OSError:
                time.sleep(0.1)
        first = r.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert proc.wait(timeout=30) == 0
        import re  # the stream may end before the drain starts (uvicorn looks at the signal every 0.1 s): 0 or 1
        assert re.search(r"stopped: ([01]) requests in flight at the signal, \1 finished, 0 cut", proc.stdout.read())
    finally:
        proc.kill()


def test_bench_serve_measures_the_server_and_its_result_sizes_a_fleet(server, tmp_path):
    """`minigpt bench serve` against the test server: every request completes with the lengths asked (ignore_eos),
    TTFT/TPOT/latency percentiles and per-user speed come back, the plot is drawn; extrapolate sizes servers from it
    beside the roofline, and refuses a target that is not the model served."""
    from conftest import run_cli

    out = tmp_path / "serve.json"
    r = run_cli("bench", "serve", "--url", server["url"], "--rate", "0", "--rate", "50", "--requests", "7",
                "--concurrency", "4", "--prompt-tokens", "4:8", "--output-tokens", "5:9", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["server"]["config"]["block_size"] == 64 and result["server"]["batching"] == "continuous"
    for p in result["points"]:
        assert p["completed"] == 7 and p["failed"] == 0 and 7 * 5 <= p["output_tokens"] <= 7 * 9, (p["errors"], p["output_tokens"])
        assert p["ttft_ms"]["p50"] <= p["e2e_ms"]["p50"] and p["tpot_ms"]["p50"] > 0
        # ITL pools every gap between streamed pieces: each is at most a request's whole decode; goodput counts
        # only requests inside both targets, so never more than the completed requests' rate
        assert 0 <= p["itl_ms"]["p50"] <= p["e2e_ms"]["p99"] and p["itl_ms"]["p99"] >= p["itl_ms"]["p50"]
        assert 0 <= p["goodput_requests_per_s"] <= p["request_throughput_per_s"] and p["goodput_slo"]["tpot_ms"] > 0
        assert p["preemptions"] is not None and p["preemptions"] >= 0  # read from the minigpt server's /metrics
        # the median of 1 / TPOT per request: at least 1 / the 90th percentile TPOT, the slowest tenth below it
        speed = p["per_user_tokens_per_s"]
        assert 1e3 / p["tpot_ms"]["p90"] <= speed["p50"] * 1.001 and speed["p10"] <= speed["p50"]
    assert out.with_suffix(".png").stat().st_size > 0
    x = run_cli("extrapolate", "--target", server["run"], "--tokens", "chinchilla", "--gpu", "A100", "--serve", "--users", "1000",
                "--from-serve-bench", str(out), "--tokens-per-s-per-user", "1", "--json")
    assert x.returncode == 0, x.stderr
    m = json.loads(x.stdout)["serving_measured"]
    best = max(p["output_throughput_tokens_per_s"] for p in result["points"])
    assert m["met"] and m["server_tokens_per_s"] == best
    assert m["servers"] == -(-m["demand_tokens_per_s"] // best) and "measured" in m["source"]
    other = run_cli("extrapolate", "--target", "gpt3-175b", "--serve", "--from-serve-bench", str(out))
    assert other.returncode == 2 and "another model" in other.stderr


def test_output_lengths_drawn_uniform_or_with_an_exponential_tail_stay_in_the_range():
    """The load's max_tokens: uniform over LO:HI, or LO + an exponential draw capped at HI, whose mean is near the
    one asked and whose tail is long (a tenth beyond 2.3 means: e^-2.3 ~ 0.1), unlike the uniform's."""
    import random
    import statistics

    from minigpt.measure.serve_bench import Load, output_length

    uniform, tailed = Load(output_tokens=(8, 96)), Load(output_tokens=(8, 480), output_dist="exponential", output_mean=64)
    u = [output_length(uniform, random.Random(i)) for i in range(4000)]
    e = [output_length(tailed, random.Random(i)) for i in range(4000)]
    assert min(u) == 8 and max(u) == 96 and abs(statistics.fmean(u) - 52) < 2
    assert min(e) == 8 and max(e) <= 480 and abs(statistics.fmean(e) - 64) < 3
    assert sum(x > 8 + 2.3 * 56 for x in e) / len(e) == pytest.approx(0.1, abs=0.02)


def test_the_batching_model_counts_a_static_batch_to_its_longest_answer():
    """analytic/serving.batching_tokens_per_s: lengths 1, 4, 4, 1 two rows at a time take static batching 8 steps
    (4 + 4) and continuous 5 (the short rows' places taken at once); a step's fixed cost is what continuous saves,
    so where a step costs per row only both come out equal; one batch of identical lengths is the same either way."""
    from minigpt.analytic.serving import batching_tokens_per_s as rate

    assert rate([1, 4, 4, 1], 2, 1.0, 0.0, "static") == pytest.approx(10 / 8)
    assert rate([1, 4, 4, 1], 2, 1.0, 0.0, "continuous") == pytest.approx(10 / 5)
    lengths = [3, 9, 1, 30, 7, 7, 2, 12, 5]
    assert rate(lengths, 4, 0.0, 1.0, "static") == pytest.approx(rate(lengths, 4, 0.0, 1.0, "continuous"))
    assert rate([6] * 4, 4, 1.0, 0.5, "static") == pytest.approx(rate([6] * 4, 4, 1.0, 0.5, "continuous"))
    # prompts: each token one more row of some step (a row costs 0.5 here): 8 + 6 x 0.5 seconds for 10 tokens
    assert rate([1, 4, 4, 1], 2, 1.0, 0.5, "static", prompt_tokens=6) == pytest.approx(10 / (8 + 10 * 0.5 + 6 * 0.5))
    with pytest.raises(ValueError, match="continuous or static"):
        rate(lengths, 4, 1.0, 0.0, "dynamic")


@pytest.mark.parametrize("args, words", [
    (["--url", "http://192.0.2.1:8000/v1"], "this machine only"),
    (["--prompt-tokens", "9:3"], "LO <= HI"),
    (["--prompt-tokens", "40:40", "--output-tokens", "30:30"], "exceed the served model's context of 64"),
    (["--output-tokens", "8:40", "--output-dist", "exponential", "--output-mean", "50"], "at most 40"),
    (["--output-tokens", "8:40", "--output-mean", "20"], "with --output-dist exponential"),
])
def test_bench_serve_refuses_bad_input_before_any_request(server, args, words):
    from conftest import run_cli

    engine = server["app"].state.engine
    before = len(engine.batches)
    r = run_cli("bench", "serve", "--url", server["url"], *args, "--requests", "2")
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(engine.batches) == before


def test_a_server_with_a_draft_speculates_for_the_batch_and_answers_the_targets_greedy_text(server):
    """serve --draft: every decode step is a speculative round for all rows (the run drafts for itself here, so every
    draft is accepted); greedy text, n choices, stop strings and streaming answer as without a draft."""
    import copy

    import torch
    from conftest import serving

    from minigpt.infer.generate import generate_ids
    from minigpt.infer.serve import create_app

    model, tok, cfg = server["parts"]
    model = copy.deepcopy(model)  # decided logits (a 2-step model's are near ties, which float order may flip)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(8 if w.dim() == 2 else 1)
    eot = tok.token_to_id(cfg.sample.stop_token)
    app = create_app(model, tok, "minigpt-test", eot, max_batch=4, draft=model, k=3)
    plain = [tok.decode(generate_ids(model, [tok.encode(p).ids], 12, temperature=0, eot_id=eot).new_tokens[0])
             for p in ("def ", "import ")]
    with serving(app) as port:
        spec = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(lambda p: spec.completions.create(model="minigpt-test", prompt=p, max_tokens=12,
                                                                    temperature=0).choices[0].text, ("def ", "import ")))
        streamed = "".join(ch.choices[0].text for ch in spec.completions.create(
            model="minigpt-test", prompt="def ", max_tokens=12, temperature=0, stream=True) if ch.choices)
        sampled = spec.completions.create(model="minigpt-test", prompt="x", max_tokens=6, temperature=1.0, n=2)
    assert texts == plain and streamed == plain[0] and len(sampled.choices) == 2
    engine = app.state.engine.engine
    assert engine.drafted > 0 and engine.accepted == engine.drafted


def test_a_logprobs_request_generates_on_the_engine_and_answers_the_text_a_plain_request_does(server, client):
    """One decode loop: logprobs/echo requests are generated by the serving engine (its prefill count moves) and
    give the same greedy text as a plain request; only the scoring is theirs."""
    engine = server["app"].state.engine.engine
    body = {"model": "minigpt-test", "prompt": "class A:", "max_tokens": 5, "temperature": 0}
    plain = client.completions.create(**body).choices[0].text
    before = engine.prefills
    status, scored = post(server["url"] + "/completions", json.dumps({**body, "logprobs": 1}).encode())
    assert status == 200 and engine.prefills == before + 1
    assert scored["choices"][0]["text"] == plain and len(scored["choices"][0]["logprobs"]["tokens"]) >= 1
