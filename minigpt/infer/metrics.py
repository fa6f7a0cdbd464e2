"""Prometheus metrics of the server (prometheus-client, the `serve` extra): requests, tokens in and out,
queue depth, running batch, the prefix cache's hits, time to first token and time per output token (the figures
`vllm bench serve` reports). One registry per app, so several apps in one process (the tests) do not collide."""

from __future__ import annotations

import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self, engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("minigpt_requests", "requests answered, by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("minigpt_prompt_tokens", "prompt tokens taken into decoding", registry=r)
        self.generation_tokens = Counter("minigpt_generation_tokens", "tokens generated", registry=r)
        queue = Gauge("minigpt_queue_depth", "requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: engine.pending.qsize())
        self.running = Gauge("minigpt_running_batch", "requests in the batch being decoded", registry=r)
        prefix = engine.engine.prefix  # the prefix cache's reuse in prompt tokens (vLLM's prefix_cache_queries/hits)
        for name, what, read in (("minigpt_prefix_cache_queries_tokens", "prompt tokens looked up in the prefix cache",
                                  lambda: prefix.prompt_tokens if prefix else 0),
                                 ("minigpt_prefix_cache_hits_tokens", "prompt tokens found there (not computed)",
                                  lambda: prefix.hit_tokens if prefix else 0),
                                 ("minigpt_prefix_cache_hit_rate", "hits / queries, in prompt tokens (0 before any)",
                                  lambda: (prefix.hit_tokens / prefix.prompt_tokens) if prefix and prefix.prompt_tokens else 0)):
            Gauge(name, what, registry=r).set_function(read)
        eng = engine.engine  # the paged cache's state (vLLM's kv_cache_usage_perc and num_preemptions)
        Gauge("minigpt_kv_cache_usage", "fraction of the KV cache's blocks held by running sequences (0 with a draft: "
              "its rows are whole contexts)", registry=r).set_function(
            lambda: 1 - eng.blocks.available / eng.blocks.n_blocks if eng.blocks is not None else 0)
        Gauge("minigpt_preemptions", "sequences preempted for cache blocks so far (started again later)",
              registry=r).set_function(lambda: eng.preemptions)
        self.ttft = Histogram("minigpt_time_to_first_token_seconds", "submission to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("minigpt_time_per_output_token_seconds", "mean time between tokens after the first",
                              registry=r, buckets=LATENCY_BUCKETS)

    def finished(self, job) -> None:
        """A request's tokens and latencies, when it ends (called on the decode thread)."""
        n = len(job.text.tokens) if job.text is not None else 0
        self.generation_tokens.inc(n)
        if job.t_first:
            self.ttft.observe(job.t_first - job.t_submit)
            if n > 1:
                self.tpot.observe((time.perf_counter() - job.t_first) / (n - 1))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
