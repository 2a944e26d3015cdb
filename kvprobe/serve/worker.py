"""The one thread that owns the model: it takes requests (``Job``) from a bounded queue, batches those that arrive
within ``batch_wait_ms`` of each other and share a configuration, decodes each batch with
``KVProbeGenerator.stream`` and hands every event to its request's asyncio queue.

Batching is continuous: a batch stays open while it decodes, and a request with the same configuration that
arrives meanwhile joins it at the next step (``KVProbeGenerator.stream(admit=...)``); each request ends when its
own rows do. Token caps (``RowCaps``) and sampling settings (lists per prompt in ``GenerationConfig``) may differ
within a batch. (``sample`` batches are closed: a prompt's samples finish together.) Within a batch, each request
keeps its own seed (``GenerationConfig.seed`` per prompt), its ``n`` copies come from one prefill (``Copies``), and
a request whose client went away stops decoding within two steps (``Cancel``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from kvprobe.steering import Copies, DoneEvent, GenerationConfig, Hook, KVProbeGenerator

log = logging.getLogger("kvprobe.serve")
END = object()  # the last item of a job's queue
PER_ROW = ("max_new_tokens", "do_sample", "temperature", "top_p")  # settings rows of one batch need not share


class Overloaded(Exception):
    """The waiting queue is full."""


@dataclass
class Job:
    """One request: its prompt (a question or a chat), ``n`` answers, and how to decode and steer them."""

    prompt: Any
    n: int
    policy: str
    config: dict[str, Any]  # GenerationConfig fields (seed apart)
    steering: dict[str, Any]  # SteeringSpec overrides
    seed: int | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def key(self) -> str:
        """Requests with the same key may decode in one batch (their token caps (``RowCaps``) and sampling settings
        (per prompt, ``GenerationConfig``) may differ)."""
        config = {k: v for k, v in self.config.items() if k not in PER_ROW}
        return json.dumps([self.policy, config, self.steering], sort_keys=True, default=str)

    def sampling(self) -> dict[str, object]:
        return {"do_sample": self.config.get("do_sample", False), "temperature": self.config.get("temperature", 1.0),
                "top_p": self.config.get("top_p", 1.0)}

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Cancel(Hook):
    """Rows of requests whose client went away finish at the next step (their padding is masked from then on)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def on_token(self, engine, state, blocks) -> None:
        for r in state.rows:
            if self.jobs[r.index].cancelled:
                r.done = True

    def on_finish(self, engine, state) -> None:
        for r in state.rows:  # after Escalate and Sampler: a cancelled row is never answered again
            if self.jobs[r.index].cancelled:
                r.done = r.reported = True


class RowCaps(Hook):
    """Each request's own token caps, in a batch whose caps are the largest of its requests'."""

    def __init__(self, jobs: list[Job], caps: dict[int, dict[str, int]]):
        self.jobs, self.caps = jobs, caps  # caps: id(job) -> {mode: cap}

    def on_token(self, engine, state, blocks) -> None:
        for r in state.rows:
            if not r.done and r.in_mode >= self.caps[id(self.jobs[r.index])][r.mode]:
                r.done = True


