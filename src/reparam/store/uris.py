"""Source URIs: parse and classify them, and redact credentials from any text (pure functions).

Accepted forms (the MLflow ones as MLflow spells them):

======================  =========================================================
``./best.pt``           local path (also ``file:///abs/best.pt``)
``s3://bucket/key``     S3 or an S3-compatible store
``models:/name/7``      a registered model version (``/sub/path.pt`` may follow)
``models:/name@alias``  the version an alias points to (``/sub/path.pt`` may follow)
``runs:/<id>/path``     an artifact of an MLflow run
``http(s)://...``       a plain download, e.g. MLflow's artifact proxy
======================  =========================================================
"""

from __future__ import annotations

import dataclasses
import os
import re
from urllib.parse import unquote, urlsplit

from ..errors import InvalidInputError

KINDS = ("local", "s3", "models", "runs", "http")

# MLflow's own rules: registered model names may hold most characters but not '/', and aliases are
# letters, digits, '_' and '-' (not 'latest', not v<digits>).
_MODEL_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)(?:/(?P<path>.+))?$")
_MODEL_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[A-Za-z0-9_\-]+)(?:/(?P<path>.+))?$")
_RUN = re.compile(r"^runs:/(?P<run_id>[0-9A-Za-z_\-]+)/(?P<path>.+)$")
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """A parsed source URI.

    ``kind`` is one of :data:`KINDS`. Fields that do not apply to a kind are None:
    local: ``path``; s3: ``bucket``, ``key``; models: ``model_name`` and ``version`` or ``alias``,
    optional ``path`` (an artifact inside the version); runs: ``run_id``, ``path``; http: ``url``.
    """

    kind: str
    uri: str
    path: str | None = None
    bucket: str | None = None
    key: str | None = None
    model_name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    url: str | None = None


def parse_source(uri: str) -> SourceRef:
    """Classify ``uri`` as one of the source kinds.

    Raises:
        InvalidInputError: empty URI, an unknown scheme, or a malformed ``s3://``, ``models:/``
            or ``runs:/`` URI (the message shows the accepted forms).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInputError("source URI is empty; give a path, s3://, models:/, runs:/ or http(s):// URI")
    uri = uri.strip()
    shown = redact(uri)
    if uri.startswith("models:"):
        m = _MODEL_VERSION.match(uri) or _MODEL_ALIAS.match(uri)
        if not m:
            raise InvalidInputError(
                f"malformed model URI {shown!r}: use models:/<name>/<version> or models:/<name>@<alias>"
            )
        g = m.groupdict()
        return SourceRef(
            "models", uri, path=g.get("path"), model_name=g["name"], version=g.get("version"), alias=g.get("alias")
        )
    if uri.startswith("runs:"):
        m = _RUN.match(uri)
        if not m or m["path"].strip("/") == "":
            raise InvalidInputError(f"malformed run URI {shown!r}: use runs:/<run_id>/<artifact path>")
        return SourceRef("runs", uri, run_id=m["run_id"], path=m["path"].strip("/"))
    m = _SCHEME.match(uri)
    scheme = m["scheme"].lower() if m else None
    if scheme == "s3":
        parts = urlsplit(uri)
        key = parts.path.lstrip("/")
        if not parts.netloc or not key or key.endswith("/"):
            raise InvalidInputError(f"malformed S3 URI {shown!r}: use s3://<bucket>/<key of the checkpoint>")
        return SourceRef("s3", uri, bucket=parts.netloc, key=key)
    if scheme in ("http", "https"):
        if not urlsplit(uri).netloc:
            raise InvalidInputError(f"malformed URL {shown!r}: it has no host")
        return SourceRef("http", uri, url=uri)
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError(f"file URI {shown!r} names a remote host; use a local path")
        return SourceRef("local", uri, path=unquote(parts.path))
    if scheme is not None:
        raise InvalidInputError(
            f"unsupported source scheme {scheme!r} in {shown!r}: use a local path, s3://, models:/, runs:/ "
            "or http(s)://"
        )
    return SourceRef("local", uri, path=uri)


# --- redaction ---------------------------------------------------------------------------------------

_REDACTED = "***"
#: user:password@ (or token@) in any URL
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@?#]+)@")
#: credential-bearing query parameters (AWS SigV2/SigV4 presigned URLs, GCS, Azure SAS, tokens)
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>[?&](?:x-amz-(?:signature|credential|security-token)|signature|awsaccesskeyid|sig|"
    r"x-goog-(?:signature|credential)|token|access_token|api_key|apikey|password|secret))=(?P<value>[^&\s#'\"]*)"
)
#: AWS access key ids
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")
#: key=value or key: value assignments of secrets, as in configs, headers and botocore messages
_ASSIGNMENT = re.compile(
    r"(?i)(?P<key>\b(?:aws_secret_access_key|aws_session_token|secret_?key|password|passwd|token|authorization)"
    r"\b['\"]?\s*[=:]\s*['\"]?)(?:(?:bearer|basic)\s+)?(?P<value>[^\s'\",;&]+)"
)
#: environment variables whose values must never be shown, wherever they appear
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


def redact(text: object) -> str:
    """Return ``str(text)`` with credentials replaced by ``***``.

    Removes: ``user:pass@`` in URLs; presigned/SAS query parameters (``X-Amz-Signature``,
    ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``Signature``, ``sig``, ``token``...); AWS access key
    ids; ``secret=...``/``password: ...``/``Authorization: Bearer ...`` assignments; and the literal
    values of the secret environment variables in :data:`SECRET_ENV_VARS` (so a key that looks like
    nothing special is still hidden). Safe to call on any object; never raises.
    """
    s = str(text)
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            s = s.replace(value, _REDACTED)
    s = _USERINFO.sub(lambda m: f"{m['scheme']}{_REDACTED}@", s)
    s = _SECRET_PARAM.sub(lambda m: f"{m['key']}={_REDACTED}", s)
    s = _AWS_KEY_ID.sub(_REDACTED, s)
    s = _ASSIGNMENT.sub(lambda m: f"{m['key']}{_REDACTED}", s)
    return s
