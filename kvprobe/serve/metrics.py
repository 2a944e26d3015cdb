"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own so that several servers (tests) can
live in one process. Names follow vLLM's where one exists, with the ``kvprobe_`` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("kvprobe_requests_running", "Requests decoding now", registry=r)
        self.waiting = Gauge("kvprobe_requests_waiting", "Requests queued, not decoding yet", registry=r)
        self.ttft = Histogram("kvprobe_time_to_first_token_seconds", "Arrival to the first text sent", buckets=LATENCY, registry=r)
        self.itl = Histogram("kvprobe_inter_token_latency_seconds", "Between two streamed text chunks", buckets=TOKEN_GAP, registry=r)
        self.e2e = Histogram("kvprobe_e2e_request_latency_seconds", "Arrival to the last byte of the answer", buckets=LATENCY, registry=r)
        self.prompt_tokens = Counter("kvprobe_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("kvprobe_generation_tokens", "Tokens decoded (every mode, discarded attempts too)", registry=r)
        self.finished = Counter("kvprobe_request_success", "Choices finished, by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("kvprobe_request_errors", "Requests answered with an error, by HTTP status", ["code"], registry=r)
        self.cancelled = Counter("kvprobe_requests_cancelled", "Requests whose client went away before the answer", registry=r)
        self.routes = Counter("kvprobe_routes", "Answers by the mode they started in", ["mode"], registry=r)
        self.switches = Counter("kvprobe_switches", "Slow answers switched to fast mid-decode", registry=r)
        self.escalations = Counter("kvprobe_escalations", "Fast answers checked, found likely wrong and answered slow", registry=r)
        self.confidence = Histogram("kvprobe_confidence", "The correctness probe's P(correct) of each answer, by final mode",
                                    ["mode"], buckets=tuple(i / 10 for i in range(1, 11)), registry=r)
        self.probe_seconds = Counter("kvprobe_probe_seconds", "Seconds spent in the probes", registry=r)
        self.batch_rows = Histogram("kvprobe_batch_rows", "Rows per decoded batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def result(self, result, finish_reason: str) -> None:
        """Count one finished choice (a ``GenerationResult``)."""
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.decoded_tokens)
        self.routes.labels(result.mode).inc()
        self.switches.inc(result.switched_at is not None)
        self.escalations.inc(bool(result.escalated))
        self.probe_seconds.inc(result.probe_seconds)
        if result.confidence is not None:
            self.confidence.labels(result.final_mode).observe(result.confidence)

    def text(self) -> bytes:
        return generate_latest(self.registry)
