"""The operator's Kubernetes calls, made with the official client's async build (``kubernetes_asyncio``).

kopf watches and patches the ``ModelConversion`` itself but exposes no client for other objects; the
operator needs a few calls (Jobs, pods, status patches, Events). They go through ``kubernetes_asyncio``'s
typed APIs (``BatchV1Api``, ``CoreV1Api``, ``CustomObjectsApi``), which run on aiohttp in kopf's event loop.
Credentials come from kopf's own login (:func:`kopf.login_with_service_account`,
:func:`kopf.login_with_kubeconfig`), so the operator and kopf use the same identity.

Objects are the API server's JSON as plain dicts (``_preload_content=False``: nothing is re-serialised
through the client's models, so times and unknown fields stay exactly as the server wrote them).

Errors: :class:`ApiError` with the HTTP ``status`` (404, 409, ...), the ``reason`` and ``message`` of the
server's ``Status`` object. Connection failures and time-outs raise :class:`ApiError` with status 0;
callers treat 0, 429 and 5xx as transient (:meth:`ApiError.transient`).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Awaitable, Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio import client as k8s

from . import jobs

#: Seconds one API call may take (connect + read); the default of the client is no limit.
REQUEST_TIMEOUT = 30


class ApiError(Exception):
    """A failed API call: ``status`` (0 for no response), ``reason``, ``message``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """Whether retrying later may succeed (no response, 429, 5xx)."""
        return self.status == 0 or self.status == 429 or self.status >= 500


