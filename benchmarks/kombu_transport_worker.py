"""The benchmark worker on kombu's own Redis transport (BRPOP, then record): the baseline for benchmarks.take_overhead."""

from benchmarks.noop_worker import app, noop

app.conf.broker_transport = "redis"

__all__ = ["app", "noop"]
