"""Prometheus text for /metrics: engine gauges, latency histograms, token and request counters."""
import bisect
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
PREFIX = "lanner:"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = PREFIX + name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


def scalar(kind: str, name: str, help: str, value, labels: str = "") -> list[str]:
    return [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name}{labels} {value}"]


class ServerMetrics:
    """Observed on the event loop (AsyncEngine.deliver and the routes); rendered with engine.stats()."""

    def __init__(self):
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request arrival to its first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive output tokens of a sequence.",
                             ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             E2E_BUCKETS)
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = Counter()          # finish_reason -> sequences
        self.rejected = Counter()          # reason -> requests refused before reaching the engine
        self.aborted = 0                   # engine requests whose client went away before they finished

    def render(self, stats: dict) -> str:
        drafted = stats.get("spec_drafted_tokens", 0)
        acceptance = stats.get("spec_accepted_tokens", 0) / drafted if drafted else 0.0
        total = stats["kv_blocks_total"]
        lines = (
            scalar("gauge", "num_requests_running", "Sequences in the running batch.", stats["running"])
            + scalar("gauge", "num_requests_waiting", "Sequences waiting to be scheduled.", stats["waiting"])
            + scalar("gauge", "kv_cache_blocks_used", "KV cache blocks held by sequences.", stats["kv_blocks_used"])
            + scalar("gauge", "kv_cache_blocks_total", "KV cache blocks in the pool.", total)
            + scalar("gauge", "kv_cache_usage_perc", "Fraction of KV cache blocks in use.",
                     stats["kv_blocks_used"] / total if total else 0.0)
            + scalar("gauge", "prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / looked up.",
                     stats["prefix_cache_hit_rate"])
            + scalar("gauge", "spec_decode_acceptance_rate", "Accepted / drafted speculative tokens (0 without "
                     "speculation).", acceptance)
            + scalar("counter", "spec_decode_draft_tokens_total", "Draft tokens proposed.", drafted)
            + scalar("counter", "spec_decode_accepted_tokens_total", "Draft tokens accepted.",
                     stats.get("spec_accepted_tokens", 0))
            + scalar("counter", "num_preemptions_total", "Sequences preempted for KV memory.", stats["preemptions"])
            + scalar("counter", "prompt_tokens_total", "Prompt tokens of admitted requests.", self.prompt_tokens)
            + scalar("counter", "generation_tokens_total", "Output tokens delivered to requests.",
                     self.generation_tokens)
            + scalar("counter", "request_aborted_total", "Requests aborted because their client went away.",
                     self.aborted))
        lines += [f"# HELP {PREFIX}request_success_total Finished sequences by finish reason.",
                  f"# TYPE {PREFIX}request_success_total counter"]
        lines += [f'{PREFIX}request_success_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        lines += [f"# HELP {PREFIX}request_rejected_total Requests refused before reaching the engine.",
                  f"# TYPE {PREFIX}request_rejected_total counter"]
        lines += [f'{PREFIX}request_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        lines += replica_lines(stats.get("replicas", []))
        return "\n".join(lines) + "\n"


REPLICA_SERIES = (("gauge", "replica_alive", "1 while the data-parallel replica serves.", lambda r: int(r["alive"])),
                  ("counter", "replica_restarts_total", "Times the replica was started again after it died.",
                   lambda r: r["restarts"]),
                  ("counter", "replica_requests_total", "Requests routed to the replica.", lambda r: r["requests"]),
                  ("gauge", "replica_outstanding_tokens", "Prompt + max output tokens of its unfinished requests.",
                   lambda r: r["outstanding_tokens"]),
                  ("gauge", "replica_prefix_cache_hit_rate", "The replica's prompt tokens served from its prefix "
                   "cache / looked up.", lambda r: r["prefix_cache_hit_rate"]))


def replica_lines(replicas: list[dict]) -> list[str]:
    """Per data-parallel replica series, labelled replica="id" (none with one in-process engine)."""
    lines = []
    for kind, name, help, value in REPLICA_SERIES if replicas else ():
        lines += [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} {kind}"]
        lines += [f'{PREFIX}{name}{{replica="{r["id"]}"}} {value(r)}' for r in replicas]
    return lines
