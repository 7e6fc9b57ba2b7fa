"""A test Job runner playing the Job controller and the kubelet against :mod:`kube_env`.

For each Job it finds in the emulator it does what a cluster would, over the
HTTP API: create a pod from the Job's template (owner reference, ``job-name``
labels), mark it running, run the container, write the container's termination
state (exit code, termination message) into the pod's ``containerStatuses``, then
write the Job's ``status`` and conditions following the Job API: ``Complete`` on
exit 0, ``FailureTarget`` + ``Failed`` (reason ``PodFailurePolicy``) when the
``podFailurePolicy`` matches the exit code, retries up to ``backoffLimit`` else
(``BackoffLimitExceeded``). Deleting the Job stops its run.

The container is run by a pluggable *executor*: ``await executor(run)`` with a
:class:`ContainerRun` (the Job's exact container command, its environment with
Secret references resolved, and the emptyDir / termination paths mapped to a temp
dir) returning ``(exit_code, logs)``. :class:`SubprocessExecutor` runs the command
as a local process (``reparam`` -> ``[sys.executable, "-m", "reparam.cli"]``).
:class:`Gate` wraps an executor to hold runs until a test releases them.

Failure modes of a real cluster are played per pod by *fates* (``JobRunner(fates={conversion: [fate, ...]})``,
keyed by the ``ModelConversion``'s name, one fate per pod in order; then the container runs):

* ``"oom"``: the container is killed by the OOM killer (``terminated.reason: OOMKilled``, exit 137): a failed
  attempt, counted against ``backoffLimit`` like the kubelet reports it;
* ``"image-pull"``: the kubelet cannot pull the image: the container waits with ``ErrImagePull`` then
  ``ImagePullBackOff`` (message as the kubelet's) and never starts;
* ``"unschedulable"``: the scheduler finds no node: ``PodScheduled=False``, reason ``Unschedulable``, message
  :data:`NO_GPU`; the pod stays Pending;
* ``"preempted"``: the pod runs, then the scheduler preempts it: ``DisruptionTarget=True`` (reason
  ``PreemptionByScheduler``), the container ends with SIGTERM (143), the pod fails; the ``podFailurePolicy``
  rule ``Ignore`` on ``DisruptionTarget`` makes the Job controller retry it without counting it;
* ``"hang"``: the container runs until it is killed;
* ``"run"``: the container runs as without a fate (to give a later pod a fate).

The Job controller's ``activeDeadlineSeconds`` is played for every Job (the pod is killed, the Job fails with
``DeadlineExceeded``). Kueue is played for a Job created suspended with the ``kueue.x-k8s.io/queue-name`` label:
after ``kueue_delay`` seconds (``None``: never) the runner admits it by setting ``spec.suspend: false``, as Kueue's
controller does; ``suspended_seen`` records every Job the runner saw suspended, and ``unsuspended_by_others``
every one that was un-suspended before the runner's Kueue admitted it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import secrets as pysecrets
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kube_env import SECRETS, KubeEnv, now_iso

from reparam.operator import jobs as jobs_mod


@dataclasses.dataclass
class ContainerRun:
    """One container start: what a kubelet would hand to the runtime."""

    namespace: str
    job_name: str
    pod_name: str
    command: list[str]
    env: dict[str, str]
    workdir: Path
    termination_path: Path


Executor = Callable[[ContainerRun], Awaitable[tuple[int, str]]]

#: The scheduler's message for a GPU pod that fits no node (format of kube-scheduler's FitError).
NO_GPU = "0/5 nodes are available: 5 Insufficient nvidia.com/gpu. preemption: 0/5 nodes are available: " \
         "5 No preemption victims found for incoming pod."
FATES = ("run", "oom", "image-pull", "unschedulable", "preempted", "hang")


class SubprocessExecutor:
    """Runs the container command as a local process.

    ``entrypoints`` maps the command's first word to a local argv prefix, e.g.
    ``{"reparam": [sys.executable, "-m", "reparam.cli"]}``; ``base_env`` is the
    process environment under the container's variables.
    """

    def __init__(self, entrypoints: dict[str, list[str]], base_env: dict[str, str] | None = None) -> None:
        self.entrypoints = entrypoints
        self.base_env = dict(base_env if base_env is not None else os.environ)
        self.runs: list[ContainerRun] = []

    async def __call__(self, run: ContainerRun) -> tuple[int, str]:
        self.runs.append(run)
        argv = list(run.command)
        if argv and argv[0] in self.entrypoints:
            argv = self.entrypoints[argv[0]] + argv[1:]
        env = dict(self.base_env)
        env.update(run.env)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=str(run.workdir), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        return int(proc.returncode or 0), out.decode(errors="replace")


class Gate:
    """Holds every container start until :meth:`open` names its Job (or :meth:`open_all`)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self._events: dict[str, asyncio.Event] = {}
        self._all = False
        self.waiting: list[str] = []

    def _event(self, job_name: str) -> asyncio.Event:
        if job_name not in self._events:
            self._events[job_name] = asyncio.Event()
            if self._all:
                self._events[job_name].set()
        return self._events[job_name]

    async def __call__(self, run: ContainerRun) -> tuple[int, str]:
        self.waiting.append(run.job_name)
        try:
            await self._event(run.job_name).wait()
        finally:
            self.waiting.remove(run.job_name)
        return await self.inner(run)

    def open(self, job_name: str) -> None:  # call in the env loop
        self._event(job_name).set()

    def open_all(self) -> None:  # call in the env loop
        self._all = True
        for ev in self._events.values():
            ev.set()