def _decode(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw


def _status_error(status: int, reason: str, text: str) -> ApiError:
    """An :class:`ApiError` from an error response; reason/message from its ``Status`` body when it has one."""
    message = text[:500]
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        data = {}
    if isinstance(data, dict):
        reason = str(data.get("reason") or reason)
        message = str(data.get("message") or message)
    return ApiError(status, reason, message)


def selector(labels: Mapping[str, str]) -> str:
    """An equality-based label selector (``k=v,k2=v2``), as the API's ``labelSelector`` parameter."""
    return ",".join(f"{k}={v}" for k, v in labels.items())


class KubeClient:
    """One ``kubernetes_asyncio`` API client bound to one API server and identity."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self.info = info
        self._tmp: list[str] = []
        self.api = k8s.ApiClient(self._configuration(info))
        self.api.user_agent = "reparam-operator"
        self.batch = k8s.BatchV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    @classmethod
    def login(cls, settings: kopf.OperatorSettings | None = None) -> "KubeClient":
        """Log in as kopf does: in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``.

        Raises :class:`kopf.LoginError` when neither is there.
        """
        st = settings or kopf.OperatorSettings()
        info = kopf.login_with_service_account(settings=st) or kopf.login_with_kubeconfig(settings=st)
        if info is None:
            raise kopf.LoginError("no service account and no kubeconfig: cannot reach the Kubernetes API")
        return cls(info)

    def _configuration(self, info: kopf.ConnectionInfo) -> k8s.Configuration:
        """kopf's :class:`kopf.ConnectionInfo` as the client's ``Configuration`` (token or basic auth, TLS)."""
        cfg = k8s.Configuration(host=info.server.rstrip("/"))
        if info.token:
            cfg.api_key = {"authorization": info.token}
            cfg.api_key_prefix = {"authorization": info.scheme or "Bearer"}
        elif info.username and info.password:
            basic = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            cfg.api_key = {"authorization": basic}
            cfg.api_key_prefix = {"authorization": "Basic"}
        cfg.verify_ssl = not info.insecure
        if info.ca_path:
            cfg.ssl_ca_cert = os.fsdecode(info.ca_path)
        elif info.ca_data:
            cfg.ssl_ca_cert = self._tempfile(_decode(info.ca_data))
        if info.certificate_path:
            cfg.cert_file = os.fsdecode(info.certificate_path)
        elif info.certificate_data:
            cfg.cert_file = self._tempfile(_decode(info.certificate_data))
        if info.private_key_path:
            cfg.key_file = os.fsdecode(info.private_key_path)
        elif info.private_key_data:
            cfg.key_file = self._tempfile(_decode(info.private_key_data))
        cfg.client_side_validation = False  # the server validates; bodies are plain dicts
        return cfg

    def _tempfile(self, data: bytes) -> str:
        fd, name = tempfile.mkstemp(prefix="reparam-kube-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._tmp.append(name)
        return name

    async def close(self) -> None:
        """Close the client's connections and remove temporary certificate files."""
        await self.api.close()
        for name in self._tmp:
            try:
                os.unlink(name)
            except OSError:
                pass
        self._tmp.clear()

    async def _call(self, pending: Awaitable[Any]) -> dict[str, Any]:
        """Await a typed API call made with ``_preload_content=False``; the response's JSON object.

        Raises :class:`ApiError` (status 0 for a connection failure or time-out).
        """
        try:
            rsp = await pending
            async with rsp:
                text = await rsp.text()
                if rsp.status >= 400:
                    raise _status_error(rsp.status, rsp.reason or "", text)
        except k8s.ApiException as exc:
            body = exc.body.decode() if isinstance(exc.body, bytes) else str(exc.body or "")
            raise _status_error(int(exc.status or 0), str(exc.reason or ""), body) from exc
        except aiohttp.ClientError as exc:
            raise ApiError(0, type(exc).__name__, str(exc)) from exc
        except TimeoutError as exc:
            raise ApiError(0, "Timeout", "the API call timed out") from exc
        if not text:
            return {}
        data = json.loads(text)
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _opts() -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}

    async def _maybe(self, pending: Awaitable[Any]) -> dict[str, Any] | None:
        """:meth:`_call`, with ``None`` for 404 Not Found."""
        try:
            return await self._call(pending)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    # -------------------------------------------------------------- ModelConversions
    async def get_conversion(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ``ModelConversion``, or ``None`` when it does not exist."""
        return await self._maybe(self.custom.get_namespaced_custom_object(
            jobs.GROUP, jobs.VERSION, namespace, jobs.PLURAL, name, **self._opts()))

    async def list_conversions(self, namespace: str | None) -> list[dict[str, Any]]:
        """All ``ModelConversions`` of ``namespace`` (``None``: every namespace)."""
        if namespace is None:
            pending = self.custom.list_cluster_custom_object(jobs.GROUP, jobs.VERSION, jobs.PLURAL, **self._opts())
        else:
            pending = self.custom.list_namespaced_custom_object(jobs.GROUP, jobs.VERSION, namespace, jobs.PLURAL,
                                                                **self._opts())
        return list((await self._call(pending)).get("items") or [])

    async def patch_conversion_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """JSON merge patch (RFC 7386) of the status subresource; ``patch`` is ``{"status": {...}}``.

        Custom resources accept no strategic merge patch (Kubernetes API conventions), so the content type
        is forced to ``application/merge-patch+json``.
        """
        # why the ignore below: the generated method takes _content_type through **kwargs (its docstring lists it);
        # the typed signature names only the API's own parameters
        await self._call(self.custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
            jobs.GROUP, jobs.VERSION, namespace, jobs.PLURAL, name, patch,
            _content_type="application/merge-patch+json", **self._opts()))

    # ----------------------------------------------------------------------- Jobs
    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ``batch/v1`` Job, or ``None`` when it does not exist."""
        return await self._maybe(self.batch.read_namespaced_job(name, namespace, **self._opts()))

    async def list_jobs(self, namespace: str | None, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Jobs matching the equality ``labels`` in ``namespace`` (``None``: every namespace)."""
        sel = selector(labels)
        if namespace is None:
            pending = self.batch.list_job_for_all_namespaces(label_selector=sel, **self._opts())
        else:
            pending = self.batch.list_namespaced_job(namespace, label_selector=sel, **self._opts())
        return list((await self._call(pending)).get("items") or [])

    async def create_job(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the Job; :class:`ApiError` 409 when one of that name exists."""
        # why the ignore below: bodies are plain dicts (the client serialises dicts as they are, see
        # ApiClient.sanitize_for_serialization); the stub names only the model class
        return await self._call(self.batch.create_namespaced_job(namespace, manifest,  # type: ignore[arg-type]
                                                                 **self._opts()))

    async def delete_job(self, namespace: str, name: str, propagation: str = "Background") -> bool:
        """Delete the Job with ``propagationPolicy`` (``Background``: its pods go at once, without waiting for
        the garbage collector's foreground pass); ``False`` when it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        return await self._maybe(self.batch.delete_namespaced_job(
            name, namespace, body=body, **self._opts())) is not None  # type: ignore[arg-type]  # dict body, as above

    # ----------------------------------------------------------------------- pods
    async def list_pods(self, namespace: str | None, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Pods matching the equality ``labels`` in ``namespace`` (``None``: every namespace)."""
        sel = selector(labels)
        if namespace is None:
            pending = self.core.list_pod_for_all_namespaces(label_selector=sel, **self._opts())
        else:
            pending = self.core.list_namespaced_pod(namespace, label_selector=sel, **self._opts())
        return list((await self._call(pending)).get("items") or [])

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod, or ``None`` when it does not exist."""
        return await self._maybe(self.core.read_namespaced_pod(name, namespace, **self._opts()))

    # --------------------------------------------------------------------- events
    async def create_event(self, namespace: str, event: dict[str, Any]) -> dict[str, Any]:
        """Create a ``core/v1`` Event."""
        return await self._call(self.core.create_namespaced_event(
            namespace, event, **self._opts()))  # type: ignore[arg-type]  # dict body, as create_job

    # ------------------------------------------------- policies and the conversions they create (issue #13)
    async def create_conversion(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create a ``ModelConversion``; :class:`ApiError` 409 when one of that name exists, 422 when the API
        server's schema refuses it."""
        return await self._call(self.custom.create_namespaced_custom_object(
            jobs.GROUP, jobs.VERSION, namespace, jobs.PLURAL, manifest, **self._opts()))

    async def list_conversions_labelled(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """The ``ModelConversions`` of ``namespace`` matching the equality ``labels``."""
        return list((await self._call(self.custom.list_namespaced_custom_object(
            jobs.GROUP, jobs.VERSION, namespace, jobs.PLURAL, label_selector=selector(labels),
            **self._opts()))).get("items") or [])

    async def delete_conversion(self, namespace: str, name: str) -> bool:
        """Delete a ``ModelConversion`` (``Background``: its Job goes through the garbage collector);
        ``False`` when it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        return await self._maybe(self.custom.delete_namespaced_custom_object(
            jobs.GROUP, jobs.VERSION, namespace, jobs.PLURAL, name, body=body,  # type: ignore[arg-type]  # dict body
            **self._opts())) is not None

    async def patch_policy_status(self, namespace: str, plural: str, name: str, patch: dict[str, Any]) -> None:
        """JSON merge patch of a policy's status subresource (as :meth:`patch_conversion_status`)."""
        # why the ignore below: _content_type goes through **kwargs, as in patch_conversion_status
        await self._call(self.custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
            jobs.GROUP, jobs.VERSION, namespace, plural, name, patch,
            _content_type="application/merge-patch+json", **self._opts()))
