"""Reading an engine's Prometheus text (``GET /metrics``) for the few gauges routing needs."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def gauges(text: str, names: set[str]) -> dict[str, float]:
    """The value of each wanted sample name, summed over its label sets (e.g. per model or
    per rank). Unknown or malformed lines are skipped, never raised: an engine's metrics are
    untrusted and advisory."""
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in names:
                    v = float(s.value)
                    if v == v:  # not NaN
                        out[s.name] = out.get(s.name, 0.0) + v
    except (ValueError, TypeError, IndexError):
        pass
    return out
