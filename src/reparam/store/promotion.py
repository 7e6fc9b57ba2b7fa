"""The promotion rule: which aliases may point at a model version, and moving them.

Rule (one place): an alias is set on a version only when the conversion's equivalence check passed
AND the registry marks that version ready and validated (tags ``reparam.status = ready`` and
``reparam.validation_passed = true``, written by :func:`reparam.store.registry.register` as its last
step). An existing alias moves to the new version only then; otherwise nothing changes. Aliases, not
stages (MLflow deprecated stages).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .. import spec
from ..errors import InvalidInputError, RegistryError
from . import tracking
from .uris import redact

TAG_STATUS = "reparam.status"
TAG_VALIDATION = "reparam.validation_passed"
STATUS_READY = "ready"



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


def check_aliases(aliases: Iterable[str] | None) -> list[str]:
    """Validate alias names (deduplicated, order kept) by MLflow's rules (:func:`reparam.spec.alias_problem`).

    Raises:
        InvalidInputError: names the first bad alias and why.
    """
    try:
        return spec.check_aliases(aliases)
    except spec.SpecError as err:
        raise InvalidInputError(str(err)) from None


def decide(aliases, *, validation_passed: bool, version_tags: dict) -> tuple[list[str], str | None]:
    """The promotion rule (pure): (aliases to set, reason none are set or None)."""
    aliases = check_aliases(aliases)
    if not aliases:
        return [], "no alias requested"
    if not validation_passed:
        return [], "validation did not pass"
    if version_tags.get(TAG_STATUS) != STATUS_READY:
        return [], f"version is not ready ({TAG_STATUS}={version_tags.get(TAG_STATUS)!r})"
    if str(version_tags.get(TAG_VALIDATION, "")).lower() != "true":
        return [], f"version is not marked validated ({TAG_VALIDATION}={version_tags.get(TAG_VALIDATION)!r})"
    return aliases, None


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
    if not wanted:
        return Promotion(model_name, version, [], {}, "no alias requested")
    if not validation_passed:  # no registry call needed to refuse
        return Promotion(model_name, version, [], {}, "validation did not pass")
    client = tracking.client(tracking_uri)
    step = f"read {model_name} version {version}"
    try:
        mv = client.get_model_version(model_name, version)
        to_set, reason = decide(wanted, validation_passed=validation_passed, version_tags=dict(mv.tags or {}))
        if reason:
            return Promotion(model_name, version, [], {}, reason)
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
