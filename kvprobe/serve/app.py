"""The OpenAI-compatible front end: FastAPI routes that turn requests into ``Job``s for the engine thread
(``kvprobe.serve.worker``) and its events into OpenAI responses, streamed (SSE) or whole.

    POST /v1/chat/completions, /v1/completions   answers, steered; each choice carries a ``kvprobe`` object
    GET  /v1/models                                the generator, and one id per policy (``smollm2:route``)
    GET  /health                                   200 once the model is loaded and the engine thread alive
    GET  /metrics                                  Prometheus
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvprobe.serve.metrics import Metrics
from kvprobe.serve.protocol import APIError, ChatRequest, CompletionRequest, Sampling, parse
from kvprobe.serve.worker import END, Job, Overloaded, Worker
from kvprobe.models import eos_ids
from kvprobe.steering import DoneEvent, GenerationResult, KVProbeGenerator, RouteEvent, TextEvent
from kvprobe.steering.config import POLICIES
from kvprobe.steering.generator import ContextTooLong

log = logging.getLogger("kvprobe.serve")
HELD = ("verify", "route+verify", "sample")  # policies whose text is final only once the probe has decided


@dataclass
class ServeSettings:
    """How ``kvprobe serve`` runs (its command-line options)."""

    path: str  # a generator folder or a shipped alias (as from_pretrained)
    policy: str | None = None  # the default policy; None = the folder's
    api_key: str | None = None
    max_batch_size: int = 8  # rows decoded together (a request's n counts n rows)
    # how long the first request of a batch waits for others. 0: batches stay open, so a request that arrives while
    # one decodes joins it at its next step anyway (continuous batching); a wait only delays the first. It gathers
    # closed batches (``sample``, whose samples finish together).
    batch_wait_ms: float = 0.0
    max_waiting: int = 64  # requests queued beyond this get 429 at once
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_n: int = 8
    dtype: str | None = None  # the base model's dtype (kvprobe.models.DTYPES); None = the one the folder records


def fingerprint(folder: Path | None) -> str:
    """A hash of the generator folder: the probes and thresholds that answered."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()) if folder else []:
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return "fp_" + digest.hexdigest()[:16]


def available_policies(gen: KVProbeGenerator) -> list[str]:
    """The policies this generator's probes can run."""
    ok = []
    for policy in POLICIES:
        try:
            if policy != "oracle":
                gen.hooks(policy, 1)
                ok.append(policy)
        except ValueError:
            pass
    return ok


def finish(result: GenerationResult, stops: list[str], eos: set[int]) -> tuple[str, str]:
    """The answer's text as returned (cut before the first stop string) and why it ended: ``stop`` (a stop string or
    end of sequence) or ``length`` (its mode's token cap)."""
    text = result.text
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "stop" if result.token_ids and result.token_ids[-1] in eos else "length"


