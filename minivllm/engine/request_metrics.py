"""What a request's client saw: when it arrived and when each output token became known on the
host, with what the engine did to it on the way (preemptions, prefix-cache hits)."""

import statistics
from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """One request's timings, in time.perf_counter() seconds, and its scheduling counts.

    Under async scheduling a token is known on the host one step after the device sampled it; the
    times here are when the host knew it, which is when a streaming client could have had it."""

    arrival_s: float = 0.0  # when generate() queued the request
    token_times_s: list[float] = field(default_factory=list)  # when each output token became known
    num_preemptions: int = 0  # times its KV was freed to make room, to be recomputed
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at its first admission

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival to the first output token (None before it)."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: the gap before each output token after the first."""
        return [b - a for a, b in zip(self.token_times_s, self.token_times_s[1:], strict=False)]


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ...} of `values` (inclusive method: p0 is the minimum and
    p100 the maximum); {} for no values."""
    if not values:
        return {}
    if len(values) == 1:
        return {f"p{q}": values[0] for q in qs}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{q}": cuts[q - 1] if q < 100 else max(values) for q in qs}
