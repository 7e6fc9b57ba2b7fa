"""The reconciler: what the kopf handlers do, as methods over plain dicts.

It owns the API client, the slot queue and the metrics; :mod:`.handlers` only
adapts kopf's calling convention to these methods. Every method is idempotent
(kmock replays all objects on each watch, a real cluster re-lists after a watch
ends), so running one twice changes nothing:

* :meth:`Reconciler.reconcile` (resource created, spec changed, operator resumed):
  validate, delete an older generation's running Job, then adopt the Job of this
  generation or create it when a slot is free, else mark the resource Queued;
* :meth:`Reconciler.job_event` (a labelled Job changed): read the Job and its pods,
  move the resource's status on (:mod:`.status`), free the slot when it ended and
  start whoever was waiting;
* :meth:`Reconciler.pod_event` (a labelled pod changed): map what the kubelet and the
  scheduler report (:func:`.termination.pod_problem`) to the status while the Job runs:
  an image that cannot be pulled or a pod unschedulable past its time-out fails the
  conversion and deletes the Job; a disruption or a failed attempt is noted as retried;
* :meth:`Reconciler.resource_gone` (resource deleted): free its slot or queue place and
  delete its Jobs with propagation ``Background`` (the GPU pod stops at once).

A Job with a Kueue queue (``spec.job.queueName`` or the operator's default) is created
suspended and takes no slot: Kueue's quota is the limit, and Kueue un-suspends it.

Status writes for one resource are serialised by a per-resource lock and always
computed from a fresh read, so a slow handler never overwrites a newer state.
"""

from __future__ import annotations

import asyncio
import datetime
import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import kopf

from . import events as events_mod, jobs, metrics as metrics_mod, status as st, termination
from .kube import ApiError, KubeClient
from .queue import SlotQueue
from .settings import Settings

logger = logging.getLogger("reparam.operator")

