"""``POST /webhooks/mlflow``: MLflow 3 model-registry webhooks wake the policies that watch the model.

How MLflow signs a delivery (``mlflow/webhooks/delivery.py`` and ``constants.py``, MLflow 3.3+; the Standard
Webhooks scheme): headers ``X-MLflow-Delivery-Id`` (a UUID), ``X-MLflow-Timestamp`` (Unix seconds) and
``X-MLflow-Signature`` = ``v1,`` + base64(HMAC-SHA256(secret, "<delivery id>.<timestamp>.<raw body>")). The body
is JSON ``{"entity", "action", "timestamp", "data"}``; ``data.name`` is the registered model.

:func:`verify` checks, in this order: all three headers present and a ``v1`` signature equal to ours (constant-time
compare) -> else ``bad_signature`` (401); the timestamp within ``tolerance`` seconds of now -> else ``stale``
(401); a delivery id not seen before -> else ``replay`` (409). An accepted delivery for a model no policy
watches, or an event other than those below, is ``ignored`` (200). The answer is sent at once: the policy's own
loop reads the registry and creates the conversion (:mod:`.policy_runner`).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from .metrics import Metrics

logger = logging.getLogger("reparam.operator.webhooks")

PATH = "/webhooks/mlflow"
HEADER_SIGNATURE = "X-MLflow-Signature"
HEADER_TIMESTAMP = "X-MLflow-Timestamp"
HEADER_DELIVERY_ID = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
#: The registry events that can select a new version (MLflow's ``WebhookEvent`` entity.action names).
EVENTS = ("model_version.created", "model_version_alias.created", "model_version_tag.set")
#: Largest body accepted (MLflow's payloads are a few hundred bytes).
MAX_BODY = 1 << 20


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature header value of a delivery (see the module docstring)."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class SeenDeliveries:
    """Delivery ids seen within the tolerance window (older ones fail the timestamp check anyway)."""

    def __init__(self, ttl: float, limit: int = 100_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, delivery_id: str, now: float) -> bool:
        """Remember ``delivery_id``; False when it was already there (a replay)."""
        while self._seen and (next(iter(self._seen.values())) < now - 2 * self.ttl or len(self._seen) > self.limit):
            self._seen.popitem(last=False)
        if delivery_id in self._seen:
            return False
        self._seen[delivery_id] = now
        return True


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float, tolerance: float,
           seen: SeenDeliveries) -> str | None:
    """Why the delivery is refused (``bad_signature``, ``stale``, ``replay``), or None when it is authentic and
    new (module docstring)."""
    delivery_id = headers.get(HEADER_DELIVERY_ID, "")
    timestamp = headers.get(HEADER_TIMESTAMP, "")
    given = headers.get(HEADER_SIGNATURE, "")
    if not (secret and delivery_id and timestamp and given):
        return "bad_signature"
    expected = signature(secret, delivery_id, timestamp, body)
    if not any(hmac.compare_digest(expected.encode(), part.strip().encode()) for part in given.split(" ")):
        return "bad_signature"
    try:
        age = now - int(timestamp)
    except ValueError:
        return "stale"
    if abs(age) > tolerance:
        return "stale"
    if not seen.add(delivery_id, now):
        return "replay"
    return None


_STATUS = {"bad_signature": 401, "stale": 401, "replay": 409, "malformed": 400}


def app(secret: str, tolerance: float, metrics: Metrics, trigger: Callable[[str], int],
        clock: Callable[[], float] = time.time) -> web.Application:
    """The aiohttp application serving :data:`PATH`; ``trigger(model)`` wakes the policies watching ``model``
    and returns how many it woke."""
    seen = SeenDeliveries(tolerance)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        problem = verify(secret, request.headers, body, clock(), tolerance, seen)
        result = problem or "accepted"
        model = ""
        if problem is None:
            try:
                payload: Any = json.loads(body)
                event = f"{payload['entity']}.{payload['action']}"
                model = str(payload["data"]["name"])
            except (ValueError, KeyError, TypeError):
                result = "malformed"
            else:
                if event not in EVENTS or trigger(model) == 0:
                    result = "ignored"
        metrics.webhook_deliveries_total.labels(result=result).inc()
        if result not in ("accepted", "ignored"):
            logger.warning("webhook delivery refused: %s", result)
        return web.json_response({"result": result}, status=_STATUS.get(result, 200))

    application = web.Application(client_max_size=MAX_BODY)
    application.router.add_post(PATH, handle)
    return application


async def serve(host: str, port: int, application: web.Application) -> web.AppRunner:
    """Start serving ``application`` on ``host:port``; the runner to ``cleanup()`` at shutdown."""
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
