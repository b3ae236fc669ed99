"""GET /metrics: Prometheus text format, one registry per app (never the process-global default one).

Engine state (running/waiting requests, KV usage, live sessions, streaming lag, preemptions, prefix- and
encoder-cache counts) is asked of the engine core at scrape time (`AsyncLLM.get_stats`); token counters,
finish reasons and the latency histograms (TTFT, inter-token, end to end) are recorded for every engine
request of every front end (HTTP, gRPC, Realtime, live sessions) by ServerMetrics as AsyncLLM's
RequestListener.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from omnistream.engine.core.messages import EngineStats
from omnistream.engine.frontend.outputs import RequestOutput

logger = logging.getLogger(__name__)

PREFIX = "omnistream_"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)


class _EngineCollector(Collector):
    """Gauges and cumulative counters from the engine core's latest snapshot (taken just before rendering)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.snapshot: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return
        stats = snapshot.scheduler
        lags = {"p50": snapshot.lag_p50, "p99": snapshot.lag_p99}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("num_requests_running", "Requests scheduled in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", stats.kv_cache_usage)
        yield gauge("live_sessions", "Open live (streaming-input) sessions.", getattr(self.llm, "num_live_sessions", 0))
        yield gauge("num_requests_speaking", "Requests speaking (holding a voice slot).", stats.num_speaking)
        yield gauge("talker_kv_cache_usage_perc", "Fraction of the talker's KV blocks in use (0..1).",
                    stats.talker_kv_usage)
        lag = GaugeMetricFamily(PREFIX + "streaming_lag_seconds",
                                "Seconds live input waited before it was scheduled (NaN with no samples).",
                                labels=["quantile"])
        for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
            value = lags.get(key)
            lag.add_metric([quantile], math.nan if value is None else float(value))
        yield lag
        yield counter("num_preemptions", "Requests preempted to free KV cache.", stats.num_preemptions)
        yield counter("num_talker_preemptions", "Talker KV recomputations (stored frames, nothing resampled).",
                      stats.num_talker_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("encoder_cache_hits", "Media encodings reused from the encoder cache.", stats.encoder_cache_hits)
        yield counter("live_prefill_tokens", "Live-session input tokens prefilled before their turn was committed.",
                      stats.num_live_prefill_tokens)
        yield counter("aborted_requests", "Unfinished requests and sessions aborted (client gone, cancel, abort).",
                      stats.num_aborted_requests)
        yield counter("encoded_media", "Media items run through an encoder.", stats.num_encoded_media)


class ServerMetrics:
    """The registry of one app and the metrics the handlers record."""

    def __init__(self, llm: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._engine = _EngineCollector(llm)
        self.registry.register(self._engine)
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests (per engine request).",
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished engine requests by finish_reason.",
                                       ["finish_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from the API call to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from the API call to the last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self._live: dict[str, _Timing] = {}  # engine requests being timed
        self._lock = threading.Lock()  # outputs come from the core client's thread, starts from event loops

    async def render(self) -> tuple[bytes, str]:
        """The text exposition, with the engine core's state read now (none once the core has died)."""
        try:
            self._engine.snapshot = await self._engine.llm.get_stats()
        except Exception:  # noqa: BLE001 - a scrape must never fail the server; the rest still renders
            logger.warning("could not read the engine core's stats", exc_info=True)
            self._engine.snapshot = None
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---- AsyncLLM's RequestListener: every engine request of every front end (HTTP, gRPC, Realtime) ----

    def on_start(self, request_id: str, now: float) -> None:
        with self._lock:
            self._live[request_id] = _Timing(start=now, last=now)

    def on_output(self, output: RequestOutput, now: float) -> None:
        """TTFT on the first token, inter-token latency after, counters and end-to-end latency at the end."""
        with self._lock:
            timing = self._live.get(output.request_id)
            if timing is None:
                return
            sample = output.outputs[0]
            new = len(sample.token_ids) - timing.tokens
            if new > 0:
                if timing.tokens == 0:
                    self.ttft.observe(now - timing.start)
                else:  # tokens that came in one output share the gap
                    for _ in range(new):
                        self.itl.observe((now - timing.last) / new)
                timing.tokens, timing.last = len(sample.token_ids), now
            if output.finished or sample.finish_reason is not None:
                del self._live[output.request_id]
                self.prompt_tokens.inc(len(output.prompt_token_ids or ()))
                self.generation_tokens.inc(len(sample.token_ids))
                self.request_success.labels(finish_reason=str(sample.finish_reason or "unknown")).inc()
                self.e2e.observe(now - timing.start)

    def on_drop(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)


@dataclass
class _Timing:
    start: float
    last: float
    tokens: int = 0
