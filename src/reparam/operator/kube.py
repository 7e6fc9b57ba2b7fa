"""A small asynchronous Kubernetes API client over aiohttp, for the handlers.

kopf talks to the API for its own watching and patching but exposes no client
for other objects; the operator needs a few calls (Jobs, pods, status patches,
Events). Credentials come from kopf's own login helpers
(:func:`kopf.login_with_service_account`, :func:`kopf.login_with_kubeconfig`), so
the operator and kopf use the same identity. Objects are plain dicts.

Errors: :class:`ApiError` with the HTTP ``status`` (404, 409, ...). Connection
failures raise :class:`ApiError` with status 0; callers treat 0, 429 and 5xx as
transient (:meth:`ApiError.transient`).
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf


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


def path(group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    """The REST path of a resource collection or object (core group: ``group=""``)."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if subresource:
        base += f"/{subresource}"
    return base


def _decode(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw


class KubeClient:
    """An aiohttp session bound to one API server and identity."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self.info = info
        self.server = info.server.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._tmp: list[str] = []

    @classmethod
    def login(cls, settings: kopf.OperatorSettings | None = None) -> "KubeClient":
        """Log in as kopf does without extra libraries: in-cluster service account,
        else ``$KUBECONFIG`` / ``~/.kube/config``. Raises :class:`kopf.LoginError`."""
        st = settings or kopf.OperatorSettings()
        info = kopf.login_with_service_account(settings=st) or kopf.login_with_kubeconfig(settings=st)
        if info is None:
            raise kopf.LoginError("no service account and no kubeconfig: cannot reach the Kubernetes API")
        return cls(info)

    def _ssl(self) -> ssl.SSLContext | bool:
        info = self.info
        if not self.server.startswith("https"):
            return False
        if info.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            cadata = _decode(info.ca_data).decode() if info.ca_data else None
            ctx = ssl.create_default_context(cafile=os.fspath(info.ca_path) if info.ca_path else None,
                                             cadata=cadata)
        cert, key = info.certificate_path, info.private_key_path
        if info.certificate_data:
            cert = self._tempfile(_decode(info.certificate_data))
        if info.private_key_data:
            key = self._tempfile(_decode(info.private_key_data))
        if cert:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
        return ctx

    def _tempfile(self, data: bytes) -> str:
        fd, name = tempfile.mkstemp(prefix="reparam-kube-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._tmp.append(name)
        return name

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": "reparam-operator"}
            if self.info.token:
                headers["Authorization"] = f"{self.info.scheme or 'Bearer'} {self.info.token}"
            auth = None
            if self.info.username and self.info.password:
                auth = aiohttp.BasicAuth(self.info.username, self.info.password)
            self._session = aiohttp.ClientSession(
                headers=headers, auth=auth, connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=32),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        """Close the session and remove temporary certificate files."""
        if self._session is not None:
            await self._session.close()
        for name in self._tmp:
            try:
                os.unlink(name)
            except OSError:
                pass
        self._tmp.clear()

    async def request(self, method: str, url_path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        """One API call; returns the decoded JSON object. Raises :class:`ApiError`."""
        session = await self._get_session()
        try:
            async with session.request(method, self.server + url_path, json=body, params=params,
                                       headers={"Content-Type": content_type} if body is not None else None) as rsp:
                text = await rsp.text()
                if rsp.status >= 400:
                    reason, message = rsp.reason or "", text[:500]
                    try:
                        data = await rsp.json(content_type=None)
                        reason = data.get("reason") or reason
                        message = data.get("message") or message
                    except (ValueError, aiohttp.ContentTypeError):
                        pass
                    raise ApiError(rsp.status, str(reason), str(message))
                return await rsp.json(content_type=None) if text else {}
        except aiohttp.ClientError as exc:
            raise ApiError(0, type(exc).__name__, str(exc)) from exc
        except TimeoutError as exc:
            raise ApiError(0, "Timeout", f"{method} {url_path} timed out") from exc

    async def get(self, url_path: str) -> dict[str, Any]:
        return await self.request("GET", url_path)

    async def list(self, url_path: str, label_selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """List a collection; ``label_selector`` (equality terms) is sent to the server and
        also applied here, so a server that ignores it gives the same answer."""
        params = None
        if label_selector:
            params = {"labelSelector": ",".join(f"{k}={v}" for k, v in label_selector.items())}
        data = await self.request("GET", url_path, params=params)
        items = data.get("items") or []
        if label_selector:
            items = [i for i in items if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v
                                             for k, v in label_selector.items())]
        return items

    async def create(self, url_path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", url_path, body=body)

    async def merge_patch(self, url_path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", url_path, body=body, content_type="application/merge-patch+json")

    async def delete(self, url_path: str, propagation: str = "Background") -> dict[str, Any]:
        return await self.request("DELETE", url_path,
                                  body={"kind": "DeleteOptions", "apiVersion": "v1",
                                        "propagationPolicy": propagation})
