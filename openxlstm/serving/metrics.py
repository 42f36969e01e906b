"""The counters behind ``GET /metrics``, written in Prometheus' text exposition format (version 0.0.4).

The engine's thread adds tokens and time-to-first-token observations, the server's event loop counts
answered requests; one lock keeps the numbers consistent. Gauges of the batch (waiting, running, free slots)
are read from the engine when the page is rendered.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Optional

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0  # generation tokens per second over this many seconds


def resident_memory_bytes() -> Optional[int]:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    """Request counts by endpoint and status, prompt and generated tokens, the generation rate over the last
    ``RATE_WINDOW_S`` seconds and a histogram of the time to first token."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._recent: collections.deque = collections.deque()  # (time, tokens) of recent decode steps
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def add_generated_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            self._trim(now)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            for j, edge in enumerate(TTFT_BUCKETS):
                if seconds <= edge:
                    self.ttft_counts[j] += 1
            self.ttft_sum += seconds
            self.ttft_count += 1

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, load: dict, slots: int, pool_bytes: int) -> str:
        """The text page; ``load``: ``Engine.load()``."""
        rate = self.tokens_per_second()
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value}")

        with self._lock:
            requests = sorted(self.requests.items())
            metric("openxlstm_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests])
            metric("openxlstm_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)])
            metric("openxlstm_generation_tokens_total", "counter", "Tokens generated.",
                   [("", self.generation_tokens)])
            buckets = [(f'{{le="{edge:g}"}}', n) for edge, n in zip(TTFT_BUCKETS, self.ttft_counts)]
            buckets.append(('{le="+Inf"}', self.ttft_count))
            lines.append("# HELP openxlstm_time_to_first_token_seconds Time from a request's arrival to its first "
                         "token.")
            lines.append("# TYPE openxlstm_time_to_first_token_seconds histogram")
            lines += [f"openxlstm_time_to_first_token_seconds_bucket{lab} {n}" for lab, n in buckets]
            lines.append(f"openxlstm_time_to_first_token_seconds_sum {self.ttft_sum:.6f}")
            lines.append(f"openxlstm_time_to_first_token_seconds_count {self.ttft_count}")
        metric("openxlstm_generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", [("", f"{rate:.3f}")])
        metric("openxlstm_requests_waiting", "gauge", "Requests waiting for a slot.", [("", load["waiting"])])
        metric("openxlstm_requests_prefilling", "gauge", "Requests whose prompt is being prefilled.",
               [("", load["prefilling"])])
        metric("openxlstm_sequences_running", "gauge", "Choices being decoded: the running batch.",
               [("", load["running"])])
        metric("openxlstm_slots_free", "gauge", "Free slots of the state pool.", [("", load["free_slots"])])
        metric("openxlstm_slots_total", "gauge", "Slots of the state pool (--max-batch-size).", [("", slots)])
        metric("openxlstm_state_pool_bytes", "gauge", "Memory of the preallocated state pool.", [("", pool_bytes)])
        rss = resident_memory_bytes()
        if rss is not None:
            metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [("", rss)])
        return "\n".join(lines) + "\n"


__all__ = ["Metrics", "TTFT_BUCKETS", "resident_memory_bytes"]
