"""The registration flow of ``reparam convert --register``: idempotency check, register, promote.

1. Before converting, :func:`find_previous` looks for a complete version of the registered model tagged with the
   same idempotency key (source sha256 + conversion settings; complete: MLflow status ``READY`` and our tags ready and
   validated, :func:`reparam.store.promotion.version_problem`). If there is one, the conversion is skipped and
   :func:`reuse` reports it: it sets the requested ``--tag`` values the version lacks or has with another value (tags
   are metadata, not conversion settings: no new version for them) and points the requested aliases at it (the
   promotion rule allows that because the version is complete).
2. Otherwise, after the conversion passed, :func:`register_conversion` registers the outputs as a new version
   (:func:`reparam.store.registry.register`) and then promotes it (:func:`reparam.store.promotion.promote`).

MLflow's HTTP client retries for minutes by default; unless the user set them, the retry settings are lowered so
that an unreachable registry fails within seconds (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, backoff factor 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import RegistryError
from ..report import Registry, Report, Source, Validation
from . import champion, promotion, registry, tracking
from .uris import redact


def _quick_failures() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def idempotency_key(source_sha256: str, settings_key: str) -> str:
    """The key that identifies "this source converted with these settings"."""
    return registry.idempotency_key(source_sha256, {"settings": settings_key})


def find_previous(model_name: str, key: str, aliases: list[str], tracking_uri: str | None, *,
                  tags: dict[str, str] | None = None,
                  log: Callable[[str], None] = lambda _m: None) -> dict[str, Any] | None:
    """Validate alias names and tags, then return the existing complete version for ``key`` (or None).

    Versions holding ``key`` that are not complete are named through ``log`` and left untouched.

    Raises InvalidInputError for a bad alias or a reserved tag, RegistryError when the registry cannot be queried.
    """
    _quick_failures()
    promotion.check_aliases(aliases)
    registry.check_user_tags(tags)
    return registry.find_existing(model_name, key, tracking_uri, log=log)


def _gated(name: str, version: Any, report: Report, gated: dict[str, Any] | None, tracking_uri: str | None,
           log: Callable[[str], None], *, existing: bool = False) -> dict[str, Any] | None:
    """Run :func:`champion.promote_gated` for ``gated`` (keys alias, gates, hold_alias, evaluate, dataset_source,
    probe: a :class:`promotion.Measured` naming the dataset digest and image size); None without ``gated``."""
    if not gated:
        return None
    measured = None
    if existing:  # nothing was converted: this version's own evaluation on this dataset (tags, else evaluate it)
        try:
            client = tracking.client(tracking_uri)
            measured = champion.holder_measured(client, name, str(version), gated["probe"], gated["evaluate"],
                                                gated.get("dataset_source"), log, tracking_uri)
        except RegistryError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
            raise RegistryError(redact(f"promote {name} v{version}: measure this version failed: "
                                       f"{tracking.describe_error(err)}")) from None
    return champion.promote_gated(name, version, gated["alias"], report, gated["gates"], evaluate=gated["evaluate"],
                                  tracking_uri=tracking_uri, hold_alias=gated.get("hold_alias"),
                                  dataset_source=gated.get("dataset_source"), log=log, measured=measured).to_dict()


def _add_gated(out: Registry, promo: dict[str, Any] | None) -> tuple[Registry, dict[str, Any] | None]:
    """``out`` and the gated outcome ``promo``; a promoted alias (and a held version's hold alias) also joins
    ``out.aliases``/``out.previous_aliases`` like an ungated one."""
    if not promo:
        return out, promo
    moved = promo["alias"] if promo["decision"] == "promoted" else promo.get("hold_alias")
    if moved and moved not in out.aliases:
        out.aliases.append(moved)
        if promo["decision"] == "promoted":
            out.previous_aliases[moved] = promo.get("previous_version")
    return out, promo


def _result(model_name: str, version: Any, model_uri: str | None, promo: promotion.Promotion | None,
            *, existing: bool, run_id: str | None = None, updated_tags: list[str] | None = None) -> Registry:
    return Registry(
        model_name=model_name,
        version=str(version),
        model_uri=model_uri or f"models:/{model_name}/{version}",
        run_id=run_id,
        aliases=list(promo.aliases) if promo else [],
        previous_aliases=dict(promo.previous) if promo else {},
        promotion_skipped=promo.skipped_reason if promo else "no alias requested",
        existing=existing,
        updated_tags=list(updated_tags or []),
    )


def _apply_tags(name: str, version: Any, tags: dict[str, str] | None, current: dict[str, str] | None,
                tracking_uri: str | None, log: Callable[[str], None]) -> list[str]:
    changed = registry.update_tags(name, version, tags, current, tracking_uri)
    if changed:
        log(f"updated tags on {name} version {version}: {', '.join(changed)}")
    return changed


def reuse(existing: dict[str, Any], aliases: list[str], tracking_uri: str | None, report: Report, *,
          tags: dict[str, str] | None = None, log: Callable[[str], None] = lambda _m: None,
          gated: dict[str, Any] | None = None) -> tuple[Registry, dict[str, Any] | None]:
    """Report an existing version instead of registering a new one: set the ``tags`` it lacks (or has with another
    value; ``updated_tags`` in the result lists them), then point ``aliases`` at it, and with ``gated`` (see
    :func:`register_conversion`) decide the gated alias for it (its evaluation read from its tags, or evaluated).
    ``report`` is the no-op's report (:func:`reused_report`). Returns the report's ``registry`` and ``promotion``
    sections (``None`` without ``gated``).

    Raises InvalidInputError for a reserved tag, RegistryError when a tag or an alias cannot be set.
    """
    name, version = existing["model_name"], existing["version"]
    changed = _apply_tags(name, version, tags, existing.get("tags"), tracking_uri, log)
    promo = promotion.promote(name, version, aliases, True, tracking_uri) if aliases else None
    out = _result(name, version, existing.get("model_uri"), promo, existing=True, run_id=existing.get("run_id"),
                  updated_tags=changed)
    return _add_gated(out, _gated(name, version, report, gated, tracking_uri, log, existing=True))


def register_conversion(
    report: Report,
    out_dir: Path,
    *,
    model_name: str,
    aliases: list[str],
    tags: dict[str, str],
    key: str,
    lineage: dict[str, Any] | None,
    tracking_uri: str | None,
    log: Callable[[str], None] = lambda _m: None,
    wait_s: float = tracking.REGISTRY_WAIT_S,
    gated: dict[str, Any] | None = None,
) -> tuple[Registry, dict[str, Any] | None]:
    """Register the validated outputs in ``out_dir`` and promote them; returns the report's ``registry`` and
    ``promotion`` sections.

    ``aliases`` move by the promotion rule alone; ``gated`` (``--promote``: keys ``alias``, ``gates``
    (:class:`promotion.Gates`), ``hold_alias``, ``evaluate`` (:data:`champion.Evaluator`), ``dataset_source``,
    ``probe``) moves one alias by the gates and the race protocol of :mod:`reparam.store.champion`; its outcome is
    the ``promotion`` section (``None`` without ``gated``).

    Raises RegistryError (naming the failed step) from :func:`registry.register` / :func:`promotion.promote`; a
    failed registration leaves no version that looks good and moves no alias.
    """
    _quick_failures()
    reg = registry.register(model_name, out_dir, report, tags=tags, lineage=lineage, idempotency_key=key,
                            tracking_uri=tracking_uri, wait_s=wait_s)
    log(f"registered {reg.model_uri}" + ("" if reg.created else " (an identical version already existed)"))
    # an identical version registered meanwhile (a concurrent conversion) gets the tags as in reuse()
    changed = [] if reg.created else _apply_tags(model_name, reg.version, tags, reg.tags, tracking_uri, log)
    passed = report.validation.passed is True
    promo = promotion.promote(model_name, reg.version, aliases, passed, tracking_uri) if aliases else None
    if promo and promo.aliases:
        log(f"aliases {', '.join(promo.aliases)} -> version {reg.version}")
    elif promo and promo.skipped_reason:
        log(f"no alias moved: {promo.skipped_reason}")
    out = _result(model_name, reg.version, reg.model_uri, promo, existing=not reg.created, run_id=reg.run_id,
                  updated_tags=changed)
    return _add_gated(out, _gated(model_name, reg.version, report, gated, tracking_uri, log))


def reused_report(existing: dict[str, Any], *, source: Source, command: list[str],
                  versions: dict[str, str | None]) -> Report:
    """The report of the no-op path (an identical conversion is registered already): the facts recovered from the
    existing version's tags (``reused``: nothing converted, the rest is not written)."""
    t = existing.get("tags") or {}
    p = registry.TAG_PREFIX

    def num(name: str, cast: Callable[[str], Any] = int) -> Any:
        try:
            return cast(t[p + name])
        except (KeyError, ValueError):
            return None

    return Report(status="succeeded", command=command, versions=versions, source=source, reused=True,
                  deploy_sha256=t.get(p + "deploy_sha256"), params_before=num("params_before"),
                  params_after=num("params_after"),
                  validation=Validation(passed=True, max_abs_diff=num("max_abs_diff", float)),
                  variant=t.get(p + "variant"), nc=num("nc"))
