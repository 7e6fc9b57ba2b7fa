"""The loop of one ``ModelConversionPolicy`` (a kopf daemon per policy): read the registry, create conversions,
keep the status and history.

Each pass (:meth:`PolicyRunner.run`):

1. parse the policy (:func:`.policy.parse_policy`); bad input -> ``Ready=False`` with the reason, nothing created;
2. read the source model's versions in a thread (:func:`.policy.read_registry`: MlflowClient is blocking, kopf's
   loop must not be); registry down -> ``RegistryReachable=False`` with the error, next try after a backoff
   (1, 2, 4 ... seconds, at most the interval); a missing registered model -> ``Ready=False``;
3. create the ``ModelConversion`` of each selected version that has none yet (oldest first); the name is
   deterministic, so 409 AlreadyExists is success (another replica, a webhook and a poll, a restart);
4. list the policy's conversions, delete finished ones beyond ``historyLimit`` and patch the status.

Between passes it sleeps ``interval`` plus up to 10 % jitter (so that many policies do not poll in step), or
until a webhook for its model (:meth:`PolicyRunner.trigger`) or a change of one of its conversions wakes it.

Versions at or below ``status.historyFloor`` (the newest version whose conversion history deleted) are not
converted again: otherwise a pruned conversion would be re-created at the next pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import random
from typing import Any

from . import events as events_mod, jobs, policy as pol, status as status_mod
from .kube import ApiError, KubeClient
from .metrics import Metrics

logger = logging.getLogger("reparam.operator.policy")

#: Fraction of the interval added at random to each sleep.
JITTER = 0.1
#: First backoff after a registry error (seconds; doubles up to the interval, at most :data:`BACKOFF_MAX`).
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
#: How many conversions ``status.conversions`` lists at most (the newest).
STATUS_HISTORY = 10


@dataclasses.dataclass
class _Watch:
    """One running policy loop: what wakes it and why."""

    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    reasons: set[str] = dataclasses.field(default_factory=set)
    model: str = ""
    floor: int = 0


class PolicyRunner:
    """All policy loops of this operator process; webhooks and conversion events reach them through it."""

    def __init__(self, client: KubeClient, metrics: Metrics, default_tracking_uri: str = "") -> None:
        self.client = client
        self.metrics = metrics
        self.default_tracking_uri = default_tracking_uri
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._limiter = events_mod.EventLimiter()
        # the conditions this runner last wrote per policy: a pass's ``body`` may predate the previous pass's patch,
        # and a merge patch replaces the whole list, so a list rebuilt from a stale body would drop a condition
        self._conditions: dict[tuple[str, str], list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ wake-ups
    def trigger(self, model: str) -> int:
        """Wake every policy whose source is ``model`` (a webhook delivery); how many were woken."""
        woken = 0
        for watch in self._watches.values():
            if watch.model == model:
                watch.reasons.add("webhook")
                watch.wake.set()
                woken += 1
        return woken

    def refresh(self, namespace: str, name: str, reason: str = "history") -> None:
        """Wake one policy: ``history`` (one of its conversions changed: status only) or ``spec`` (re-read)."""
        watch = self._watches.get((namespace, name))
        if watch is not None:
            watch.reasons.add(reason)
            watch.wake.set()

    # ----------------------------------------------------------------- the loop
    async def run(self, body: Any, stopped: Any) -> None:
        """Run the policy of ``body`` (kopf's live body) until ``stopped`` (kopf's daemon flag) is set."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        watch = self._watches.setdefault(key, _Watch())
        watch.floor = max(watch.floor, int((body.get("status") or {}).get("historyFloor") or 0))
        backoff = 0.0
        try:
            while not stopped:
                # take the wake-up reasons before the pass: a webhook that arrives during the pass (say, during a
                # history refresh) keeps the event set, so the next wait returns at once and nothing is lost
                reasons = set(watch.reasons)
                watch.reasons.clear()
                watch.wake.clear()
                trigger = "webhook" if "webhook" in reasons else "poll"
                try:
                    delay = await self._pass(_plain(body), watch, trigger, read=reasons != {"history"})
                except ApiError as err:  # the Kubernetes API, not the registry: retried the same way
                    logger.warning("policy %s/%s: %s", key[0], key[1], err)
                    delay = None
                if delay is None:  # registry error
                    backoff = min(max(BACKOFF_FIRST, backoff * 2), BACKOFF_MAX)
                    delay = min(backoff, max(BACKOFF_FIRST, self._interval(body)))
                else:
                    backoff = 0.0
                try:
                    await asyncio.wait_for(watch.wake.wait(), delay * (1 + random.uniform(0, JITTER)))
                except asyncio.TimeoutError:
                    pass
        finally:
            if self._watches.get(key) is watch:
                del self._watches[key]
                self._conditions.pop(key, None)

    def _interval(self, body: Any) -> float:
        try:
            return pol.parse_policy(_plain(body), self.default_tracking_uri).interval_s
        except pol.InvalidPolicy:
            return 60.0

    async def _pass(self, body: dict[str, Any], watch: _Watch, trigger: str, read: bool = True) -> float | None:
        """One pass; the seconds until the next (None after a registry error: the caller backs off)."""
        meta = body.get("metadata") or {}
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        current = body.get("status") or {}
        gen = int(meta.get("generation") or 1)
        uid = str(meta.get("uid") or name)
        now = datetime.datetime.now(datetime.timezone.utc)
        try:
            policy = pol.parse_policy(body, self.default_tracking_uri)
        except pol.InvalidPolicy as err:
            watch.model = ""
            await self._patch(ns, name, current, now, gen, uid=uid, ready=("False", err.reason, str(err)))
            return 60.0
        watch.model = policy.model
        patch: dict[str, Any] = {}
        if read:
            self.metrics.policy_registry_requests_total.inc()
            try:
                versions = await asyncio.to_thread(pol.read_registry, policy.tracking_uri, policy.model)
            except pol.RegistryUnreachable as err:
                self.metrics.policy_poll_errors_total.inc()
                await self._patch(ns, name, current, now, gen, uid=uid,
                                  reachable=("False", "RegistryUnreachable", str(err)),
                                  extra={"lastPollTime": status_mod.timestamp(now)})
                return None
            except pol.ModelNotFound as err:
                await self._patch(ns, name, current, now, gen, uid=uid,
                                  ready=("False", "RegisteredModelNotFound", str(err)),
                                  reachable=("True", "Reachable", "the registry answered"),
                                  extra={"lastPollTime": status_mod.timestamp(now)})
                return policy.interval_s
            patch["lastPollTime"] = status_mod.timestamp(now)
            ready_versions = [v.version for v in versions if v.status == pol.MLFLOW_READY]
            if ready_versions:
                patch["lastSeenVersion"] = str(max(ready_versions))
            existing = {e.version for e in pol.history(await self._conversions(policy))}
            for version in sorted(pol.select_versions(policy, versions)):
                if version in existing or version <= watch.floor:
                    continue
                problem = await self._create(policy, version, trigger)
                if problem is not None:
                    await self._patch(ns, name, current, now, gen, uid=uid,
                                      ready=("False", "InvalidTemplate", problem),
                                      reachable=("True", "Reachable", "the registry answered"), extra=patch)
                    return policy.interval_s
        entries = pol.history(await self._conversions(policy))
        for old in pol.expired(entries, policy.history_limit):
            await self.client.delete_conversion(ns, old.name)
            watch.floor = max(watch.floor, old.version)
        kept = [e for e in entries if e not in pol.expired(entries, policy.history_limit)]
        patch["conversions"] = [e.to_status() for e in kept[:STATUS_HISTORY]]
        if kept:
            patch["lastConversion"] = kept[0].name
            patch["lastOutcome"] = kept[0].phase
        if watch.floor:
            patch["historyFloor"] = watch.floor
        reachable = ("True", "Reachable", "the registry answered") if read else None
        await self._patch(ns, name, current, now, gen, uid=uid,
                          ready=("True", "Watching", f"watching {policy.model}"),
                          reachable=reachable, extra=patch)
        return policy.interval_s

    async def _conversions(self, policy: pol.Policy) -> list[dict[str, Any]]:
        items = await self.client.list_conversions_labelled(
            policy.namespace, {pol.LABEL_POLICY: jobs.label_value(policy.name)})
        # the label holds a shortened name; the owner reference says whose it is
        return [o for o in items if any(r.get("uid") == policy.uid
                                        for r in (o.get("metadata") or {}).get("ownerReferences") or [])]

    async def _event(self, meta: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a rate-limited, deduplicated Event about the policy (:mod:`.events`); failures are only logged."""
        now = datetime.datetime.now(datetime.timezone.utc)
        if not self._limiter.allow(str(meta.get("uid") or meta.get("name")), reason, message, now):
            return
        try:
            await self.client.create_event(str(meta["namespace"]), events_mod.body(meta, type_, reason, message, now,
                                                                                 kind=pol.KIND))
        except ApiError as err:
            logger.warning("policy %s/%s: event %s not posted: %s", meta.get("namespace"), meta.get("name"),
                           reason, err)

    async def _create(self, policy: pol.Policy, version: int, trigger: str) -> str | None:
        """Create the conversion of ``version``; None when it exists now, else why the API server refused it."""
        manifest = pol.build_conversion(policy, version, self.default_tracking_uri)
        try:
            await self.client.create_conversion(policy.namespace, manifest)
        except ApiError as err:
            if err.status == 409:
                return None
            if err.transient:
                raise
            return f"the API server refused {manifest['metadata']['name']}: {err.message}"[:1000]
        self.metrics.policy_conversions_total.labels(trigger=trigger).inc()
        await self._event({"name": policy.name, "namespace": policy.namespace, "uid": policy.uid}, "Normal",
                          "ConversionCreated", f"{manifest['metadata']['name']}: {policy.model} version {version} "
                          f"({trigger})")
        logger.info("policy %s/%s: created %s for %s version %d (%s)", policy.namespace, policy.name,
                    manifest["metadata"]["name"], policy.model, version, trigger)
        return None

    async def _patch(self, ns: str, name: str, current: dict[str, Any], now: datetime.datetime, generation: int,
                     ready: tuple[str, str, str] | None = None, reachable: tuple[str, str, str] | None = None,
                     extra: dict[str, Any] | None = None, uid: str = "") -> None:
        conditions: list[dict[str, Any]] = list(self._conditions.get((ns, name)) or current.get("conditions") or [])
        for type_, value in (("Ready", ready), ("RegistryReachable", reachable)):
            if value is not None:
                conditions = status_mod.set_condition(conditions, type_, value[0], value[1], value[2][:1000], now,
                                                      generation)
        patch = {**(extra or {}), "observedGeneration": generation}
        if ready is not None or reachable is not None:
            patch["conditions"] = self._conditions[(ns, name)] = conditions
        for value in (ready, reachable):
            if value is not None and value[0] == "False":
                await self._event({"name": name, "namespace": ns, "uid": uid or name}, "Warning",
                                  value[1], value[2])
        try:
            await self.client.patch_policy_status(ns, pol.PLURAL, name, {"status": patch})
        except ApiError as err:
            if err.status != 404:  # gone: the daemon stops next
                logger.warning("policy %s/%s: status patch failed: %s", ns, name, err)


def _plain(body: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(body).items()}