def usage(results) -> dict[str, int]:
    """OpenAI's ``usage`` of a request's answers: prompt positions prefilled, tokens of the returned texts."""
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class StopFilter:
    """Streams text without ever sending a stop string: the tail that could begin one is held back."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.held += text
        cuts = [self.held.find(s) for s in self.stops if s in self.held]
        if cuts:
            self.stopped = True
            out, self.held = self.held[:min(cuts)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


class Server:
    """The app's state: settings, the engine thread, metrics, and what a request needs to become a ``Job``."""

    def __init__(self, settings: ServeSettings, load=None):
        self.settings = settings
        self.metrics = Metrics()
        self.worker = Worker(load or (lambda: KVProbeGenerator.from_pretrained(settings.path, dtype=settings.dtype)), settings.max_batch_size,
                             settings.batch_wait_ms, settings.max_waiting, self.metrics.batch_rows.observe)
        self.draining = False
        self._ready = None  # name, fingerprint, policies, eos: computed once the generator is loaded

    def start(self) -> None:
        self.worker.start()

    @property
    def gen(self) -> KVProbeGenerator:
        return self.worker.gen

    def info(self) -> tuple[str, str, list[str], set[int]]:
        if self._ready is None:
            gen = self.gen
            name = self.settings.path if "/" not in str(self.settings.path) else Path(self.settings.path).name
            self._ready = (name, fingerprint(gen.path), available_policies(gen), set(eos_ids(gen.lm)))
        return self._ready

    def check_ready(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable", code="draining")
        if self.worker.error is not None:
            raise APIError(503, f"the generator failed to load: {self.worker.error}", type="service_unavailable",
                           code="load_failed")
        if not self.worker.ready:
            raise APIError(503, "the model is loading; retry shortly", type="service_unavailable", code="loading",
                           headers={"Retry-After": "1"})

    def job(self, req: Sampling, prompt, loop) -> Job:
        """The request checked (model, policy, parameters) and turned into a job; a 4xx ``APIError`` otherwise."""
        self.check_ready()
        name, _, policies, _ = self.info()
        for field in sorted(req.model_extra or {}):
            log.warning("ignored field %r (not an OpenAI or kvprobe parameter)", field)
        model, _, model_policy = req.model.partition(":")
        if model != name:
            raise APIError(404, f"the model {req.model!r} does not exist here; GET /v1/models lists {name!r} and "
                                f"{name}:<policy>", param="model", code="model_not_found")
        req.unsupported()
        options = req.kvprobe
        policy = (options.policy if options and options.policy else None)
        if model_policy and policy and policy != model_policy:
            raise APIError(400, f"model names policy {model_policy!r} and kvprobe.policy {policy!r}: give one",
                           param="kvprobe.policy")
        policy = policy or model_policy or self.settings.policy or self.gen.steering.policy
        if policy not in policies:
            raise APIError(400, f"policy {policy!r} is not one this generator can run: {policies}",
                           param="kvprobe.policy" if options and options.policy else "model", code="unknown_policy")
        if not 1 <= req.n <= self.settings.max_n:
            raise APIError(400, f"n must be between 1 and {self.settings.max_n}, not {req.n}", param="n")
        if req.n > 1 and policy == "sample":
            raise APIError(400, "n > 1 with policy 'sample': sample already draws kvprobe.samples answers and returns "
                                "the one its rule picks", param="n")
        config = {"stop_strings": req.stops() or None}
        cap, cap_name = req.cap(), "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        limit = self.gen.lm.shape.max_positions or 1 << 30
        if cap is not None:
            if not 1 <= cap <= limit:
                raise APIError(400, f"{cap_name} must be between 1 and the model's context ({limit}), not {cap}",
                               param=cap_name, code="invalid_value")
            config["max_new_tokens"] = cap
        if req.temperature is not None and not 0 <= req.temperature <= 2:
            raise APIError(400, f"temperature must be between 0 and 2, not {req.temperature}", param="temperature")
        if req.top_p is not None and not 0 < req.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], not {req.top_p}", param="top_p")
        if req.temperature:
            config |= {"do_sample": True, "temperature": float(req.temperature), "top_p": float(req.top_p or 1.0)}
        elif policy == "sample":
            raise APIError(400, "policy 'sample' draws several answers: set temperature > 0", param="temperature")
        steering = options.steering() if options else {}
        if options and options.budget is not None:
            steering["threshold"] = self.budget_threshold(options.budget)
        try:
            self.gen.check_thresholds(dataclasses.replace(self.gen.steering, **steering))
        except ValueError as err:
            raise APIError(400, str(err), param="kvprobe") from None
        seed = req.seed if req.seed is not None else random.randrange(1 << 31)
        return Job(prompt, req.n, policy, config, steering, seed, loop)

    def budget_threshold(self, budget: float) -> str:
        names = sorted(self.gen.difficulty.thresholds) if self.gen.difficulty is not None else []
        name = next((n for n in names if n == f"best_at_{budget:g}x_slow"), None)
        if name is None:
            raise APIError(400, f"no threshold is calibrated for budget {budget:g}; calibrated: {names}",
                           param="kvprobe.budget")
        return name

    def submit(self, job: Job) -> None:
        try:
            self.worker.submit(job)
        except Overloaded:
            raise APIError(429, f"{self.settings.max_waiting} requests are already waiting; retry shortly",
                           type="rate_limit_error", code="server_overloaded", headers={"Retry-After": "1"}) from None

    async def events(self, job: Job, request: Request):
        """The job's events until its end; a client that went away, or the timeout, cancels it."""
        deadline = job.submitted + self.settings.request_timeout
        while True:
            try:
                item = await asyncio.wait_for(job.queue.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel(job)
                    return
                if time.perf_counter() > deadline:
                    job.cancelled = True
                    raise APIError(504, f"the request took more than {self.settings.request_timeout:g} s",
                                   type="timeout", code="request_timeout") from None
                continue
            if item is END:
                return
            if isinstance(item, ContextTooLong):
                raise APIError(400, str(item), param="messages", code="context_length_exceeded")
            if isinstance(item, ValueError):
                raise APIError(400, str(item))
            if isinstance(item, BaseException):
                raise APIError(500, f"decoding failed: {type(item).__name__}: {item}", type="server_error")
            yield item

    def cancel(self, job: Job) -> None:
        if not job.cancelled:
            job.cancelled = True
            self.metrics.cancelled.inc()

    def choice_info(self, job: Job, result: GenerationResult) -> dict:
        info = {"policy": job.policy, "mode": result.mode, "final_mode": result.final_mode,
                "route_score": result.route_score, "confidence": result.confidence, "escalated": result.escalated,
                "verify_score": result.verify_score, "switched_at": result.switched_at, "tokens": dict(result.tokens)}
        if result.samples is not None:
            info |= {"samples": len(result.samples), "answers": result.answers, "chosen": result.chosen}
        return info


def create_app(settings: ServeSettings, load=None) -> FastAPI:
    """The FastAPI app; ``load`` builds the generator (default: ``from_pretrained(settings.path)``) in the engine
    thread, which starts with the app."""
    server = Server(settings, load)

    async def lifespan(app):
        server.start()
        yield
        server.worker.stop()

    app = FastAPI(title="kvprobe", lifespan=lifespan)
    app.state.server = server

    def error(err: APIError) -> JSONResponse:
        server.metrics.errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error(APIError(err.status_code, str(err.detail), type="invalid_request_error",
                              code="not_found" if err.status_code == 404 else None))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        key = settings.api_key
        if key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error(APIError(401, "a missing or wrong API key (send Authorization: Bearer <key>)",
                                      type="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    async def body(request: Request) -> object:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await body(request))
        return await complete(request, req, req.prompt(), "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await body(request))
        return await complete(request, req, req.prompt_text(), "text_completion")

    async def complete(request: Request, req: Sampling, prompt, kind: str):
        job = server.job(req, prompt, asyncio.get_running_loop())
        server.submit(job)
        stream = server.events(job, request)
        if req.stream:
            try:
                first = await anext(stream, END)
            except APIError:
                job.cancelled = True
                raise
            return EventSourceResponse(chunks(job, req, kind, first, stream), ping=15)
        return JSONResponse(await whole(job, req, kind, stream))

    def head(job: Job, kind: str) -> dict:
        name, fp, _, _ = server.info()
        return {"id": ("chatcmpl-" if kind.startswith("chat") else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": f"{name}:{job.policy}", "system_fingerprint": fp}

    def choice(kind: str, index: int, text: str, reason, info=None, stream=False) -> dict:
        out = {"index": index, "finish_reason": reason, "logprobs": None}
        if kind.startswith("chat"):
            out["delta" if stream else "message"] = {"content": text} if stream else {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out | ({"kvprobe": info} if info is not None else {})

    async def whole(job: Job, req: Sampling, kind: str, stream) -> dict:
        _, _, _, eos = server.info()
        results: dict[int, GenerationResult] = {}
        first = None
        async for event in stream:
            first = first or time.perf_counter()
            if isinstance(event, DoneEvent):
                results[event.sample or 0] = event.result
        if len(results) < job.n:  # the client went away
            return {}
        server.metrics.ttft.observe(first - job.submitted)
        choices = []
        for i in range(job.n):
            text, reason = finish(results[i], req.stops(), eos)
            server.metrics.result(results[i], reason)
            choices.append(choice(kind, i, text, reason, server.choice_info(job, results[i])))
        server.metrics.e2e.observe(time.perf_counter() - job.submitted)
        return head(job, kind) | {"object": kind, "choices": choices, "usage": usage(results.values())}

    async def chunks(job: Job, req: Sampling, kind: str, first, stream):
        """SSE chunks: the route with the first, text as it comes (held for ``HELD`` policies), the full ``kvprobe``
        object and the finish reason with the last of each choice; usage last when asked; then [DONE]."""
        _, _, _, eos = server.info()
        top = head(job, kind) | {"object": "chat.completion.chunk" if kind.startswith("chat") else "text_completion"}
        held, stops = job.policy in HELD, req.stops()
        filters = [StopFilter(stops) for _ in range(job.n)]
        started, last, sent = [False] * job.n, [None] * job.n, [""] * job.n
        results: dict[int, GenerationResult] = {}
        route: dict = {}

        def data(choices, usage=None) -> dict:
            return {"data": json.dumps(top | {"choices": choices} | ({"usage": usage} if usage is not None else {}))}

        def opening(i: int, mode: str | None) -> dict:
            started[i] = True
            info = {"policy": job.policy, "mode": mode} | route
            c = choice(kind, i, "", None, info, stream=True)
            if kind.startswith("chat"):
                c["delta"] = {"role": "assistant", "content": ""}
            return data([c])

        def text(i: int, piece: str):
            now = time.perf_counter()
            if last[i] is None:
                server.metrics.ttft.observe(now - job.submitted)
            else:
                server.metrics.itl.observe(now - last[i])
            last[i] = now
            sent[i] += piece
            return data([choice(kind, i, piece, None, stream=True)])

        async def items():
            if first is not END:
                yield first
            async for event in stream:
                yield event

        try:
            async for event in items():
                if isinstance(event, RouteEvent):
                    route = {"route_score": event.score}
                    for i in range(job.n):
                        yield opening(i, event.mode)
                elif isinstance(event, TextEvent) and not held:
                    i = event.sample or 0
                    if not started[i]:
                        yield opening(i, None)
                    if piece := filters[i].push(event.text):
                        yield text(i, piece)
                elif isinstance(event, DoneEvent):
                    i, result = event.sample or 0, event.result
                    results[i] = result
                    if not started[i]:
                        yield opening(i, result.mode)
                    full, reason = finish(result, stops, eos)
                    if rest := (full[len(sent[i]):] if full.startswith(sent[i]) else ""):
                        yield text(i, rest)
                    server.metrics.result(result, reason)
                    yield data([choice(kind, i, "", reason, server.choice_info(job, result), stream=True)])
            if len(results) < job.n:
                return
            if req.stream_options is not None and req.stream_options.include_usage:
                yield data([], usage(results.values()))
            server.metrics.e2e.observe(time.perf_counter() - job.submitted)
            yield {"data": "[DONE]"}
        except APIError as err:  # after the stream began: the error as the last event
            server.metrics.errors.labels(str(err.status)).inc()
            yield {"data": json.dumps(err.body())}
        finally:
            if len(results) < job.n:
                server.cancel(job)

    @app.get("/v1/models")
    async def models():
        server.check_ready()
        name, fp, policies, _ = server.info()
        gen = server.gen
        default = settings.policy or gen.steering.policy
        base = {"object": "model", "created": 0, "owned_by": "kvprobe"}
        rows = [base | {"id": name, "root": str(gen.path), "kvprobe": {"policies": policies, "default_policy": default,
                                                                        "base_model": gen.lm.spec.name, "dtype": gen.lm.spec.dtype,
                                                                        "fingerprint": fp}}]
        rows += [base | {"id": f"{name}:{p}", "parent": name} for p in policies]
        return {"object": "list", "data": rows}

    @app.get("/health")
    async def health():
        try:
            server.check_ready()
        except APIError as err:
            return JSONResponse(err.body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        server.metrics.waiting.set(server.worker.queued)
        server.metrics.running.set(len(server.worker.running))
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    return app
