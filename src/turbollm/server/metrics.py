"""GET /metrics: the engine's counters in Prometheus text format (prometheus-client), under
names like llama-server's (`llamacpp:prompt_tokens_total` -> `turbollm_prompt_tokens_total`).
A registry per app, read from the engine at scrape time, so nothing is double-counted."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine
        # a full slot: the cache of a request that fills the slot's context
        self.slot_bytes = engine.network.new_cache_plan(engine.slot_ctx, engine.model.cache).nbytes

    def collect(self):
        e, c = self.engine, self.engine.totals
        yield CounterMetricFamily("turbollm_prompt_tokens", "prompt tokens of all requests (prefilled or reused)", value=c.n_prompt)
        yield CounterMetricFamily("turbollm_prompt_tokens_cached", "prompt tokens reused from kept caches, not prefilled",
                                  value=c.n_cached)
        yield CounterMetricFamily("turbollm_prompt_cache_hits", "requests that reused a kept prefix", value=c.n_cache_hits)
        yield CounterMetricFamily("turbollm_generation_tokens", "tokens generated", value=c.n_generated)
        yield CounterMetricFamily("turbollm_prompt_seconds", "seconds spent in prefill", value=c.prompt_seconds)
        yield CounterMetricFamily("turbollm_decode_seconds", "seconds spent in decode steps", value=c.decode_seconds)
        yield CounterMetricFamily("turbollm_requests", "requests accepted", value=e.n_requests)
        finished = CounterMetricFamily("turbollm_requests_finished", "requests finished, by reason", labels=["reason"])
        for reason, n in sorted(e.n_finished.items()):
            finished.add_metric([reason], n)
        yield finished
        yield GaugeMetricFamily("turbollm_prompt_tokens_per_second", "average prefill throughput",
                                value=c.prompt_tokens_per_second)
        yield GaugeMetricFamily("turbollm_generation_tokens_per_second", "average decode throughput (all slots)",
                                value=c.n_decode_tokens / c.decode_seconds if c.decode_seconds else 0.0)
        spec = e.spec_totals()
        yield CounterMetricFamily("turbollm_draft_tokens", "speculative tokens drafted", value=spec.n_drafted)
        yield CounterMetricFamily("turbollm_draft_accepted_tokens", "speculative tokens accepted", value=spec.n_accepted)
        yield CounterMetricFamily("turbollm_draft_rounds", "speculative verify forwards", value=spec.n_rounds)
        yield GaugeMetricFamily("turbollm_draft_acceptance_ratio", "accepted / drafted tokens", value=spec.acceptance)
        yield GaugeMetricFamily("turbollm_requests_running", "requests in a slot", value=e.n_running)
        yield GaugeMetricFamily("turbollm_requests_waiting", "requests waiting for a slot", value=e.n_waiting)
        yield GaugeMetricFamily("turbollm_kv_cache_bytes", "KV cache bytes allocated to running requests", value=e.kv_bytes_in_use)
        yield GaugeMetricFamily("turbollm_kv_cache_usage_ratio", "KV cache bytes in use / bytes of all slots full",
                                value=e.kv_bytes_in_use / (self.slot_bytes * e.scheduler.n_slots) if self.slot_bytes else 0.0)


def registry(engine) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_EngineCollector(engine))
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST
