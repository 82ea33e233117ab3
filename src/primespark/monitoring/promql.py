"""PromQL built from the metric registry: a selector names a registered metric and only labels it has, so a
renamed metric or label breaks the generator (and its tests) rather than leaving a rule that matches nothing."""

from __future__ import annotations

import re

from primespark.monitoring.metrics import REGISTRY, TARGET_LABELS, Metric

_UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_PART = re.compile(r"([0-9]+)(ms|y|w|d|h|m|s)")
Matcher = str | tuple[str, str]  # "value" (=), or (operator, value) with operator one of = != =~ !~


def selector(metric: Metric, **matchers: Matcher) -> str:
    """`name{label="value",…}`; a matcher given as a tuple picks the operator: `fstype=("!=", "")`."""
    if REGISTRY.get(metric.name) is not metric:
        raise KeyError(f"{metric.name} is not in the metric registry (primespark.monitoring.metrics)")
    parts = []
    for label, matcher in matchers.items():
        if label not in metric.labels and label not in TARGET_LABELS:
            raise KeyError(f"{metric.name} has no label {label!r} (it has {', '.join(metric.labels) or 'none'})")
        operator, value = matcher if isinstance(matcher, tuple) else ("=", matcher)
        if operator not in ("=", "!=", "=~", "!~"):
            raise ValueError(f"not a PromQL matcher: {operator!r}")
        parts.append(f"{label}{operator}{quote(value)}")
    return f"{metric.name}{{{','.join(parts)}}}" if parts else metric.name


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def seconds(duration: str) -> float:
    """A Prometheus duration (`1h30m`, `0s`) in seconds."""
    if duration == "0":
        return 0.0
    parts = _PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def duration(total_seconds: float) -> str:
    """Seconds as the shortest Prometheus duration (whole seconds; `0s` for zero)."""
    rest = round(total_seconds)
    if rest <= 0:
        return "0s"
    out = ""
    for unit in ("d", "h", "m", "s"):
        count, rest = divmod(rest, int(_UNITS[unit]))
        if count:
            out += f"{count}{unit}"
    return out
