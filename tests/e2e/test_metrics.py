"""`wafer serve --metrics-address` serves Prometheus metrics over HTTP, and they move with the calls."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ServerProcess, start_server
from wafer_client import InvalidArgumentError, NotFoundError, WaferClient

pytestmark = pytest.mark.e2e

EMBED = "/wafer.v1.Inference/Embed"
GENERATE = "/wafer.v1.Inference/Generate"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def measured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(tmp_path_factory.mktemp("wafer-metrics"), metrics_address="127.0.0.1:0")
    yield running
    assert running.stop() == 0, "server did not exit cleanly on SIGTERM"


def metrics_url(server: ServerProcess) -> str:
    (record,) = [r for r in server.logs() if r.get("event") == "metrics listening"]
    return f"http://{record['address']}/metrics"


def scrape(server: ServerProcess) -> Samples:
    with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_listen_on_the_port_the_log_names(measured_server: ServerProcess) -> None:
    url = metrics_url(measured_server)
    assert url.startswith("http://127.0.0.1:")
    assert not url.startswith("http://127.0.0.1:0/")
    samples = scrape(measured_server)
    # Startup models are ready (start_server waited for them) and say so.
    assert get(samples, "wafer_model_state", model="minilm", state="ready") == 1
    assert get(samples, "wafer_model_state", model="minilm", state="loading") == 0
    assert get(samples, "wafer_model_memory_bytes", model="minilm") > 0
    assert get(samples, "wafer_model_load_seconds", model="minilm") > 0
    assert get(samples, "wafer_model_state", model="paraphrase-minilm-l3", state="unloaded") == 1
    assert get(samples, "wafer_queue_depth", model="minilm", lane="interactive") == 0


def test_counters_and_histograms_move_with_calls(measured_server: ServerProcess) -> None:
    before = scrape(measured_server)
    with WaferClient(measured_server.address, timeout=60, retries=0) as client:
        # Texts no earlier test embedded, so the embedding cache misses them once, then hits.
        texts = [f"Are we still on for lunch? ({time.time_ns()})", "Running late, sorry (metrics test)"]
        embedded = client.embed(texts)
        again = client.embed(texts)
        assert again.cached == 2
        completion = client.complete("Say hello.", max_tokens=8, temperature=0)
        with pytest.raises(InvalidArgumentError):
            client.embed(["fine", ""])
        with pytest.raises(NotFoundError):
            client.embed("x", model="no-such-model")
    # A failed call's status reaches the client as the server aborts, a moment before the
    # interceptor records it: scrape until the last call shows, as Prometheus would next time.
    last_call = {"method": EMBED, "model": "", "code": "NOT_FOUND"}
    deadline = time.monotonic() + 5
    after = scrape(measured_server)
    while get(after, "wafer_requests_total", **last_call) == get(before, "wafer_requests_total", **last_call):
        assert time.monotonic() < deadline, "the failed call was never counted"
        time.sleep(0.05)
        after = scrape(measured_server)

    def moved(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    generator = completion.model
    assert moved("wafer_requests_total", method=EMBED, model="minilm", code="OK") == 2
    assert moved("wafer_requests_total", method=GENERATE, model=generator, code="OK") == 1
    assert moved("wafer_requests_total", method=EMBED, model="", code="INVALID_ARGUMENT") == 1
    assert moved("wafer_requests_total", method=EMBED, model="", code="NOT_FOUND") == 1

    for name in ("wafer_request_duration_seconds", "wafer_request_queue_seconds", "wafer_request_inference_seconds"):
        assert moved(f"{name}_count", method=EMBED, model="minilm") == 2, name
        assert moved(f"{name}_count", method=GENERATE, model=generator) == 1, name
    assert moved("wafer_request_inference_seconds_sum", method=GENERATE, model=generator) > 0
    assert moved("wafer_request_duration_seconds_bucket", method=EMBED, model="minilm", le="+Inf") == 2

    # The second call was served from the cache: the model ran once, for two texts.
    assert moved("wafer_batch_size_sum", model="minilm", task="embed") == 2
    assert moved("wafer_embedding_cache_lookups_total", model="minilm", result="miss") == 2
    assert moved("wafer_embedding_cache_lookups_total", model="minilm", result="hit") == 2
    assert moved("wafer_prompt_tokens_total", model="minilm", task="embed") == embedded.usage.prompt_tokens
    assert moved("wafer_batch_tokens_sum", model="minilm", task="embed") == embedded.usage.prompt_tokens
    usage = completion.usage
    assert usage is not None
    assert moved("wafer_generated_tokens_total", model=generator) == usage.completion_tokens > 0
    assert moved("wafer_prompt_tokens_total", model=generator, task="generate") == usage.prompt_tokens > 0

    # Nothing waits or runs once the calls are done; no series for the made-up model name.
    assert get(after, "wafer_requests_in_flight", model="minilm") == 0
    assert get(after, "wafer_queue_depth", model=generator, lane="interactive") == 0
    assert not any("no-such-model" in dict(labels).values() for _, labels in after)


def test_model_load_and_unload_show_in_the_state_gauge(measured_server: ServerProcess) -> None:
    with WaferClient(measured_server.address, timeout=120, retries=0) as client:
        client.load_model("paraphrase-minilm-l3")
        loaded = scrape(measured_server)
        client.unload_model("paraphrase-minilm-l3")
    unloaded = scrape(measured_server)
    assert get(loaded, "wafer_model_state", model="paraphrase-minilm-l3", state="ready") == 1
    assert get(loaded, "wafer_model_memory_bytes", model="paraphrase-minilm-l3") > 0
    assert get(unloaded, "wafer_model_state", model="paraphrase-minilm-l3", state="unloaded") == 1
    assert get(unloaded, "wafer_model_memory_bytes", model="paraphrase-minilm-l3") == 0
