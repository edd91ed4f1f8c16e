"""The worker's app on kombu's own Redis transport, as workers before the atomic take ran: for the mixed-fleet test."""

from worker.app import app

app.conf.broker_transport = "redis"

__all__ = ["app"]
