"""Prometheus metrics: what the server has done (counters, histograms) and what it holds now (gauges).

One `Metrics` object owns its own `CollectorRegistry`: `app.serve` makes one and hands it to the
parts that record (the RPC interceptor, the engine); tests make their own, so nothing is shared
between servers or tests through prometheus_client's global registry.

Events are recorded where they happen: calls in the interceptor (it alone sees the status code and
the whole duration), batches in the model's scheduler and handle (they alone see the backend's
output), finished generations in the engine.
State is not copied: model state, memory, load time, in-flight and waiting calls are read from
the model registry when /metrics is scraped, so they can never drift from what the registry says.

This module is a leaf: it imports nothing of Wafer (a bad address is a ValueError, which `app.py`
reports as the configuration mistake it is). The parts that record (cache,
engine, scheduler, jobs) declare what they report as small protocols that `Metrics` implements, and
the collectors read the registry and the job manager through the protocols below; `app.py` wires
them together. So those parts run, and are tested, without Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from threading import Thread
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# From a sub-millisecond refusal to a long generation (minutes).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
# Up to the largest request the settings allow by default (1024 inputs).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
# Per instance, every size up to 16 on its own: what a few concurrent callers make of merging
# (16 single-text clients on 2 instances form calls of 1 to 8), then as wafer_batch_size.
INSTANCE_BATCH_SIZE_BUCKETS = (*range(1, 17), 32, 64, 128, 256, 512, 1024)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class ModelSnapshot(Protocol):
    """What the model gauges read of one model (the registry's `ModelStatus`)."""

    @property
    def spec(self) -> _Named: ...
    @property
    def state(self) -> Enum: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def load_seconds(self) -> float: ...
    @property
    def active_requests(self) -> int: ...
    @property
    def waiting_interactive(self) -> int: ...
    @property
    def waiting_batch(self) -> int: ...


class ModelSource(Protocol):
    """Where the model gauges come from (the model registry)."""

    def statuses(self) -> Sequence[ModelSnapshot]: ...

    def memory_in_use(self) -> int: ...

    @property
    def memory_budget_bytes(self) -> int | None: ...


class JobSnapshot(Protocol):
    """What the job gauges read of one job (the job manager's `JobStatus`)."""

    @property
    def state(self) -> Enum: ...
    @property
    def docs_per_second(self) -> float: ...


class JobSource(Protocol):
    """Where the job gauges come from (the job manager)."""

    def all(self) -> Sequence[JobSnapshot]: ...


# A model label for a call that names no model of the catalog: a client must not be able to mint
# one time series per made-up model name.
NO_MODEL = ""


class Metrics:
    """The server's metrics, in their own registry."""

    def __init__(self, *, models: Iterable[str] | None = None) -> None:
        """`models`: the catalog's names, the only values a `model` label may take (None: any)."""
        self.registry = CollectorRegistry()
        self._models = frozenset(models) if models is not None else None
        # Each call's time series, by method, model label and code (all bounded: registered
        # methods, the catalog's names, the status codes).
        self._call_children: dict[tuple[str, str, str], _CallChildren] = {}
        registry = self.registry
        self.requests = Counter(
            "wafer_requests",
            "Finished RPCs by method, model and gRPC status code.",
            ["method", "model", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "wafer_request_duration_seconds",
            "Whole RPC time, from arrival to the last response message (or the error).",
            ["method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "wafer_request_queue_seconds",
            "Time a successful RPC waited for its model (loading, worker thread, compute turn).",
            ["method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "wafer_request_inference_seconds",
            "Time a successful RPC spent computing (and, for Index RPCs, writing or searching the store).",
            ["method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "wafer_batch_size",
            "Sequences per backend call (embedding or relevance scoring).",
            ["model", "task"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "wafer_batch_tokens",
            "Tokens per backend call (embedding or relevance scoring), after truncation.",
            ["model", "task"],
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.instance_batch_size = Histogram(
            "wafer_instance_batch_size",
            "Sequences per embedding call, by model instance (0: the model's own; `instances:` in models.yaml).",
            ["model", "instance"],
            buckets=INSTANCE_BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.instance_busy_seconds = Counter(
            "wafer_instance_busy_seconds",
            "Time each model instance spent in embedding calls (its backend: padding, the model, pooling); "
            "over wall time, how busy the instance was.",
            ["model", "instance"],
            registry=registry,
        )
        self.tokenize_seconds = Histogram(
            "wafer_tokenization_seconds",
            "Time tokenizing an embedding request on arrival, before it queued (models that tokenize ahead).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_interruptions = Counter(
            "wafer_batch_interruptions",
            "Batch-lane backend calls stopped because interactive work arrived (their rows ran again).",
            ["model"],
            registry=registry,
        )
        self.prompt_cache_hits = Counter(
            "wafer_prompt_cache_hits",
            "Generations whose prompt began with a prefix already in the model's KV cache.",
            ["model"],
            registry=registry,
        )
        self.prompt_cache_misses = Counter(
            "wafer_prompt_cache_misses",
            "Generations whose prompt was decoded from its first token (prompt cache on).",
            ["model"],
            registry=registry,
        )
        self.prompt_cache_tokens = Counter(
            "wafer_prompt_cache_tokens",
            "Prompt tokens found in the KV cache, not decoded again.",
            ["model"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "wafer_prompt_tokens",
            "Input tokens read by a model: texts embedded, pairs scored, prompts of generations.",
            ["model", "task"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            "wafer_generated_tokens",
            "Tokens sampled by finished generations (the end-of-generation token included).",
            ["model"],
            registry=registry,
        )

        self.cache_lookups = Counter(
            "wafer_embedding_cache_lookups",
            "Embedding cache lookups per model, by result: hit (served from the cache) or miss (computed).",
            ["model", "result"],
            registry=registry,
        )

        self.job_documents = Counter(
            "wafer_job_documents",
            "Documents embedded and written by jobs.",
            ["model"],
            registry=registry,
        )

    def record_cache(self, model: str, *, hits: int, misses: int) -> None:
        label = self.model_label(model)
        if hits:
            self.cache_lookups.labels(label, "hit").inc(hits)
        if misses:
            self.cache_lookups.labels(label, "miss").inc(misses)

    def model_label(self, name: str) -> str:
        if self._models is None or name in self._models:
            return name
        return NO_MODEL

    # -- recording -----------------------------------------------------------------------------

    def record_call(
        self,
        method: str,
        model: str,
        code: str,
        seconds: float,
        *,
        queue_seconds: float | None = None,
        inference_seconds: float | None = None,
    ) -> None:
        """One finished RPC. Queue and inference times come only with responses that report them."""
        model = self.model_label(model)
        key = (method, model, code)
        children = self._call_children.get(key)
        if children is None:
            # Resolved once per method, model and code: `labels()` takes a lock and builds a
            # key per call, on the event loop, for every request.
            children = self._call_children[key] = _CallChildren(
                self.requests.labels(method, model, code),
                self.request_seconds.labels(method, model),
                self.queue_seconds,
                self.inference_seconds,
                (method, model),
            )
        children.requests.inc()
        children.seconds.observe(seconds)
        if queue_seconds is not None:
            children.queued().observe(queue_seconds)
        if inference_seconds is not None:
            children.inferred().observe(inference_seconds)

    def record_batch(self, model: str, task: str, size: int, tokens: int) -> None:
        """One backend call over `size` sequences holding `tokens` tokens; they count as prompt tokens.
        `task` is the task's name (`specs.Task` is a string enum)."""
        self.batch_size.labels(model, str(task)).observe(size)
        self.batch_tokens.labels(model, str(task)).observe(tokens)
        self.prompt_tokens.labels(model, str(task)).inc(tokens)

    def record_instance_call(self, model: str, instance: int, size: int, seconds: float) -> None:
        """One embedding call of `size` sequences on a model's `instance`, `seconds` long."""
        label = str(instance)
        self.instance_batch_size.labels(model, label).observe(size)
        self.instance_busy_seconds.labels(model, label).inc(seconds)

    def record_interruption(self, model: str) -> None:
        self.batch_interruptions.labels(model).inc()

    def record_tokenization(self, model: str, seconds: float) -> None:
        self.tokenize_seconds.labels(model).observe(seconds)

    def record_prompt_cache(self, model: str, cached_tokens: int) -> None:
        if cached_tokens:
            self.prompt_cache_hits.labels(model).inc()
            self.prompt_cache_tokens.labels(model).inc(cached_tokens)
        else:
            self.prompt_cache_misses.labels(model).inc()

    def record_generation(self, model: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.labels(model, "generate").inc(prompt_tokens)
        self.generated_tokens.labels(model).inc(generated_tokens)

    def record_job_documents(self, model: str, documents: int) -> None:
        """A job wrote a batch of `documents` documents."""
        self.job_documents.labels(self.model_label(model)).inc(documents)

    def watch_jobs(self, jobs: JobSource, *, states: Iterable[Enum] = ()) -> None:
        """Report jobs per state and the documents per second of running jobs. Every one of
        `states` (the job manager's `JobState`) is reported, 0 when no job is in it."""
        self.registry.register(_JobsCollector(jobs, tuple(states)))

    def watch(self, registry: ModelSource) -> None:
        """Report the registry's models (state, memory, load time, in-flight and waiting calls)."""
        self.registry.register(_RegistryCollector(registry))

    # -- exposition ----------------------------------------------------------------------------

    def serve(self, address: str) -> MetricsServer:
        """Serve /metrics over HTTP on `address` (host:port; port 0 picks a free one), on a thread."""
        host, port = parse_address(address)
        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ValueError(f"cannot serve metrics on {address!r}: {exc}") from exc
        return MetricsServer(httpd, thread, host)


class _CallChildren:
    """One method, model and code's time series of `Metrics.record_call`; the queue and inference
    histograms' series are made on their first observation, so a method that never reports them
    (ListModels) shows none, as before."""

    __slots__ = ("_inference", "_inferred", "_labels", "_queue", "_queued", "requests", "seconds")

    def __init__(
        self, requests: Counter, seconds: Histogram, queue: Histogram, inference: Histogram, labels: tuple[str, str]
    ) -> None:
        self.requests = requests
        self.seconds = seconds
        self._queue, self._inference, self._labels = queue, inference, labels
        self._queued: Histogram | None = None
        self._inferred: Histogram | None = None

    def queued(self) -> Histogram:
        if self._queued is None:
            self._queued = self._queue.labels(*self._labels)
        return self._queued

    def inferred(self) -> Histogram:
        if self._inferred is None:
            self._inferred = self._inference.labels(*self._labels)
        return self._inferred


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6 host]:port` → (host, port)."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics address {address!r} must be host:port, e.g. 127.0.0.1:9464")
    return host, int(port_text)


@dataclass
class MetricsServer:
    """The running /metrics endpoint."""

    httpd: WSGIServer
    thread: Thread
    host: str

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return f"{host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _RegistryCollector(Collector):
    """Gauges read from the registry at scrape time (on the HTTP server's thread).

    The registry's fields are mutated on the event loop; reading them from another thread sees
    each value whole (ints, enums, references), which is all a scrape needs.
    """

    def __init__(self, registry: ModelSource) -> None:
        self._registry = registry

    def describe(self) -> Iterator[Metric]:
        # Declared without samples so registering does not run a scrape.
        yield from self._families()
        yield from self._memory_families()

    def collect(self) -> Iterator[Metric]:
        state, memory, load, in_flight, queue = self._families()
        in_use, budget = self._memory_families()
        # Retiring instances (a swap's old one, draining) count too: the budget is checked
        # against this, not against the sum of the models' own gauges.
        in_use.add_metric([], self._registry.memory_in_use())
        budget_bytes = self._registry.memory_budget_bytes
        if budget_bytes is not None:
            budget.add_metric([], budget_bytes)
        for status in self._registry.statuses():
            name = status.spec.name
            # Every state of the model's state enum: 1 for its own, 0 for the others.
            for candidate in type(status.state):
                state.add_metric([name, candidate.value], 1.0 if status.state is candidate else 0.0)
            memory.add_metric([name], status.memory_bytes)
            load.add_metric([name], status.load_seconds)
            in_flight.add_metric([name], status.active_requests)
            queue.add_metric([name, "interactive"], status.waiting_interactive)
            queue.add_metric([name, "batch"], status.waiting_batch)
        yield from (state, memory, load, in_flight, queue, in_use, budget)

    @staticmethod
    def _memory_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "wafer_memory_in_use_bytes",
                "Memory every loaded model instance holds, retiring ones included, as measured at their "
                "loads: what the memory budget is checked against.",
            ),
            GaugeMetricFamily(
                "wafer_memory_budget_bytes",
                "The registry's memory budget (absent when the server has none).",
            ),
        )

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
    ]:
        return (
            GaugeMetricFamily(
                "wafer_model_state",
                "1 for the model's current state (unloaded, loading, ready, unloading, failed), 0 for the others.",
                labels=["model", "state"],
            ),
            GaugeMetricFamily(
                "wafer_model_memory_bytes",
                "Resident memory the model's last load added, plus the working set its largest call touches "
                "beyond it (0 when not loaded).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "wafer_model_load_seconds",
                "Duration of the model's last successful load.",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "wafer_requests_in_flight",
                "Requests holding the model now (a lease: from the model being ready to the response).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "wafer_queue_depth",
                "Requests queued for a model's scheduler, per lane, not yet handed to the backend.",
                labels=["model", "lane"],
            ),
        )


class _JobsCollector(Collector):
    """Job gauges read from the job manager at scrape time (on the HTTP server's thread)."""

    def __init__(self, jobs: JobSource, states: tuple[Enum, ...]) -> None:
        self._jobs = jobs
        self._states = states

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        states, rate = self._families()
        statuses = self._jobs.all()
        known = list(self._states) + [s.state for s in statuses if s.state not in self._states]
        for state in dict.fromkeys(known):
            states.add_metric([str(state.value)], sum(1 for s in statuses if s.state is state))
        rate.add_metric([], sum(s.docs_per_second for s in statuses))
        yield from (states, rate)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("wafer_jobs", "Jobs the server knows, by state.", labels=["state"]),
            GaugeMetricFamily(
                "wafer_job_documents_per_second",
                "Documents per second of the running jobs together, over the last half minute.",
            ),
        )
