"""Prometheus metrics for the server, in the text exposition format (version 0.0.4), without the
prometheus_client package: counters, gauges and histograms with labels, thread-safe, rendered on
GET /metrics.

    # HELP minillm_requests_total HTTP requests answered, by route and status code.
    # TYPE minillm_requests_total counter
    minillm_requests_total{route="/v1/completions",status="200"} 12
    # TYPE minillm_request_duration_seconds histogram
    minillm_request_duration_seconds_bucket{route="/v1/completions",le="0.1"} 3
    ...
    minillm_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"} 12
    minillm_request_duration_seconds_sum{route="/v1/completions"} 4.83
    minillm_request_duration_seconds_count{route="/v1/completions"} 12

Histogram buckets are cumulative (each counts the observations <= its bound), as Prometheus expects,
so `histogram_quantile()` works on them. Label values are escaped (backslash, quote, newline). Route
labels come from a fixed list (anything else is "other"), so a client cannot grow the label set.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metric:
    """A named family of samples keyed by label values."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0}  # an unlabelled metric reads 0 from the start

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Counter(Metric):
    kind = "counter"

    def inc(self, amount: float = 1, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount


class Gauge(Metric):
    """A value that goes up and down; `source` (optional) is read at render time instead."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), source: Callable[[], float] | None = None):
        super().__init__(name, help, labels)
        self.source = source

    def add(self, amount: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def render(self) -> list[str]:
        if self.source is not None:
            with self._lock:
                self._values[()] = self.source()
        return super().render()


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [per-bucket counts (+Inf last), sum]

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts, _ = series = self._series.setdefault(labels, [[0] * (len(self.buckets) + 1), 0.0])
            counts[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket whose bound >= value
            series[1] += value

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._series.items())
        lines = self.header()
        for key, (counts, total) in items:
            running = 0
            for bound, count in zip([*map(_number, self.buckets), "+Inf"], counts):
                running += count
                lines.append(f"{self.name}_bucket{_labels((*self.label_names, 'le'), (*key, bound))} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class ServerMetrics:
    """Every metric the server exposes; `engine_stats` gives the batch's live numbers."""

    def __init__(self, engine_stats: Callable[[], dict[str, int]]):
        self.requests = Counter("minillm_requests_total", "HTTP requests answered, by route and status code.",
                                ("route", "status"))
        self.prompt_tokens = Counter("minillm_prompt_tokens_total", "Prompt tokens read by generation requests.")
        self.completion_tokens = Counter("minillm_completion_tokens_total", "Tokens generated.")
        self.ttft = Histogram("minillm_time_to_first_token_seconds",
                              "Seconds from a generation request's arrival to its first generated token.", ("route",))
        self.latency = Histogram("minillm_request_duration_seconds", "Seconds from a request's arrival to its "
                                 "last byte, by route.", ("route",))
        self.in_flight = Gauge("minillm_requests_in_flight", "Requests being answered now.")
        self.slots_busy = Gauge("minillm_batch_slots_busy", "KV-cache rows generating now.",
                                source=lambda: engine_stats()["busy"])
        self.slots = Gauge("minillm_batch_slots", "KV-cache rows in all (max_batch).",
                           source=lambda: engine_stats()["slots"])
        self.waiting = Gauge("minillm_requests_waiting", "Requests waiting for a free row.",
                             source=lambda: engine_stats()["waiting"])
        self.all = [self.requests, self.prompt_tokens, self.completion_tokens, self.ttft, self.latency,
                    self.in_flight, self.slots_busy, self.slots, self.waiting]

    def render(self) -> str:
        return "\n".join(line for metric in self.all for line in metric.render()) + "\n"
