"""The beat schedule, as data: task name to interval (seconds) and options."""
from __future__ import annotations

# Periodic work arrives with the features that need it (dispatching due webhook deliveries,
# re-enqueueing stale jobs); beat already runs in every Procfile so adding one is a line here.
BEAT_SCHEDULE: dict[str, dict] = {}
