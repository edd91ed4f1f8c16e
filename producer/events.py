"""Task events without texts: anyone subscribed to a fleet's events (Flower, `celery events`) sees ids, sizes and timings.

Celery's task events carry each task's arguments and result as reprs, so every subscriber would
read every job's query and passages. The client names its tasks' arguments by their sizes
(`describe`, given to Celery as `argsrepr`/`kwargsrepr`), and this dispatcher, used by every
app `producer.app.create_app` makes (producers and workers), replaces any other argument or
result text in a task event, unless RERANK_EVENT_TEXTS is on.
"""

from __future__ import annotations

import re
from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

HIDDEN = "<not shown: RERANK_EVENT_TEXTS is off>"
"""What an event shows in place of an argument or result that may hold text."""

_DESCRIBED = re.compile(r"^<[a-z0-9 ,:_.#-]{0,300}>$")
"""What `describe` writes: sizes and counts, never text."""

_SCORED = re.compile(r"'scored': (\d+)")


def describe(stage: str, request: dict[str, Any]) -> str:
    """An argument's repr for events: what it is and how large, never its text."""
    if "stored" in request:
        return f"<{stage}: stored in {request['stored'].get('key', '?')}>"
    parts = [f"query of {len(str(request.get('query', '')))} characters"]
    for field in ("candidates", "chunks", "passages", "candidate_ids"):
        if isinstance(request.get(field), list):
            parts.append(f"{len(request[field])} {field}")
    if isinstance(request.get("pool"), dict):
        parts.append(f"pool of {sum(request['pool'].get('counts') or [])} chunks")
    return f"<{stage}: {', '.join(parts)}>"


def textless(fields: dict[str, Any]) -> dict[str, Any]:
    """A task event's fields with every argument or result that may hold text replaced."""
    fields = dict(fields)
    for name in ("args", "kwargs"):
        if name in fields and not (isinstance(fields[name], str) and _DESCRIBED.match(fields[name])):
            fields[name] = HIDDEN
    if "result" in fields:
        scored = _SCORED.search(str(fields["result"])[:2000])
        fields["result"] = f"<scored {scored.group(1)}>" if scored else HIDDEN
    return fields


class TextlessDispatcher(EventDispatcher):
    """Celery's event dispatcher, sending task events through `textless` unless the app's settings allow texts."""

    def send(self, type: str, *args: Any, **fields: Any) -> Any:
        """Send (or buffer) an event, its texts replaced."""
        return super().send(type, *args, **(self._scrubbed(type, fields)))

    def publish(self, type: str, fields: dict[str, Any], producer: Any, *args: Any, **kwargs: Any) -> Any:
        """Publish an event (Celery's `task-sent` comes this way), its texts replaced."""
        return super().publish(type, self._scrubbed(type, fields), producer, *args, **kwargs)

    def _scrubbed(self, type: str, fields: dict[str, Any]) -> dict[str, Any]:
        from producer.app import settings_of

        return fields if not type.startswith("task-") or settings_of(self.app).event_texts else textless(fields)


class TextlessEvents(Events):
    """Celery's events, dispatched by `TextlessDispatcher`."""

    dispatcher_cls = "producer.events:TextlessDispatcher"
