"""Source URIs: parse and classify them, and redact credentials from any text (pure functions).

Accepted forms (the MLflow ones as MLflow spells them; the grammar lives in :mod:`reparam.spec`):

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

import os
import re

from ..errors import InvalidInputError
from ..spec import SourceRef, SpecError, parse_source_uri

__all__ = ["SECRET_ENV_VARS", "SourceRef", "parse_source", "redact"]


def parse_source(uri: str) -> SourceRef:
    """Classify ``uri`` as one of the source kinds (the grammar: :func:`reparam.spec.parse_source_uri`).

    Raises:
        InvalidInputError: empty URI, an unknown scheme, or a malformed ``s3://``, ``models:/``
            or ``runs:/`` URI (the message shows the accepted forms, credentials redacted).
    """
    try:
        return parse_source_uri(uri, show=redact)
    except SpecError as err:
        raise InvalidInputError(str(err)) from None


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
