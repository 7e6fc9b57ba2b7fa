"""Kubernetes Events about a ``ModelConversion``: the body, a rate limit, and no credentials. Pure, no I/O.

``kubectl describe mconv NAME`` lists these Events, so they tell a conversion's story (Job created, queued,
admitted, running, converted, registered, promoted, failed with its reason, retried). Two rules from client-go's
event recorder (``tools/record``: ``EventSourceObjectSpamFilter`` and the correlator) keep them bounded:

* a token bucket per object: :data:`BURST` Events at once, then one per :data:`REFILL_SECONDS`;
* the same ``(reason, message)`` about the same object within :data:`DEDUPE_SECONDS` is posted once.

Messages pass :func:`reparam.store.uris.redact` (``user:pass@`` in URLs, presigned query parameters, key ids,
``secret=``/``token`` assignments), and are cut to :data:`MAX_MESSAGE` characters (the API's note limit is 1 kB).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from typing import Any

from ..store.uris import redact
from . import jobs

BURST = 25
REFILL_SECONDS = 300.0
DEDUPE_SECONDS = 600.0
MAX_MESSAGE = 1024
#: Objects whose buckets are remembered; the least recently used beyond this are forgotten.
MAX_OBJECTS = 4096


@dataclasses.dataclass
class _Bucket:
    tokens: float
    at: datetime.datetime
    recent: dict[tuple[str, str], datetime.datetime] = dataclasses.field(default_factory=dict)


class EventLimiter:
    """Decides whether an Event may be posted now (see the module doc for the two rules)."""

    def __init__(self, burst: int = BURST, refill_seconds: float = REFILL_SECONDS,
                 dedupe_seconds: float = DEDUPE_SECONDS) -> None:
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.dedupe_seconds = dedupe_seconds
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, uid: str, reason: str, message: str, now: datetime.datetime) -> bool:
        """Whether the Event ``(reason, message)`` about the object ``uid`` may be posted at ``now``;
        ``True`` takes a token and remembers the pair."""
        bucket = self._buckets.pop(uid, None) or _Bucket(float(self.burst), now)
        self._buckets[uid] = bucket  # most recently used last
        while len(self._buckets) > MAX_OBJECTS:
            del self._buckets[next(iter(self._buckets))]
        elapsed = max(0.0, (now - bucket.at).total_seconds())
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed / self.refill_seconds)
        bucket.at = now
        last = bucket.recent.get((reason, message))
        if last is not None and (now - last).total_seconds() < self.dedupe_seconds:
            return False
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        bucket.recent = {k: t for k, t in bucket.recent.items()
                         if (now - t).total_seconds() < self.dedupe_seconds}
        bucket.recent[(reason, message)] = now
        return True

    def forget(self, uid: str) -> None:
        """Drop what is known about ``uid`` (its resource was deleted)."""
        self._buckets.pop(uid, None)


def body(meta: dict[str, Any], type_: str, reason: str, message: str, now: datetime.datetime,
         kind: str = jobs.KIND) -> dict[str, Any]:
    """A ``core/v1`` Event about the ``ModelConversion`` (or another ``reparam.dev`` ``kind``: a
    ``ModelConversionPolicy``) with ``meta``; ``type_`` is ``Normal`` or ``Warning``.

    The name is ``<resource>.<hash>`` (client-go's ``<name>.<unique>``) derived from the uid, reason, message and
    time, so a retried POST of the same Event gets 409 rather than a duplicate.
    """
    text = redact(message)[:MAX_MESSAGE]
    stamp = now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hashlib.sha256(f"{meta.get('uid')}/{reason}/{text}/{now.isoformat()}".encode()).hexdigest()[:16]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name'][:200]}.{digest}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": jobs.API_VERSION, "kind": kind, "name": meta["name"],
            "namespace": meta["namespace"], "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_, "reason": reason, "message": text,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        "source": {"component": jobs.MANAGER},
        "reportingComponent": f"{jobs.GROUP}/operator", "reportingInstance": jobs.MANAGER,
    }