class Worker(threading.Thread):
    """Loads the generator (``load``), then serves jobs until ``stop``."""

    def __init__(self, load: Callable[[], KVProbeGenerator], max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 max_waiting: int = 64, on_batch: Callable[[int], None] | None = None):
        super().__init__(name="kvprobe-engine", daemon=True)
        self.load, self.max_batch_size, self.batch_wait = load, max_batch_size, batch_wait_ms / 1000
        self.max_waiting, self.on_batch = max_waiting, on_batch
        self.gen: KVProbeGenerator | None = None
        self.error: BaseException | None = None  # why loading failed
        self.waiting: collections.deque[Job] = collections.deque()
        self.gathering: list[Job] = []  # the batch being gathered: off the queue, not decoding yet
        self.running: dict[int, int] = {}  # requests decoding now: id -> rows not finished yet
        self.cond = threading.Condition()
        self.stopping = False

    @property
    def queued(self) -> int:
        """Requests not decoding yet: those waiting and those of the batch being gathered."""
        return len(self.waiting) + len(self.gathering)

    @property
    def ready(self) -> bool:
        return self.gen is not None and self.is_alive()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded
            self.waiting.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def run(self) -> None:
        try:
            self.gen = self.load()
        except BaseException as err:  # reported by /health and every request
            self.error = err
            log.exception("loading the generator failed")
            return
        log.info("generator loaded: %s", self.gen.path)
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            try:
                self.decode(batch)
            finally:
                self.running, self.gathering = {}, []

    def next_batch(self) -> list[Job] | None:
        """The oldest waiting job and those of the same key that arrive within ``batch_wait`` (at most
        ``max_batch_size`` rows, counting each job's ``n``)."""
        with self.cond:
            while not self.waiting and not self.stopping:
                self.cond.wait()
            if self.stopping and not self.waiting:
                return None
            first = self.waiting.popleft()
            batch, rows, key = [first], first.n, first.key()
            self.gathering = batch
            deadline = time.perf_counter() + self.batch_wait
            while rows < self.max_batch_size:
                take = next((j for j in self.waiting if j.key() == key and rows + j.n <= self.max_batch_size), None)
                if take is not None:
                    self.waiting.remove(take)
                    batch.append(take)
                    rows += take.n
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self.stopping:
                    break
                self.cond.wait(left)
            return [j for j in batch if not j.cancelled]

    def check(self, job: Job) -> None:
        """The generator's own checks for this request alone (prompt, context, policy), before it joins a batch."""
        self.gen.stream([job.prompt], job.policy, **job.config, **job.steering,
                        seed=job.seed if job.config.get("do_sample") else None)

    def caps(self, job: Job) -> dict[str, int]:
        """The job's token cap per mode (its ``max_tokens``, else the generator's)."""
        return GenerationConfig(max_new_tokens=job.config.get("max_new_tokens")).caps(self.gen.max_new_tokens)

    def admissible(self, key: str, room: int, caps: dict[str, int]) -> list[Job]:
        """Waiting jobs with ``key`` that fit in ``room`` rows and within the batch's ``caps``, oldest first, taken
        off the queue."""
        with self.cond:
            taken = []
            for job in list(self.waiting):
                fits = all(c <= caps[m] for m, c in self.caps(job).items())
                if job.key() == key and job.n <= room and fits and not job.cancelled:
                    self.waiting.remove(job)
                    taken.append(job)
                    room -= job.n
            return taken

    def decode(self, batch: list[Job]) -> None:
        """Decode a batch; unless its policy is ``sample``, the batch stays open: jobs with its key that arrive
        while it decodes join it at the next step, as long as it has room (continuous batching)."""
        good = []
        for job in batch:
            try:
                self.check(job)
                good.append(job)
            except ValueError as err:
                job.emit(err)
        if not good:
            return
        if self.on_batch is not None:
            self.on_batch(sum(j.n for j in good))
        first = good[0]
        key, jobs, left = first.key(), list(good), {id(j): j.n for j in good}
        seeds = [j.seed for j in jobs]
        sampling = {name: [j.sampling()[name] for j in jobs] for name in ("do_sample", "temperature", "top_p")}
        caps = {id(j): self.caps(j) for j in jobs}
        batch_caps = {m: max(c[m] for c in caps.values()) for m in caps[id(first)]}
        config = {k: v for k, v in first.config.items() if k not in PER_ROW} | sampling | {"max_new_tokens": batch_caps}
        copies = Copies([j.n for j in jobs])
        hooks = [copies, RowCaps(jobs, caps), Cancel(jobs)]
        self.running, self.gathering = left, []

        def admit() -> list:
            room = self.max_batch_size - sum(left.values())
            joined = []
            for job in self.admissible(key, room, batch_caps) if room > 0 else []:
                try:
                    self.check(job)
                except ValueError as err:
                    job.emit(err)
                    continue
                jobs.append(job)
                caps[id(job)] = self.caps(job)
                copies.counts.append(job.n)
                left[id(job)] = job.n
                seeds.append(job.seed)
                for name, value in job.sampling().items():
                    sampling[name].append(value)
                joined.append(job.prompt)
            return joined

        open_batch = first.policy != "sample"
        try:
            for event in self.gen.stream([j.prompt for j in good], first.policy, **config, **first.steering,
                                         seed=seeds, hooks=hooks, admit=admit if open_batch else None):
                job = jobs[event.row]
                job.emit(event)
                if isinstance(event, DoneEvent):
                    left[id(job)] -= 1
                    if not left[id(job)]:
                        del left[id(job)]
                        job.emit(END)
        except Exception as err:  # a failure of the batch fails its requests, not the server
            log.exception("a batch of %d requests failed", len(jobs))
            for job in jobs:
                job.emit(err)
        for job in jobs:
            if id(job) in left:  # cancelled, or failed: its queue still needs an end
                job.emit(END)
