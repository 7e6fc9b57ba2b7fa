"""The promotion rule: which model versions count as done, which aliases may point at one, and moving them.

Rule (one place, :data:`RULES`, applied by the pure :func:`decide`): an alias is set on a version only when

1. an alias was requested,
2. the conversion's equivalence check passed,
3. MLflow itself reports the version ``READY`` (``ModelVersion.status``; ``PENDING_REGISTRATION`` and
   ``FAILED_REGISTRATION`` are MLflow's states of an unfinished or failed registration, see MLflow's
   ``model_version_status.py``; an asynchronous registry such as Unity Catalog sets them, the OSS store
   creates every version ``READY``),
4. the registry marks it ready and validated (tags ``reparam.status = ready`` and
   ``reparam.validation_passed = true``, written by :func:`reparam.store.registry.register` as its last step).

Rules 3 and 4 together are :func:`version_problem`, which is also what makes an existing version reusable by
the idempotency lookup (:func:`reparam.store.registry.find_existing`). An existing alias moves to the new
version only when every rule passes; otherwise nothing changes. Aliases, not stages (MLflow deprecated stages).

:func:`decide` returns a :class:`Decision` (aliases to set, or the reason none is set, and which rule said so);
further gates are further entries of :data:`RULES` (each a pure function of a :class:`Candidate`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

from ..errors import InvalidInputError, RegistryError
from . import tracking
from .uris import redact

TAG_STATUS = "reparam.status"
TAG_VALIDATION = "reparam.validation_passed"
STATUS_READY = "ready"
#: MLflow's ``ModelVersionStatus`` of a complete model version (as the client returns it, a string)
MLFLOW_READY = "READY"

# MLflow's alias rules: letters, digits, '_' and '-'; 'latest' and v<digits> are reserved.
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]{1,255}$")
_RESERVED = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


def version_problem(status: str | None, tags: Mapping[str, str] | None) -> str | None:
    """Why a model version is not a complete, validated reparam deploy version; None when it is.

    Args:
        status: MLflow's ``ModelVersion.status`` (``READY``, ``PENDING_REGISTRATION``, ``FAILED_REGISTRATION``).
        tags: the version's tags.
    """
    tags = tags or {}
    if str(status) != MLFLOW_READY:
        return f"MLflow status is {status} (not {MLFLOW_READY})"
    if tags.get(TAG_STATUS) != STATUS_READY:
        return f"version is not ready ({TAG_STATUS}={tags.get(TAG_STATUS)!r})"
    if str(tags.get(TAG_VALIDATION, "")).lower() != "true":
        return f"version is not marked validated ({TAG_VALIDATION}={tags.get(TAG_VALIDATION)!r})"
    return None


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What the promotion rule reads about one model version (no registry access).

    Attributes:
        aliases: the aliases requested (validated, deduplicated).
        validation_passed: the conversion's equivalence check passed.
        version_status: MLflow's ``ModelVersion.status`` string.
        version_tags: the version's tags.
    """

    aliases: tuple[str, ...]
    validation_passed: bool
    version_status: str | None
    version_tags: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`.

    Attributes:
        aliases: the aliases to set (empty when refused).
        reason: why none is set, or None.
        rule: the name of the rule that refused (an entry of :data:`RULES`), or None.
    """

    aliases: list[str]
    reason: str | None = None
    rule: str | None = None

    @property
    def allowed(self) -> bool:
        return self.reason is None


def _requested(c: Candidate) -> str | None:
    return None if c.aliases else "no alias requested"


def _validated(c: Candidate) -> str | None:
    return None if c.validation_passed else "validation did not pass"


def _version_complete(c: Candidate) -> str | None:
    return version_problem(c.version_status, c.version_tags)


#: The rules, in order: (name, rule, whether it reads the version's status/tags); the first rule that returns a
#: reason refuses the promotion.
RULES: tuple[tuple[str, Callable[[Candidate], str | None], bool], ...] = (
    ("requested", _requested, False),
    ("validation", _validated, False),
    ("version_complete", _version_complete, True),
)

@dataclasses.dataclass
class Promotion:
    """What :func:`promote` did.

    Attributes:
        model_name, version: the version promoted (or not).
        aliases: the aliases now pointing at it (empty when skipped).
        previous: for each alias set, the version it pointed at before (None if it was new).
        skipped_reason: why no alias was set, or None.
    """

    model_name: str
    version: str
    aliases: list[str]
    previous: dict[str, str | None]
    skipped_reason: str | None = None


def check_aliases(aliases) -> list[str]:
    """Validate alias names (deduplicated, order kept). Raises InvalidInputError naming a bad one."""
    out: list[str] = []
    for a in aliases or []:
        if not _ALIAS.match(a or "") or _RESERVED.match(a):
            raise InvalidInputError(
                f"invalid alias {a!r}: use letters, digits, '_' or '-' ('latest' and v<number> are reserved)"
            )
        if a not in out:
            out.append(a)
    return out


def decide(aliases, *, validation_passed: bool, version_status: str | None, version_tags: Mapping[str, str] | None,
           version_known: bool = True) -> Decision:
    """The promotion rule (pure): a :class:`Decision` from the :data:`RULES`.

    With ``version_known=False`` only the rules that do not read the version run (so a caller can refuse before
    reading the registry); an allowed decision then means "read the version and decide again".

    Raises:
        InvalidInputError: a malformed alias name (:func:`check_aliases`).
    """
    cand = Candidate(tuple(check_aliases(aliases)), bool(validation_passed), version_status, dict(version_tags or {}))
    for name, rule, reads_version in RULES:
        if reads_version and not version_known:
            continue
        reason = rule(cand)
        if reason:
            return Decision([], reason, name)
    return Decision(list(cand.aliases))


def promote(model_name: str, version, aliases, validation_passed: bool, tracking_uri: str | None = None) -> Promotion:
    """Point ``aliases`` at ``model_name`` version ``version`` if :func:`decide` allows it.

    If setting one alias fails, those already moved are put back where they were (best effort) and
    RegistryError names the alias and the cause.

    Raises:
        InvalidInputError: a malformed alias name.
        RegistryError: the version cannot be read, or an alias cannot be set.
    """
    version = str(version)
    wanted = check_aliases(aliases)
    early = decide(wanted, validation_passed=validation_passed, version_status=None, version_tags=None,
                   version_known=False)
    if not early.allowed:  # no registry call needed to refuse
        return Promotion(model_name, version, [], {}, early.reason)
    client = tracking.client(tracking_uri)
    step = f"read {model_name} version {version}"
    try:
        mv = client.get_model_version(model_name, version)
        decision = decide(wanted, validation_passed=validation_passed, version_status=mv.status,
                          version_tags=dict(mv.tags or {}))
        if not decision.allowed:
            return Promotion(model_name, version, [], {}, decision.reason)
        to_set = decision.aliases
        step = "read current aliases"
        current = {a: str(v) for a, v in (client.get_registered_model(model_name).aliases or {}).items()}
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        raise RegistryError(redact(f"promote {model_name} v{version}: {step} failed: {tracking.describe_error(err)}")) from None
    previous: dict[str, str | None] = {}
    for alias in to_set:
        try:
            client.set_registered_model_alias(model_name, alias, version)
            previous[alias] = current.get(alias)
        except Exception as err:  # noqa: BLE001
            _restore(client, model_name, previous)
            raise RegistryError(
                redact(f"promote {model_name} v{version}: set alias @{alias} failed: {tracking.describe_error(err)}")
            ) from None
    return Promotion(model_name, version, list(to_set), previous)


def _restore(client, model_name: str, previous: dict[str, str | None]) -> None:
    for alias, old in previous.items():
        try:
            if old is None:
                client.delete_registered_model_alias(model_name, alias)
            else:
                client.set_registered_model_alias(model_name, alias, old)
        except Exception:  # noqa: BLE001 - best effort; the error raised names the failed step
            pass
