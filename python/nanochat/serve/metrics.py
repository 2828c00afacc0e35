"""Prometheus metrics of one app (its own ``CollectorRegistry``, so several apps in one process never collide).

Exposed at ``GET /metrics`` in the text format. Token counters and latency histograms are fed by the generation
worker threads (prometheus_client is thread-safe); request counts by the request-log middleware once a response
has finished (for a stream: after its last chunk), so they carry the final status.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# endpoints with their own label value; anything else (404s, probes) is "other", to bound label cardinality
ENDPOINTS = frozenset(
    {
        "/",
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/openapi.json",
        "/docs",
        "/tokenize",
        "/detokenize",
    }
)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class Metrics:
    def __init__(
        self, model_id: str = "", context_length: int = 0, max_concurrent: int = 0, max_queue: int = 0
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nanochat_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "nanochat_request_duration_seconds",
            "time from request start to the end of the response (streams: the last chunk)",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "prompt tokens of generations started", registry=r)
        self.generated_tokens = Counter("nanochat_generated_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "nanochat_time_to_first_token_seconds",
            "time from request arrival (queueing included) to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "nanochat_time_per_output_token_seconds",
            "time between consecutive generated tokens of a request",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("nanochat_requests_in_flight", "generations running now", registry=r)
        self.queued = Gauge("nanochat_requests_queued", "requests waiting for a generation slot", registry=r)
        self.max_concurrent = Gauge("nanochat_slots", "generation slots (--max-concurrent)", registry=r)
        self.max_queue = Gauge("nanochat_queue_capacity", "requests that may wait for a slot (--max-queue)", registry=r)
        self.rejected = Counter(
            "nanochat_requests_rejected",
            "requests answered 503 before generating: queue_full (Retry-After sent) or shutting_down",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "nanochat_requests_cancelled", "generations stopped because the client went away", registry=r
        )
        self.model_info = Gauge(
            "nanochat_model_info", "the served model (value 1)", ["model", "context_length"], registry=r
        )
        self.model_info.labels(model=model_id, context_length=str(context_length)).set(1)
        self.max_concurrent.set(max_concurrent)
        self.max_queue.set(max_queue)
        for reason in ("queue_full", "shutting_down"):
            self.rejected.labels(reason=reason)  # exported at 0 from the start

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
