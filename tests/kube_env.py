"""A Kubernetes API on 127.0.0.1 for operator tests: kmock's emulator plus a thin layer.

kmock's ``KubernetesEmulator`` stores objects and serves list/watch/get/create/
patch/delete, but (by design) does not do what the API server and controllers
add on top. :class:`ClusterEmulator` adds only what the operator tests need, each
rule documented where it is:

* ``metadata.uid``, ``creationTimestamp``, ``generation`` (1) on create, and a new
  ``resourceVersion`` on every write (kmock keeps whatever the client sent);
* ``metadata.generation`` + 1 when a write changes ``spec`` (API server rule);
* the status subresource: ``.../status`` writes change only ``status``; writes to
  the main endpoint of a resource with a status subresource ignore ``status``;
* ``labelSelector`` on list (equality terms), which kmock ignores;
* background garbage collection: deleting an object deletes every object with
  an ``ownerReference`` to its uid (the garbage collector's job in a cluster), at once or, with
  ``gc_delay`` seconds set, later (a cluster's garbage collector works asynchronously);
* a log of client deletions (``deletions``: plural, namespace, name, ``propagationPolicy``), so tests can
  tell a client's delete from the garbage collector's;
* no request log (kmock's log makes long runs quadratic, see ``_forget``).

:class:`KubeEnv` runs the emulator's HTTP server in a thread with its own event
loop, so tests and benches stay synchronous; :meth:`KubeEnv.call` runs a function
or coroutine in that loop (the only safe way to read the emulator's objects).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
from kmock._internal import dicts as kmock_dicts

from reparam.operator import jobs

MC_RESOURCE = kmock.resource(jobs.GROUP, jobs.VERSION, jobs.PLURAL)
POLICY_PLURAL, POLICY_KIND = "modelconversionpolicies", "ModelConversionPolicy"
POLICY_RESOURCE = kmock.resource(jobs.GROUP, jobs.VERSION, POLICY_PLURAL)
JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
SECRETS = kmock.resource("", "v1", "secrets")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.strip().rstrip("=")) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the API-server/GC rules listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1000)
        self.deletions: list[tuple[str, str | None, str, str | None]] = []
        self.gc_delay = 0.0

    def _has_status(self, resource: Any) -> bool:
        try:
            return "status" in self.resources[resource].subresources
        except (KeyError, LookupError):
            return False

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        res, data = request.resource, request.data
        if res is not None and isinstance(data, dict):
            action = request.action
            meta = data.setdefault("metadata", {}) if action in (kmock.action.CREATE, kmock.action.UPDATE) else None
            if action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now_iso())
                meta.setdefault("generation", 1)
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
                meta["resourceVersion"] = str(next(self._rv))
            elif action == kmock.action.UPDATE and request.name is not None:
                key = (res, request.namespace, request.name)
                current = self._objects[key].raw if key in self._objects and not self._objects[key].deleted else {}
                if request.subresource == "status":
                    for field in list(data):
                        if field not in ("status", "metadata"):
                            del data[field]
                    data["metadata"] = {}
                else:
                    for field in ("uid", "creationTimestamp", "generation"):  # server-owned fields
                        data["metadata"].pop(field, None)
                    if self._has_status(res):
                        data.pop("status", None)
                    if "spec" in data:
                        old_spec = copy.deepcopy(current.get("spec") or {})
                        new_spec = kmock_dicts.patch_dict(copy.deepcopy(old_spec), data["spec"])
                        if new_spec != old_spec:
                            gen = int((current.get("metadata") or {}).get("generation") or 1)
                            data["metadata"]["generation"] = gen + 1
                data["metadata"]["resourceVersion"] = str(next(self._rv))
        deleted_uid = None
        if res is not None and request.action == kmock.action.DELETE and request.name is not None:
            policy = (data.get("propagationPolicy") if isinstance(data, dict) else None) or \
                (request.params or {}).get("propagationPolicy")
            self.deletions.append((res.plural, request.namespace, request.name, policy))
            key = (res, request.namespace, request.name)
            if key in self._objects and not self._objects[key].deleted:
                deleted_uid = (self._objects[key].raw.get("metadata") or {}).get("uid")
        try:
            response = await super()._handle(request)
        finally:
            self._forget(request)
        if deleted_uid and self.gc_delay > 0:
            async def later(uid: str = deleted_uid) -> None:
                await asyncio.sleep(self.gc_delay)
                await self._collect_garbage({uid})
            task = asyncio.get_running_loop().create_task(later())
            self._gc_tasks = getattr(self, "_gc_tasks", set())
            self._gc_tasks.add(task)
            task.add_done_callback(self._gc_tasks.discard)
        elif deleted_uid:
            await self._collect_garbage({deleted_uid})
        return response

    def _forget(self, request: kmock.Request) -> None:
        """Drop a served request from kmock's request log.

        kmock matches each new request against its reactions by scanning the log
        of all past requests, which makes a long run quadratic (1,000 resources
        mean ~20,000 requests). The operator tests assert on objects, not on the
        request log, so it only holds requests still being served (watches).
        """
        log = self._requests
        for i in range(len(log) - 1, -1, -1):
            if log[i] is request:
                del log[i]
                break

    async def _collect_garbage(self, uids: set[str]) -> None:
        """Delete dependents of the deleted ``uids`` (background propagation)."""
        while uids:
            next_uids: set[str] = set()
            async with self._lock:
                for (res, _ns, _name), obj in list(self._objects.items()):
                    if obj.deleted:
                        continue
                    raw = obj.raw
                    refs = (raw.get("metadata") or {}).get("ownerReferences") or []
                    if any(r.get("uid") in uids for r in refs):
                        obj.delete()
                        next_uids.add((raw.get("metadata") or {}).get("uid"))
                        await self._buses[res].put({"type": "DELETED", "object": raw})
            uids = {u for u in next_uids if u}

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:
        """kmock's object lookup, with a dict lookup for named objects.

        kmock scans every stored object (comparing resources field by field) for each
        request, which makes the 1,000-resource bench quadratic. Same results:
        a named request in a namespace is one key; others scan with cheap tuple keys.
        (Overrides kmock's name-mangled private ``__get_objs``.)
        """
        objects = self._objects._objects
        res = request.resource
        if res is None:
            return []
        if request.name is not None and (strict or request.namespace is not None):
            obj = objects.get((res, request.namespace, request.name))
            return [obj] if obj is not None else []
        want = (res.group, res.version, res.plural)
        return [obj for (r, ns, name), obj in objects.items()
                if (r.group, r.version, r.plural) == want
                and (ns == request.namespace if strict else (request.namespace is None or ns == request.namespace))
                and (request.name is None or name == request.name)]

    async def _serve_list(self, request: kmock.Request):  # type: ignore[override]
        result = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector and isinstance(result, dict):
            result["items"] = [i for i in result["items"] if _selected(i, selector)]
        return result


class KubeEnv:
    """The emulator served over HTTP from a background thread (see module docstring)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kube-env", daemon=True)
        self.emulator: ClusterEmulator | None = None
        self.server: kmock.Server | None = None

    # -- lifecycle
    def start(self) -> "KubeEnv":
        self.thread.start()
        self.call(self._astart())
        return self

    async def _astart(self) -> None:
        emu = ClusterEmulator()
        await emu.__aenter__()
        emu.resources.load_bundled()
        emu.resources[f"{jobs.GROUP}/{jobs.VERSION}/{jobs.PLURAL}"] = kmock.ResourceInfo(
            kind=jobs.KIND, singular="modelconversion", namespaced=True, shortnames={"mconv"},
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"}, subresources={"status"})
        emu.resources[f"{jobs.GROUP}/{jobs.VERSION}/{POLICY_PLURAL}"] = kmock.ResourceInfo(
            kind=POLICY_KIND, singular=POLICY_KIND.lower(), namespaced=True, shortnames={"mcpolicy"},
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"}, subresources={"status"})
        server = kmock.Server(emu)
        await server.__aenter__()
        self.emulator, self.server = emu, server

    def stop(self) -> None:
        async def _astop() -> None:
            pending = list(getattr(self.emulator, "_gc_tasks", ()))  # delayed garbage collections
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self.server is not None:
                await self.server.__aexit__(None, None, None)
            if self.emulator is not None:
                await self.emulator.__aexit__(None, None, None)
        try:
            self.call(_astop(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    def call(self, fn: Any, timeout: float = 30) -> Any:
        """Run a coroutine, or a plain callable, in the emulator's loop; return its result."""
        if asyncio.iscoroutine(fn):
            return asyncio.run_coroutine_threadsafe(fn, self.loop).result(timeout)

        async def wrap() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.url).rstrip("/")

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: tester, user: {token: test-token}}]\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: tester, namespace: default}}]\n")
        return path

    # -- API calls over HTTP (like any client)
    async def arequest(self, method: str, path: str, body: Any = None,
                       content_type: str = "application/merge-patch+json") -> tuple[int, Any]:
        assert self.server is not None
        headers = {"Content-Type": content_type if method == "PATCH" else "application/json"}
        async with self.server.client.request(method, path, json=body, headers=headers) as rsp:
            try:
                data = await rsp.json(content_type=None)
            except ValueError:
                data = await rsp.text()
            return rsp.status, data

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.call(self.arequest(method, path, body))

    # -- reading state (in the loop, deep-copied)
    def objects(self, resource: Any, namespace: str | None = None) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            assert self.emulator is not None
            out = []
            for (res, ns, _name), obj in list(self.emulator.objects.items()):
                if res == resource and (namespace is None or ns == namespace) and not obj.deleted:
                    out.append(copy.deepcopy(obj.raw))
            return out
        return self.call(read)

    def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        for obj in self.objects(resource, namespace):
            if obj["metadata"]["name"] == name:
                return obj
        return None


def mc_path(namespace: str, name: str | None = None) -> str:
    p = f"/apis/{jobs.GROUP}/{jobs.VERSION}/namespaces/{namespace}/{jobs.PLURAL}"
    return p + (f"/{name}" if name else "")


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise AssertionError after ``timeout``."""
    import time
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last={last!r}")


def src_dir() -> str:
    return str(Path(__file__).resolve().parents[1] / "src")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = src_dir() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env