Key = tuple[str, str]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new`` (lists replace whole)."""
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before or key not in old:
            patch[key] = value
    return patch


class Reconciler:
    """Reconciles ModelConversions into Jobs; one per operator process."""

    def __init__(self, client: KubeClient, settings: Settings, metrics: metrics_mod.Metrics,
                 clock: Callable[[], datetime.datetime] = utcnow) -> None:
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.queue: SlotQueue[Key] = SlotQueue(settings.max_concurrent)
        self._locks: dict[Key, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting: set[Key] = set()
        self._limiter = events_mod.EventLimiter()
        self._rechecks: dict[str, asyncio.Task[None]] = {}

    # ----------------------------------------------------------------- helpers
    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _gauges(self) -> None:
        self.metrics.set_slots(self.queue.running, self.queue.waiting)

    def _watched(self, namespace: str) -> bool:
        if self.settings.clusterwide or not self.settings.namespaces:
            return True
        return any(fnmatch.fnmatchcase(namespace, pat) for pat in self.settings.namespaces)

    @staticmethod
    def _order(body: dict[str, Any]) -> tuple[str, str, str]:
        meta = body["metadata"]
        return (meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta["name"])

    async def _get_mc(self, key: Key) -> dict[str, Any] | None:
        return await self.client.get_conversion(*key)

    async def update_status(self, key: Key, compute: Callable[[dict[str, Any]], dict[str, Any]]
                            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """Under the resource's lock: read it, ``compute(body) -> new status``, patch the
        difference. Returns ``(old_status, new_status, body)``; body ``None`` if gone."""
        async with self._lock(key):
            body = await self._get_mc(key)
            if body is None:
                return {}, {}, None
            old = body.get("status") or {}
            new = compute(body)
            patch = merge_patch(old, new)
            if patch:
                try:
                    await self.client.patch_conversion_status(*key, {"status": patch})
                except ApiError as exc:
                    if exc.status != 404:
                        raise
            return old, new, body

    async def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the resource (rate-limited and redacted by :mod:`.events`; best effort:
        failures are logged)."""
        meta = body["metadata"]
        now = self.clock()
        if not self._limiter.allow(str(meta.get("uid") or meta["name"]), reason, message, now):
            return
        try:
            await self.client.create_event(meta["namespace"], events_mod.body(meta, type_, reason, message, now))
        except ApiError as exc:
            logger.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc)

    # ------------------------------------------------------------------ seeding
    async def seed(self) -> None:
        """Rebuild the slot queue after a (re)start, before any handler runs: Jobs that
        have not finished hold slots; unfinished resources without one wait in
        creation order."""
        namespaces: list[str | None]
        if self.settings.clusterwide or not self.settings.namespaces or any(
                set("*?[") & set(ns) for ns in self.settings.namespaces):
            namespaces = [None]
        else:
            namespaces = list(self.settings.namespaces)
        mcs: list[dict[str, Any]] = []
        job_list: list[dict[str, Any]] = []
        for ns in namespaces:
            mcs += await self.client.list_conversions(ns)
            job_list += await self.client.list_jobs(ns, {jobs.LABEL_MANAGED_BY: jobs.MANAGER})
        by_uid = {m["metadata"].get("uid"): m for m in mcs if self._watched(m["metadata"].get("namespace", ""))}
        for job in job_list:
            uid = (job["metadata"].get("labels") or {}).get(jobs.LABEL_UID)
            mc = by_uid.get(uid)
            if mc is None or jobs.generation_of(job) != int(mc["metadata"].get("generation") or 1):
                continue
            if jobs.kueue_managed(job):
                continue  # Kueue's quota, not a slot
            if st.read_job(job).state in ("pending", "running"):
                self.queue.occupy((mc["metadata"]["namespace"], mc["metadata"]["name"]))
        for mc in by_uid.values():
            meta = mc["metadata"]
            key = (meta["namespace"], meta["name"])
            gen = int(meta.get("generation") or 1)
            if self._queue_name(mc):
                continue
            if not st.is_terminal(mc.get("status") or {}, gen) and not self.queue.holds(key):
                self.queue.enqueue(key, self._order(mc))
        self._gauges()
        logger.info("seeded: %d conversions running, %d waiting", self.queue.running, self.queue.waiting)

    def _job_spec(self, body: dict[str, Any]) -> dict[str, Any]:
        """``spec.job`` with the operator's defaults filled in."""
        spec = jobs.with_defaults(body.get("spec") or {}, dict(self.settings.job_defaults))
        return dict(spec.get("job") or {})

    def _queue_name(self, body: dict[str, Any]) -> str:
        """The Kueue queue of the resource (``spec.job.queueName`` or the operator's default), ``""`` for none."""
        return jobs.queue_name(self._job_spec(body))

    # ----------------------------------------------------------------- reconcile
    async def reconcile(self, body: dict[str, Any]) -> None:
        """Ensure exactly one Job for the resource's current generation (see module doc).

        Raises :class:`kopf.PermanentError` for an invalid spec or a foreign Job in the
        way, :class:`kopf.TemporaryError` for transient API errors.
        """
        try:
            await self._reconcile(body)
        except ApiError as exc:
            if exc.status in (400, 422):
                await self._mark_invalid(body, f"the API rejected the Job: {exc.message}")
                raise kopf.PermanentError(f"the API rejected the Job: {exc.message}") from exc
            raise kopf.TemporaryError(f"Kubernetes API error, will retry: {exc}",
                                      delay=self.settings.retry_delay) from exc

    async def _mark_invalid(self, body: dict[str, Any], message: str) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        gen = int(meta.get("generation") or 1)
        old, new, cur = await self.update_status(key, lambda b: st.invalid(b.get("status") or {}, gen, message,
                                                                          self.clock()))
        released = self.queue.release(key)
        self._gauges()
        self._dispatch(released)
        if cur is not None and old.get("phase") != "Failed":
            await self.event(cur, "Warning", "InvalidSpec", message)
            self.metrics.conversions_total.labels(outcome="failed").inc()
            self.metrics.failure("InvalidSpec")

    async def _reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key: Key = (meta["namespace"], meta["name"])
        gen = int(meta.get("generation") or 1)
        if st.is_terminal(body.get("status") or {}, gen):
            if self.queue.holds(key) or self.queue.position(key):
                self._dispatch(self.queue.release(key))
                self._gauges()
            return
        try:
            jobs.validate_spec(jobs.with_defaults(body.get("spec") or {}, dict(self.settings.job_defaults)))
        except jobs.InvalidSpec as exc:
            await self._mark_invalid(body, str(exc))
            raise kopf.PermanentError(f"invalid spec: {exc}") from exc

        await self._delete_stale_jobs(body, gen)
        name = jobs.job_name(meta["name"], meta["uid"], gen)
        job = await self._read_job(meta["namespace"], name)
        if job is not None:
            await self._adopt(body, job)
            return
        if self._queue_name(body):
            # Kueue decides when it runs: no slot of ours (a spec change may have moved it onto a queue)
            if self.queue.holds(key) or self.queue.position(key):
                self._dispatch(self.queue.release(key))
                self._gauges()
            await self._create_job(body)
            return
        admitted = self.queue.request(key, self._order(body))
        self._gauges()
        self._dispatch([k for k in admitted if k != key])
        if self.queue.holds(key):
            await self._create_job(body)
            return
        position = self.queue.position(key) or 0
        old, _, cur = await self.update_status(key, lambda b: st.queued(
            b.get("status") or {}, gen, position, self.queue.running, self.queue.limit, self.clock()))
        if cur is not None and old.get("phase") != "Queued":
            await self.event(cur, "Normal", "Queued",
                             f"waiting for a free slot ({self.queue.running} of {self.queue.limit} running)")

    async def _read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get_job(namespace, name)

    async def _delete_stale_jobs(self, body: dict[str, Any], gen: int) -> None:
        if gen <= 1:
            return  # generation 1 has no older Jobs (a re-created resource has another uid)
        meta = body["metadata"]
        owned = await self.client.list_jobs(meta["namespace"], {jobs.LABEL_UID: meta["uid"]})
        for job in owned:
            jgen = jobs.generation_of(job)
            if jgen is None or jgen >= gen or st.read_job(job).state in ("complete", "failed"):
                continue
            if not await self.client.delete_job(meta["namespace"], job["metadata"]["name"], "Background"):
                continue
            await self.event(body, "Normal", "JobReplaced",
                             f"deleted Job {job['metadata']['name']} of generation {jgen}: the spec changed")

    async def _create_job(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        manifest = jobs.build_job(body, self.settings.image, dict(self.settings.job_defaults))
        name = manifest["metadata"]["name"]
        job: dict[str, Any] | None
        try:
            job = await self.client.create_job(meta["namespace"], manifest)
            created = True
        except ApiError as exc:
            if exc.status != 409:
                raise
            job = await self._read_job(meta["namespace"], name)
            if job is None:
                raise kopf.TemporaryError(f"Job {name} is being deleted; will retry",
                                          delay=self.settings.retry_delay) from exc
            created = False
        if not created:
            await self._adopt(body, job)
            return
        key = (meta["namespace"], meta["name"])
        gen = int(meta.get("generation") or 1)
        await self.update_status(key, lambda b: st.job_created(b.get("status") or {}, gen, name, self.clock()))
        queue = (manifest["metadata"].get("labels") or {}).get(jobs.LABEL_KUEUE_QUEUE)
        await self.event(body, "Normal", "JobCreated", f"created Job {name} for generation {gen}"
                         + (f", suspended until Kueue admits it (queue {queue})" if queue else ""))
        await self._observe(key, job)

    async def _adopt(self, body: dict[str, Any], job: dict[str, Any]) -> None:
        meta = body["metadata"]
        name = job["metadata"]["name"]
        if not jobs.owned_by(job, meta["uid"]):
            msg = (f"Job {name} exists but is not owned by this ModelConversion; "
                   "delete it or rename the resource")
            await self._mark_invalid(body, msg)
            raise kopf.PermanentError(msg)
        key = (meta["namespace"], meta["name"])
        if st.read_job(job).state in ("pending", "running") and not jobs.kueue_managed(job):
            self.queue.occupy(key)
            self._gauges()
        await self._observe(key, job)

    # ---------------------------------------------------------------- job events
    async def job_event(self, event_type: str, job: dict[str, Any]) -> None:
        """A labelled Job was added, modified or deleted: move the owner's status on."""
        jmeta = job.get("metadata") or {}
        owner = next((r for r in jmeta.get("ownerReferences") or []
                      if r.get("kind") == jobs.KIND and r.get("controller")), None)
        if owner is None or not self._watched(jmeta.get("namespace", "")):
            return
        key: Key = (jmeta["namespace"], owner["name"])
        try:
            if event_type == "DELETED":
                await self._job_deleted(key, job, owner["uid"])
            else:
                await self._observe(key, job)
        except ApiError as exc:
            # kopf does not retry event handlers: re-read the Job later ourselves, so a
            # transient error on the final event cannot leave the resource Running.
            if event_type != "DELETED":
                self._spawn(self._reobserve(key, jmeta["namespace"], jmeta["name"]))
            raise kopf.TemporaryError(f"Kubernetes API error, will re-read the Job: {exc}",
                                      delay=self.settings.retry_delay) from exc

    async def _reobserve(self, key: Key, namespace: str, job_name: str) -> None:
        delay = self.settings.retry_delay
        for _ in range(10):
            await asyncio.sleep(delay)
            try:
                job = await self._read_job(namespace, job_name)
                if job is not None:
                    await self._observe(key, job)
                return
            except ApiError as exc:
                logger.warning("re-reading Job %s/%s failed (%s); retrying in %.0fs", namespace, job_name,
                               exc, delay)
                delay = min(delay * 2, 300.0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _job_deleted(self, key: Key, job: dict[str, Any], uid: str) -> None:
        body = await self._get_mc(key)
        if body is None or body["metadata"].get("uid") != uid:
            self._dispatch(self.queue.release(key))
            self._gauges()
            return
        gen = int(body["metadata"].get("generation") or 1)
        if jobs.generation_of(job) == gen and not st.is_terminal(body.get("status") or {}, gen):
            # Our current Job vanished before it finished (deleted by hand): start it again.
            logger.info("Job %s of %s/%s was deleted before it finished; recreating", job["metadata"]["name"], *key)
            self.queue.release(key)
            await self.reconcile(body)

    async def _observe(self, key: Key, job: dict[str, Any]) -> None:
        view = st.read_job(job)
        pods: list[dict[str, Any]] = []
        if view.state in ("complete", "failed"):
            pods = await self.client.list_pods(key[0], {"batch.kubernetes.io/job-name": job["metadata"]["name"]})
            job_uid = job["metadata"].get("uid")
            if job_uid:
                pods = [p for p in pods if jobs.owned_by(p, job_uid)] or pods

        def compute(body: dict[str, Any]) -> dict[str, Any]:
            meta = body["metadata"]
            owner_uid = (job["metadata"].get("labels") or {}).get(jobs.LABEL_UID)
            if owner_uid != meta.get("uid"):
                return body.get("status") or {}
            return st.observe(body.get("status") or {}, body.get("spec") or {}, int(meta.get("generation") or 1),
                              job, pods, self.clock())

        old, new, body = await self.update_status(key, compute)
        if body is None:
            return
        gen = int(body["metadata"].get("generation") or 1)
        if jobs.generation_of(job) != gen:
            return
        if view.state in ("pending", "running") and not st.is_terminal(new, gen) and not jobs.kueue_managed(job):
            if not self.queue.holds(key):
                self.queue.occupy(key)
                self._gauges()
        await self._transitions(body, job, old, new)
        if st.is_terminal(new, gen):
            released = self.queue.release(key)
            self._gauges()
            self._dispatch(released)

    async def _transitions(self, body: dict[str, Any], job: dict[str, Any], old: dict[str, Any],
                           new: dict[str, Any]) -> None:
        before, after = old.get("phase"), new.get("phase")
        same_gen = old.get("observedGeneration") == new.get("observedGeneration")
        if before == after and same_gen:
            return
        now = self.clock()
        created = st.parse_time(job["metadata"].get("creationTimestamp"))
        jname = job["metadata"]["name"]
        was_waiting = (st.get_condition(old, "Succeeded") or {}).get("reason") == "WaitingForAdmission"
        if after == "Queued" and (st.get_condition(new, "Succeeded") or {}).get("reason") == "WaitingForAdmission":
            queue = (job["metadata"].get("labels") or {}).get(jobs.LABEL_KUEUE_QUEUE, "")
            await self.event(body, "Normal", "WaitingForAdmission",
                             f"Job {jname} waits for Kueue to admit it (queue {queue})")
            return
        if was_waiting and after != "Queued":
            await self.event(body, "Normal", "Admitted", f"Kueue admitted Job {jname}")
        if after == "Running":
            if created is not None:
                self.metrics.queue_seconds.observe(max(0.0, (now - created).total_seconds()))
            await self.event(body, "Normal", "Started", f"Job {jname} is running")
        elif after in st.TERMINAL:
            outcome = st.outcome(new) or "failed"
            self.metrics.conversions_total.labels(outcome=outcome).inc()
            end = st.parse_time((new.get("job") or {}).get("completionTime")) or now
            if created is not None:
                self.metrics.duration.labels(outcome=outcome).observe(max(0.0, (end - created).total_seconds()))
            self._registry_metrics(body, new)
            await self._stage_events(body, new)
            if outcome == "succeeded":
                self.metrics.last_success.set(now.timestamp())
                res = new.get("result") or {}
                self.metrics.record_result(res)
                msg = (f"registered {res.get('modelName')} version {res.get('version')}" if res.get("version")
                       else "converted and validated")
                await self.event(body, "Normal", "Succeeded", msg)
            else:
                fail = new.get("lastFailure") or {}
                self.metrics.failure(fail.get("reason"))
                await self.event(body, "Warning", fail.get("reason") or "Failed", fail.get("message") or "failed")

    async def _stage_events(self, body: dict[str, Any], new: dict[str, Any]) -> None:
        """One Normal Event per stage the ended conversion reached (Converted, Registered, Promoted)."""
        gen = new.get("observedGeneration")
        for type_ in ("Converted", "Registered", "Promoted"):
            c = st.get_condition(new, type_) or {}
            if c.get("status") == "True" and c.get("observedGeneration") == gen:
                await self.event(body, "Normal", type_, c.get("message") or type_)

    def _registry_metrics(self, body: dict[str, Any], new: dict[str, Any]) -> None:
        if not (body.get("spec") or {}).get("registry"):
            return
        reg = st.get_condition(new, "Registered") or {}
        if reg.get("status") == "True":
            self.metrics.registry_ops.labels(operation="register", result="success").inc()
        elif reg.get("reason") == "RegistryError":
            self.metrics.registry_ops.labels(operation="register", result="failure").inc()
        if not (body.get("spec") or {}).get("registry", {}).get("aliases"):
            return
        promo = st.get_condition(new, "Promoted") or {}
        if promo.get("status") == "True":
            self.metrics.registry_ops.labels(operation="promote", result="success").inc()
        elif reg.get("status") == "True":
            self.metrics.registry_ops.labels(operation="promote", result="failure").inc()

    # ------------------------------------------------------------------ deletion
    async def resource_gone(self, body: dict[str, Any]) -> None:
        """The resource was deleted: free its slot or queue place, and delete its Jobs with propagation
        ``Background`` so their pods stop now rather than when the garbage collector gets to them."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        released = self.queue.release(key)
        self._locks.pop(key, None)
        self._limiter.forget(str(meta.get("uid") or meta["name"]))
        self._gauges()
        self._dispatch(released)
        if meta.get("uid"):
            for job in await self.client.list_jobs(meta["namespace"], {jobs.LABEL_UID: meta["uid"]}):
                if st.read_job(job).state not in ("complete", "failed"):
                    await self.client.delete_job(meta["namespace"], job["metadata"]["name"], "Background")

    # ------------------------------------------------------------------ pod events
    async def pod_event(self, event_type: str, pod: dict[str, Any]) -> None:
        """A labelled converter pod changed: act on what :func:`.termination.pod_problem` finds.

        Pods are read through their Job (owner reference) and the Job's owner. Raises :class:`ApiError` for
        API errors (kopf logs them; the next pod event or the re-check retries).
        """
        if event_type == "DELETED":
            return
        pmeta = pod.get("metadata") or {}
        ns = pmeta.get("namespace") or ""
        owner = next((r for r in pmeta.get("ownerReferences") or [] if r.get("kind") == "Job"), None)
        if owner is None or not self._watched(ns):
            return
        # a first look with no time-out: most pods have nothing to report and cost no API call
        if termination.pod_problem(pod, jobs.CONTAINER, self.clock(), 1e9) is None:
            return
        job = await self._read_job(ns, owner["name"])
        if job is None or job["metadata"].get("uid") != owner.get("uid"):
            return
        if st.read_job(job).state in ("complete", "failed"):
            return  # the Job's own end decides (its event follows)
        mc_ref = next((r for r in job["metadata"].get("ownerReferences") or []
                       if r.get("kind") == jobs.KIND and r.get("controller")), None)
        if mc_ref is None:
            return
        key: Key = (ns, mc_ref["name"])
        body = await self._get_mc(key)
        if body is None or body["metadata"].get("uid") != mc_ref.get("uid"):
            return
        gen = int(body["metadata"].get("generation") or 1)
        if jobs.generation_of(job) != gen or st.is_terminal(body.get("status") or {}, gen):
            return
        timeout = jobs.schedule_timeout(self._job_spec(body), self.settings.schedule_timeout)
        problem = termination.pod_problem(pod, jobs.CONTAINER, self.clock(), timeout)
        if problem is None:
            return
        jname = job["metadata"]["name"]
        old, new, cur = await self.update_status(
            key, lambda b: st.pod_problem(b.get("status") or {}, gen, jname, problem, self.clock()))
        if cur is None:
            return
        if problem.action == "wait" and problem.due is not None:
            self._recheck(ns, pmeta.get("name", ""), pmeta.get("uid", ""), problem.due)
        if old == new:
            return
        if problem.action == "fail":
            await self.client.delete_job(ns, jname, "Background")
            await self._transitions(cur, job, old, new)
            self._dispatch(self.queue.release(key))
            self._gauges()
        elif problem.action == "retried":
            self.metrics.retry(problem.reason)
            await self.event(cur, "Warning", "Retried", f"{problem.reason}: {problem.message}")
        else:  # waiting: the final reason comes with the failure, if the time-out passes
            await self.event(cur, "Warning", "WaitingForNode", problem.message)

    def _recheck(self, namespace: str, pod_name: str, pod_uid: str, due: datetime.datetime) -> None:
        """Look at the pod again at ``due`` (a pod unschedulable the whole time sends no event)."""
        if not pod_uid or pod_uid in self._rechecks:
            return

        async def later() -> None:
            try:
                await asyncio.sleep(max(0.0, (due - self.clock()).total_seconds()) + 0.05)
                self._rechecks.pop(pod_uid, None)
                pod = await self.client.get_pod(namespace, pod_name)
                if pod is not None and (pod.get("metadata") or {}).get("uid") == pod_uid:
                    await self.pod_event("MODIFIED", pod)
            except ApiError as exc:
                logger.warning("re-checking pod %s/%s failed: %s", namespace, pod_name, exc)
            finally:
                if self._rechecks.get(pod_uid) is asyncio.current_task():
                    del self._rechecks[pod_uid]

        task = asyncio.get_running_loop().create_task(later())
        self._rechecks[pod_uid] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- dispatcher
    def _dispatch(self, keys: list[Key]) -> None:
        """Start the Jobs of resources just admitted to a slot, in the background,
        retrying transient errors with back-off until they start or are gone."""
        for key in keys:
            if key in self._starting:
                continue
            self._starting.add(key)
            self._spawn(self._start_admitted(key))

    async def _start_admitted(self, key: Key) -> None:
        delay = self.settings.retry_delay
        try:
            while True:
                try:
                    body = await self._get_mc(key)
                    if body is None:
                        self._dispatch(self.queue.release(key))
                        self._gauges()
                        return
                    await self.reconcile(body)
                    return
                except kopf.PermanentError as exc:
                    logger.warning("could not start %s/%s: %s", *key, exc)
                    return
                except (kopf.TemporaryError, ApiError) as exc:
                    logger.warning("could not start %s/%s yet (%s); retrying in %.0fs", *key, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 300.0)
        finally:
            self._starting.discard(key)

    async def close(self) -> None:
        """Cancel background starts and close the client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()