async def instant_success(run: ContainerRun) -> tuple[int, str]:
    """An executor for the scale bench: the container exits 0 at once with a summary."""
    from reparam import summary
    run.termination_path.write_text(summary.dumps({"outcome": "succeeded", "exitCode": 0}))
    return 0, ""


class JobRunner:
    """Finds Jobs in ``env`` and runs them (see module docstring). Start with
    :meth:`start` (from the test thread); :meth:`stop` cancels everything."""

    def __init__(self, env: KubeEnv, executor: Executor, namespace: str | None = None, poll: float = 0.02,
                 fates: dict[str, list[str]] | None = None, kueue_delay: float | None = 1.0) -> None:
        for fate in [f for fs in (fates or {}).values() for f in fs]:
            if fate not in FATES:
                raise ValueError(f"unknown fate {fate!r}; one of {FATES}")
        self.fates = {k: list(v) for k, v in (fates or {}).items()}
        self.kueue_delay = kueue_delay
        self.suspended_seen: list[str] = []
        self.unsuspended_by_others: list[str] = []
        self._admitted: set[str] = set()
        self.env = env
        self.namespace = namespace
        self.executor = executor
        self.poll = poll
        self._seen: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._main: asyncio.Task[None] | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="reparam-jobrunner-"))
        self.errors: list[str] = []
        self.pods_created = 0

    def start(self) -> "JobRunner":
        async def go() -> None:
            self._main = asyncio.get_running_loop().create_task(self._loop())
        self.env.call(go())
        return self

    def stop(self) -> None:
        async def halt() -> None:
            tasks = list(self._tasks.values()) + ([self._main] if self._main else [])
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.env.call(halt())
        shutil.rmtree(self._tmp, ignore_errors=True)

    async def _loop(self) -> None:
        emu = self.env.emulator
        assert emu is not None
        while True:
            live: set[str] = set()
            for (res, ns, _name), obj in list(emu.objects.items()):
                if res.plural != "jobs" or res.group != "batch" or obj.deleted or (
                        self.namespace is not None and ns != self.namespace):
                    continue
                raw = obj.raw
                finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                               for c in (raw.get("status") or {}).get("conditions") or [])
                if finished:  # the Job controller never restarts a finished Job
                    continue
                uid = raw["metadata"]["uid"]
                live.add(uid)
                if uid not in self._seen:
                    self._seen.add(uid)
                    self._tasks[uid] = asyncio.get_running_loop().create_task(self._run_job(raw))
            for uid in list(self._tasks):
                task = self._tasks[uid]
                if task.done():
                    del self._tasks[uid]
                elif uid not in live:  # Job deleted: its pod is killed
                    task.cancel()
            await asyncio.sleep(self.poll)

    async def _api(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.env.arequest(method, path, body)
        if status >= 400:
            raise LookupError(f"{method} {path}: {status} {data}")
        return data

    def _secret(self, ns: str, name: str) -> dict[str, str] | None:
        emu = self.env.emulator
        assert emu is not None
        key = (SECRETS, ns, name)
        if key not in emu.objects or emu.objects[key].deleted:
            return None
        raw = emu.objects[key].raw
        out = {k: base64.b64decode(v).decode() for k, v in (raw.get("data") or {}).items()}
        out.update(raw.get("stringData") or {})
        return out

    def _container_env(self, ns: str, c: dict[str, Any], mapping: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            ref = src.get("secretRef")
            if ref:
                data = self._secret(ns, ref["name"])
                if data is None and not ref.get("optional"):
                    raise LookupError(f"secret {ref['name']} not found")  # CreateContainerConfigError
                for k, v in (data or {}).items():
                    env[(src.get("prefix") or "") + k] = v
        for item in c.get("env") or []:
            if "value" in item:
                env[item["name"]] = _map(item["value"], mapping)
            elif "valueFrom" in item and "secretKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["secretKeyRef"]
                data = self._secret(ns, ref["name"]) or {}
                if ref["key"] in data:
                    env[item["name"]] = data[ref["key"]]
        return env

    async def _run_job(self, job: dict[str, Any]) -> None:
        try:
            await self._run_job_inner(job)
        except asyncio.CancelledError:
            raise
        except LookupError as exc:  # the Job or pod vanished mid-way: nothing to report
            self.errors.append(str(exc))
        except Exception as exc:  # pragma: no cover - surfaced by tests through .errors
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _current(self, ns: str, name: str) -> dict[str, Any] | None:
        emu = self.env.emulator
        assert emu is not None
        for (res, obj_ns, obj_name), obj in list(emu.objects.items()):
            if res.plural == "jobs" and res.group == "batch" and obj_ns == ns and obj_name == name and not obj.deleted:
                return obj.raw
        return None

    async def _kueue(self, ns: str, name: str) -> None:
        """Kueue: admit a suspended, queue-labelled Job by un-suspending it after ``kueue_delay`` seconds."""
        if self.kueue_delay is None:
            return
        await asyncio.sleep(self.kueue_delay)
        current = self._current(ns, name)
        if current is None:
            return
        self._admitted.add(name)
        await self._api("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}", {"spec": {"suspend": False}})

    async def _wait_admitted(self, job: dict[str, Any]) -> None:
        """Play the Job controller for a suspended Job: no pod until ``spec.suspend`` is false."""
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if not (job.get("spec") or {}).get("suspend"):
            return
        self.suspended_seen.append(name)
        jpath = f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"
        await self._api("PATCH", jpath + "/status", {"status": {"conditions": [
            {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended",
             "lastTransitionTime": now_iso()}]}})
        if (meta.get("labels") or {}).get("kueue.x-k8s.io/queue-name"):
            asyncio.get_running_loop().create_task(self._kueue(ns, name))
        while True:
            await asyncio.sleep(self.poll)
            current = self._current(ns, name)
            if current is None:
                raise LookupError(f"Job {ns}/{name} deleted while suspended")
            if not (current.get("spec") or {}).get("suspend"):
                if name not in self._admitted:
                    self.unsuspended_by_others.append(name)
                await self._api("PATCH", jpath + "/status", {"status": {"conditions": [
                    {"type": "Suspended", "status": "False", "reason": "JobResumed", "message": "Job resumed",
                     "lastTransitionTime": now_iso()}]}})
                return

    async def _fail_job(self, jpath: str, reason: str, msg: str, failed: int, at: str) -> None:
        await self._api("PATCH", jpath + "/status", {"status": {
            "active": 0, "ready": 0, "failed": failed, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "message": msg,
                 "lastTransitionTime": at},
                {"type": "Failed", "status": "True", "reason": reason, "message": msg,
                 "lastTransitionTime": at}]}})

    async def _fate(self, fate: str, ppath: str, pod_name: str, container: dict[str, Any], jpath: str,
                    started: str) -> tuple[int, str, str, list[dict[str, Any]]] | None:
        """Play ``fate`` on a created pod. Returns the container's end ``(exit code, reason, message, pod
        conditions)`` for a pod that ended, or never returns (the pod stays stuck until its Job goes)."""
        cname, image = container["name"], container.get("image", "")
        if fate == "unschedulable":
            await self._api("PATCH", f"{ppath}/{pod_name}/status", {"status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": NO_GPU,
                 "lastTransitionTime": now_iso()}]}})
            await asyncio.Event().wait()
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}
        if fate == "image-pull":
            for reason, msg in (("ErrImagePull", f'failed to pull and unpack image "{image}": not found'),
                                ("ImagePullBackOff", f'Back-off pulling image "{image}"')):
                await self._api("PATCH", f"{ppath}/{pod_name}/status", {"status": {
                    "phase": "Pending", "conditions": [scheduled],
                    "containerStatuses": [{"name": cname, "ready": False, "image": image,
                                           "state": {"waiting": {"reason": reason, "message": msg}}}]}})
                await asyncio.sleep(0.3)
            await asyncio.Event().wait()
        await self._api("PATCH", f"{ppath}/{pod_name}/status", {"status": {
            "phase": "Running", "startTime": now_iso(), "conditions": [scheduled],
            "containerStatuses": [{"name": cname, "ready": True, "image": image,
                                   "state": {"running": {"startedAt": now_iso()}}}]}})
        await self._api("PATCH", jpath + "/status", {"status": {"active": 1, "ready": 1}})
        await asyncio.sleep(0.3)
        if fate == "oom":
            return 137, "OOMKilled", "", [scheduled]
        if fate == "preempted":
            return 143, "Error", "", [scheduled, {
                "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                "message": "default-scheduler: preempting to accommodate a higher priority pod",
                "lastTransitionTime": now_iso()}]
        await asyncio.Event().wait()  # hang
        return None

    async def _run_job_inner(self, job: dict[str, Any]) -> None:
        await self._wait_admitted(job)
        job = self._current(job["metadata"]["namespace"], job["metadata"]["name"]) or job
        meta, spec = job["metadata"], job["spec"]
        ns, name = meta["namespace"], meta["name"]
        jpath = f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"
        fates = self.fates.get((meta.get("labels") or {}).get(jobs_mod.LABEL_CONVERSION, ""), [])
        deadline = spec.get("activeDeadlineSeconds")
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        template = spec["template"]
        container = template["spec"]["containers"][0]
        backoff = int(spec.get("backoffLimit", 6))
        fail_codes: set[int] = set()
        for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
            codes = rule.get("onExitCodes")
            if rule.get("action") == "FailJob" and codes and codes.get("operator") == "In":
                fail_codes |= set(codes.get("values") or [])
        ignore_disruptions = any(
            rule.get("action") == "Ignore" and any(c.get("type") == "DisruptionTarget"
                                                   for c in rule.get("onPodConditions") or [])
            for rule in (spec.get("podFailurePolicy") or {}).get("rules") or [])
        started = now_iso()
        failed = 0
        await self._api("PATCH", jpath + "/status", {"status": {"startTime": started, "active": 1, "ready": 0}})
        while True:
            pod_name = f"{name}-{pysecrets.token_hex(3)[:5]}"
            ppath = f"/api/v1/namespaces/{ns}/pods"
            labels = dict(template.get("metadata", {}).get("labels") or {})
            labels.update({"batch.kubernetes.io/job-name": name, "job-name": name,
                           "batch.kubernetes.io/controller-uid": meta["uid"], "controller-uid": meta["uid"]})
            await self._api("POST", ppath, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                  "uid": meta["uid"], "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "spec": template["spec"], "status": {"phase": "Pending"}})
            self.pods_created += 1
            pod_dir = self._tmp / pod_name
            mapping: dict[str, str] = {}
            for m in container.get("volumeMounts") or []:
                d = pod_dir / "volumes" / m["name"]
                d.mkdir(parents=True, exist_ok=True)
                mapping[m["mountPath"]] = str(d)
            term_path = pod_dir / "termination-log"
            term_path.parent.mkdir(parents=True, exist_ok=True)
            term_path.write_text("")
            mapping[container.get("terminationMessagePath") or "/dev/termination-log"] = str(term_path)
            env = self._container_env(ns, container, mapping)
            run = ContainerRun(ns, name, pod_name, [_map(a, mapping) for a in container["command"]], env,
                               Path(_map(container.get("workingDir") or "/", mapping)), term_path)
            run.workdir.mkdir(parents=True, exist_ok=True)
            fate = fates.pop(0) if fates else None
            fate = None if fate == "run" else fate
            term_reason, pod_conditions = "", None

            # bound now (ruff B023), though the closure is awaited within this iteration
            async def attempt(fate: Any = fate, ppath: str = ppath, pod_name: str = pod_name,
                              run: ContainerRun = run) -> tuple[int, str]:
                nonlocal term_reason, pod_conditions
                if fate is not None:
                    ended = await self._fate(fate, ppath, pod_name, container, jpath, started)
                    assert ended is not None
                    code_, term_reason, message_, pod_conditions = ended
                    return code_, message_
                await self._api("PATCH", f"{ppath}/{pod_name}/status", {"status": {
                    "phase": "Running", "startTime": now_iso(),
                    "containerStatuses": [{"name": container["name"], "ready": True,
                                           "state": {"running": {"startedAt": now_iso()}}}]}})
                await self._api("PATCH", jpath + "/status", {"status": {"active": 1, "ready": 1}})
                return await self.executor(run)

            try:
                left = None if deadline is None else max(0.0, float(deadline) - (loop.time() - t_start))
                code, logs = await asyncio.wait_for(attempt(), left)
            except TimeoutError:  # activeDeadlineSeconds: the Job controller fails the Job, then kills the pod
                finished = now_iso()
                await self._fail_job(jpath, "DeadlineExceeded", "Job was active longer than specified deadline",
                                     failed + 1, finished)
                await self._api("PATCH", f"{ppath}/{pod_name}/status", {"status": {
                    "phase": "Failed", "containerStatuses": [{"name": container["name"], "ready": False,
                                                              "state": {"terminated": {
                                                                  "exitCode": 143, "reason": "Error",
                                                                  "startedAt": started, "finishedAt": finished}}}]}})
                return
            message = logs if fate is not None else term_path.read_text()
            if fate is None and not message and code != 0 and \
                    container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = "\n".join(logs.splitlines()[-80:])[-2048:]
            finished = now_iso()
            pod_status: dict[str, Any] = {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": container["name"], "ready": False, "state": {"terminated": {
                    "exitCode": code, "reason": term_reason or ("Completed" if code == 0 else "Error"),
                    "message": message[:4096], "startedAt": started, "finishedAt": finished}}}]}
            if pod_conditions is not None:
                pod_status["conditions"] = pod_conditions
            await self._api("PATCH", f"{ppath}/{pod_name}/status", {"status": pod_status})
            if any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in pod_conditions or []) \
                    and ignore_disruptions:
                continue  # podFailurePolicy Ignore: not counted, a new pod
            if code == 0:
                await self._api("PATCH", jpath + "/status", {"status": {
                    "active": 0, "ready": 0, "succeeded": 1, "completionTime": finished, "conditions": [
                        {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                         "lastTransitionTime": finished},
                        {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                         "lastTransitionTime": finished}]}})
                return
            failed += 1
            if code in fail_codes or failed > backoff:
                reason = "PodFailurePolicy" if code in fail_codes else "BackoffLimitExceeded"
                msg = (f"Container {container['name']} for pod {ns}/{pod_name} failed with exit code {code} "
                       f"matching FailJob rule at index 0") if code in fail_codes else \
                    "Job has reached the specified backoff limit"
                await self._fail_job(jpath, reason, msg, failed, finished)
                return
            await self._api("PATCH", jpath + "/status", {"status": {"failed": failed, "active": 1, "ready": 0}})


def _map(value: str, mapping: dict[str, str]) -> str:
    """Rewrite container paths (mount points, termination path) to the local temp dirs."""
    for container_path in sorted(mapping, key=len, reverse=True):
        local = mapping[container_path]
        if value == container_path:
            return local
        if value.startswith(container_path.rstrip("/") + "/"):
            return local + value[len(container_path.rstrip("/")):]
    return value


def reparam_entrypoint() -> list[str]:
    """How the runner starts the image's ``reparam`` entrypoint: this checkout's real CLI."""
    return [sys.executable, "-m", "reparam.cli"]


__all__ = ["ContainerRun", "Gate", "JobRunner", "SubprocessExecutor", "instant_success", "reparam_entrypoint",
           "jobs_mod"]
