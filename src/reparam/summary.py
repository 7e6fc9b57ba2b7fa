"""The conversion summary: the small JSON the converter hands to whoever ran it.

``reparam convert --termination-log PATH`` writes it to ``PATH`` (in a Job:
``/dev/termination-log``, which Kubernetes copies into the pod's
``status.containerStatuses[].state.terminated.message``; the kubelet keeps at most
4096 bytes, see the Pod API ``terminationMessagePath``). The operator reads it back
with :func:`parse` and fills ``ModelConversion.status.result`` from it.

No torch import here: the operator image uses this module.

Fields (all optional except ``outcome``)::

    outcome        "succeeded" | "validation_failed" | "failed"
    exitCode       int, see reparam.exitcodes
    reason         CamelCase reason for a failure (e.g. "InvalidInput", "ValidationFailed")
    message        one line for humans (a failure's error message)
    modelName, version, modelUri, aliases      registry result (when registered)
    deploySha256, paramsBefore, paramsAfter, maxAbsDiff, bytesBefore, bytesAfter
    metrics        {map50_95, map50, datasetDigest, mask_map50_95, mask_map50} (``--eval-data``; box mAP, and
                   mask mAP for a segmentation model on polygon labels; the compared one is the gated deploy .pt's
                   when ``--promote`` ran, else the dual model's)
    promotion      {alias, decision: "promoted"|"held", reason, previousVersion} (``--promote``)
"""

from __future__ import annotations

import json
from typing import Any

from .report import STATUSES

#: Kubernetes truncates a termination message at 4096 bytes (Pod API, terminationMessagePath).
MAX_BYTES = 4096

#: Outcomes of a run: a report's statuses (:data:`reparam.report.STATUSES`), or ``failed`` (no report: any other
#: error). The one list: the operator's metrics label their series with it too.
OUTCOMES = (*STATUSES, "failed")

_RESULT_KEYS = (
    "modelName",
    "version",
    "modelUri",
    "aliases",
    "deploySha256",
    "paramsBefore",
    "paramsAfter",
    "maxAbsDiff",
    "bytesBefore",
    "bytesAfter",
    "metrics",
    "promotion",
)


def dumps(summary: dict[str, Any]) -> str:
    """Serialise a summary to compact JSON of at most :data:`MAX_BYTES` bytes.

    Raises ``ValueError`` if ``outcome`` is missing or unknown. When the JSON is
    too long the ``message`` is shortened first, then ``aliases``.
    """
    if summary.get("outcome") not in OUTCOMES:
        raise ValueError(f"summary outcome must be one of {OUTCOMES}, got {summary.get('outcome')!r}")
    data = {k: v for k, v in summary.items() if v is not None}
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    while len(text.encode()) > MAX_BYTES and data.get("message"):
        data["message"] = data["message"][: max(0, len(data["message"]) // 2 - 3)] + "..."
        if len(data["message"]) <= 3:
            data.pop("message")
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_BYTES and (data.get("promotion") or {}).get("reason"):
        data["promotion"] = {**data["promotion"], "reason": data["promotion"]["reason"][:200]}
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_BYTES:
        data.pop("aliases", None)
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return text


def parse(text: str | None) -> dict[str, Any] | None:
    """Parse a termination message; ``None`` when absent or not a summary (never raises)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("outcome") not in OUTCOMES:
        return None
    return data


def result_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The subset of a summary that goes into ``ModelConversion.status.result``."""
    return {k: summary[k] for k in _RESULT_KEYS if summary.get(k) is not None}
