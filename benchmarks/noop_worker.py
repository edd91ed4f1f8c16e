"""The worker's app plus a no-op task, so the benchmark can time Celery's own round trip beside ours."""

from worker.app import app

__all__ = ["app", "noop"]


@app.task(name="bench.noop")
def noop(value: int) -> int:
    """Return `value`: a task with no work, for the floor of the queue's latency."""
    return value
