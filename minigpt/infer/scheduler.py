"""The queue and the one decode thread over the engine (continuous or static batching), and the jobs it serves:
what the HTTP layer (infer/serve.py) submits and reads back; nothing here knows HTTP."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from minigpt.core.errors import UserError
from minigpt.infer.detokenize import IncrementalText
from minigpt.infer.engine import Engine, Sequence, SpeculativeEngine


@dataclass(eq=False)
class Job:
    """One choice of a request: a sequence on the engine, its text, and the request's queue it writes to."""
    seq: Sequence
    index: int  # the choice's index in the response
    out: asyncio.Queue  # the request's: (index, text delta) as generated, then (index, None)
    loop: asyncio.AbstractEventLoop
    text: IncrementalText
    cancelled: bool = False  # the client went away
    ended: bool = False  # its last text and the end were handed out
    t_submit: float = 0.0  # perf_counter at submission, at the first token (metrics)
    t_first: float = 0.0

    @property
    def done(self) -> bool:
        return self.seq.done

    @property
    def finish_reason(self) -> str:
        return self.seq.finish_reason or "length"



def _hand_out(items: list[tuple[Job, object]]) -> None:
    """On the event loop: a step's text pieces and ends, to their requests' queues."""
    for job, item in items:
        job.out.put_nowait((job.index, item))


class Scheduler:
    """The queue and the one decode thread over the engine. continuous: a waiting request joins the running batch
    at the next decode step when a row is free (first come, first served). static (to compare): a batch is formed
    when the engine is empty (requests arriving within 20 ms join it) and runs until its last row ends; a finished
    row stops computing but its slot stays empty until then."""

    def __init__(self, model, max_batch: int, policy: str = "continuous", draft=None, k: int = 4, **engine) -> None:
        """engine: the Engine's prefill_chunk, kv_tokens and prefix_cache (not with a draft: its rows are whole)."""
        if policy not in ("continuous", "static"):
            raise UserError(f"--batching {policy!r}: choose continuous or static")
        self.engine = SpeculativeEngine(model, max_batch, draft, k) if draft is not None else Engine(model, max_batch, **engine)
        self.max_batch, self.policy = max_batch, policy
        self.pending: queue.Queue[list[Job]] = queue.Queue()  # groups: the n choices of one prompt
        self.batches: list[int] = []  # rows running after each admission (tests and logs)
        self.cancelled = 0  # requests whose client went away before they finished
        self.open_jobs: list[Job] = []  # submitted, for the queue limit (event-loop side only)
        self.metrics = None  # a ServeMetrics when prometheus-client is installed
        self._held: list[Job] | None = None  # the next group, waiting for rows
        self._outbox: list[tuple[Job, object]] = []  # a step's pieces, handed to the event loop in one call
        self.ended_by: dict[str, int] = {}  # requests ended, by how (stop, length, cancelled, error, shutdown)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="minigpt-decode")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> int:
        """End the decode thread after its current step (never mid-step: a thread still in a torch op at interpreter
        exit aborts the process), and end every request left, running or queued; returns how many were left."""
        self._stopping = True
        self.pending.put([])  # wakes an idle decode thread
        self._thread.join(timeout)
        left = [s.tag for s in self.engine.sequences()] + (self._held or [])
        while True:
            try:
                left += self.pending.get_nowait()
            except queue.Empty:
                break
        left = [j for j in left if not j.ended]
        for job in left:
            self._end(job, "shutdown")
        self._flush()
        return len(left)

    def submit(self, group: list[Job]) -> None:
        now = time.perf_counter()
        for j in group:
            j.t_submit = now
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(group[0].seq.prompt))
        self.open_jobs.extend(group)
        self.pending.put(group)

    def unfinished(self) -> int:
        """Choices taken and not finished (decoding or queued); the finished are forgotten here."""
        self.open_jobs = [j for j in self.open_jobs if not (j.done or j.cancelled)]
        return len(self.open_jobs)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._admit(wait=not self.engine.sequences())
                for seq in [s for s in self.engine.sequences() if s.tag.cancelled]:
                    self.cancelled += 1
                    self._end(seq.tag, "cancelled")
                self._deliver(self.engine.step())
            except Exception as e:  # a bug: end the requests with it rather than leave them waiting
                for seq in self.engine.sequences():
                    self._end(seq.tag, f"error: {type(e).__name__}")
            self._flush()

    def _admit(self, wait: bool) -> None:
        """Start the waiting groups that fit (rows free, and cache blocks for their prompts), first come first served
        (a group waits and no later one passes it). static: only into an empty engine, after gathering for up to
        20 ms (concurrent requests form one batch), and none until it is empty again."""
        if self.policy == "static" and self.engine.sequences():
            return
        gather = 0.02 if self.policy == "static" else 0.0
        deadline = time.perf_counter() + gather
        while self.engine.free:
            if self._held is None:
                try:
                    self._held = self.pending.get(timeout=None if wait else max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if wait:  # the first arrival into an idle engine: the gathering starts now
                    wait, deadline = False, time.perf_counter() + gather
            group = [j for j in self._held if not j.cancelled]
            if group and not self.engine.fits(len(group), len(group[0].seq.prompt)):
                break
            self._held = None
            try:
                self._deliver(self.engine.add([j.seq for j in group]) if group else [])
            except Exception as e:  # validated before the queue: a bug; end the group with it
                for j in group:
                    self._end(j, f"error: {type(e).__name__}: {e}")
            self.batches.append(len(self.engine.running))

    def _deliver(self, emitted) -> None:
        """Each new token's text to its request; a stop string ends the sequence; a finished one ends its request."""
        last = {id(seq): i for i, (seq, _) in enumerate(emitted)}  # a speculative step gives a row several tokens
        for i, (seq, token) in enumerate(emitted):
            job: Job = seq.tag
            if job.ended:  # a stop string ended it earlier in this step
                continue
            if token is not None:
                job.t_first = job.t_first or time.perf_counter()
                piece, stopped = job.text.push(token)
                if piece:
                    self._outbox.append((job, piece))
                if stopped:
                    self.engine.finish(seq, "stop")
                    self._end(job, "stop")
                    continue
            if seq.done and last[id(seq)] == i:
                self._end(job, seq.finish_reason)
        if self.metrics is not None:
            self.metrics.running.set(len(self.engine.running))

    def _flush(self) -> None:
        """Hand the step's pieces to each event loop in one call (one wake-up a step, not one a token)."""
        items, self._outbox = self._outbox, []
        loops: dict = {}
        for job, item in items:
            loops.setdefault(job.loop, []).append((job, item))
        for loop, batch in loops.items():
            try:
                loop.call_soon_threadsafe(_hand_out, batch)
            except RuntimeError:  # its event loop is closed: the server has stopped, nobody reads it
                pass

    def _end(self, job: Job, reason: str) -> None:
        job.ended = True
        kind = reason.split(":")[0]
        self.ended_by[kind] = self.ended_by.get(kind, 0) + 1
        self.engine.finish(job.seq, reason)
        try:
            if not reason.startswith(("cancelled", "error", "shutdown")) and (rest := job.text.flush()):
                self._outbox.append((job, rest))  # the characters held back for a stop string that did not come
            self._outbox.append((job, None))
        except RuntimeError:  # its event loop is closed: the server has stopped, nobody reads it
            pass
        if self.metrics is not None:
            self.metrics.finished(job)
