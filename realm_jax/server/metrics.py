"""``/metrics`` in the Prometheus text format (prometheus-client, one registry per server).

Counters: ``realm_requests_total{endpoint, status}`` (every HTTP answer of the generation
endpoints, errors included), ``realm_prompt_tokens_total`` and ``realm_generation_tokens_total``
(of completed responses, as their ``usage`` says), ``realm_cancelled_requests_total`` (clients
that went away), ``realm_direct_requests_total`` (answered by ``generate`` outside the engine
batch) and, read from the engine, ``realm_engine_requests_total`` (one per sample: a request
with ``n`` choices is ``n``) and ``realm_engine_prefill_calls_total``. Histograms: ``realm_time_to_first_token_seconds`` and
``realm_request_latency_seconds`` (server side, per response). Gauges read at scrape time from
the engine: ``realm_queue_length``, ``realm_running_requests``, ``realm_engine_tokens_per_second``,
``realm_slots``, ``realm_tenant_running_requests{tenant}``; and
``realm_http_requests_in_progress``. With a paged KV cache (``--block-size``), also
``realm_kv_blocks_in_use``, ``realm_kv_blocks_free`` and ``realm_engine_preemptions_total``, and
with prefix caching ``realm_prefix_cache_hit_rate`` (cached prompt tokens / prompt tokens).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine, tenants=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("realm_requests", "HTTP answers of the generation endpoints",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("realm_prompt_tokens", "prompt tokens of completed responses", registry=r)
        self.generation_tokens = Counter("realm_generation_tokens", "generated tokens of completed responses",
                                         registry=r)
        self.direct = Counter("realm_direct_requests", "requests answered by generate outside the engine batch "
                              "(echo with log-probs, best_of, more log-prob alternatives than the engine keeps)",
                              registry=r)
        self.cancelled = Counter("realm_cancelled_requests", "requests whose client went away", registry=r)
        self.ttft = Histogram("realm_time_to_first_token_seconds", "time to the first token", buckets=BUCKETS,
                              registry=r)
        self.latency = Histogram("realm_request_latency_seconds", "time to the whole response", buckets=BUCKETS,
                                 registry=r)
        self.in_progress = Gauge("realm_http_requests_in_progress", "generation requests being answered",
                                 registry=r)
        r.register(_EngineCollector(engine, tenants))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's own statistics, read at each scrape."""

    def __init__(self, engine, tenants=None):
        self.engine, self.tenants = engine, tenants

    def describe(self):
        return []

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (("realm_queue_length", "requests waiting for a slot", s.queue_length),
                                 ("realm_running_requests", "requests in a slot", s.active_slots),
                                 ("realm_slots", "the engine's slots", s.max_slots),
                                 ("realm_engine_tokens_per_second", "generated tokens per busy second",
                                  s.tokens_per_s)):
            yield GaugeMetricFamily(name, doc, value=float(value))
        yield CounterMetricFamily("realm_engine_requests", "requests submitted to the engine (one per sample)",
                                  value=s.submitted)
        yield CounterMetricFamily("realm_engine_prefill_calls", "the engine's prefill calls", value=s.prefill_calls)
        if self.engine.block_size is not None:
            yield GaugeMetricFamily("realm_kv_blocks_in_use", "paged KV blocks held by requests", value=s.blocks_in_use)
            yield GaugeMetricFamily("realm_kv_blocks_free", "paged KV blocks free", value=s.blocks_free)
            yield CounterMetricFamily("realm_engine_preemptions", "running requests preempted (recomputed later) "
                                      "because the paged KV pool ran short", value=s.preemptions)
        if self.engine.prefix_caching:
            yield GaugeMetricFamily("realm_prefix_cache_hit_rate", "cached prompt tokens / prompt tokens admitted",
                                    value=s.prefix_hit_rate or 0.0)
        if self.tenants is not None:
            g = GaugeMetricFamily("realm_tenant_running_requests", "requests a tenant has running", labels=["tenant"])
            for t in self.tenants.tenants.values():
                g.add_metric([t.name], float(t.running))
            yield g
