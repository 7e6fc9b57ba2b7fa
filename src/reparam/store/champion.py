"""Gated promotion (``reparam convert --promote ALIAS``): champion metrics, the gates, and moving the alias.

The gates themselves are pure rules of :mod:`reparam.store.promotion` (rules 5-8); this module reads and writes
the registry around them:

* **Metrics on a version.** :func:`record_evaluation` writes the tags ``reparam.eval.digest``, ``reparam.eval.imgsz``,
  ``reparam.eval.map50_95``, ``reparam.eval.map50`` (box), for a segmentation model on polygon labels also
  ``reparam.eval.mask_map50_95``, ``reparam.eval.mask_map50``, and ``reparam.eval.metric`` (the one compared) (the
  latest) and ``reparam.eval.d-<digest[:16]>-<imgsz>`` (one per dataset, :func:`eval_tags`) on the model version,
  and logs ``eval_map50_95`` / ``eval_map50`` (and ``eval_mask_map50_95`` / ``eval_mask_map50``) as metrics of the
  version's run, linked to its MLflow 3 logged model (``Metric.model_id``) and to
  the dataset (``Metric.dataset_name`` / ``dataset_digest``), with the dataset logged as a run input
  (``MlflowClient.log_inputs``, source type ``reparam``). MLflow's dataset digest column holds at most 36
  characters (``datasets.digest`` in MLflow's SQL schema), so the MLflow dataset digest is the first 32 hex digits
  of the sha256; the tag keeps all of it.
* **Champion without metrics for this dataset.** :func:`holder_measured` downloads the holder's registered
  artifacts (``models:/NAME/VERSION``), evaluates its deploy ``.pt`` with the caller's evaluator (the same settings
  as the new version) and records the result on the holder too.
* **Race protocol** (:func:`promote_gated`). MLflow has no compare-and-set for aliases
  (``set_registered_model_alias`` overwrites unconditionally), so the protocol is optimistic:

  1. read the holder H of the alias; measure it on this dataset (tags, else evaluate it); decide;
  2. held: tag ``reparam.promotion = held`` + ``reparam.promotion_reason``, set ``--hold-alias`` if given; stop;
  3. re-read the holder right before setting: if it is no longer H, go back to 1 (the decision is stale);
  4. set the alias to our version;
  5. re-read the holder after setting (verify): if it is ours, we are promoted. If another conversion moved it
     meanwhile to version W, measure W: if W is not worse than ours (mAP@0.5:0.95 >= ours), we yield (held,
     reason ``superseded by version W``); if W is worse, set the alias back to ours and verify again.

  Both racers follow the same rule with a strict comparison, so only the better of two can take the alias back:
  the alias never stays on the worse model once both conversions finished. Steps 1-5 are bounded
  (:data:`MAX_ROUNDS`); the remaining window is a racer that tagged itself ``promoted`` at step 5 just before the
  better one set the alias back: its tag then says it was promoted once, the alias says who holds it now.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import RegistryError
from ..report import Report
from . import promotion, registry, tracking
from .promotion import Gates, Measured
from .uris import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

TAG_PROMOTION = "reparam.promotion"
TAG_PROMOTION_REASON = "reparam.promotion_reason"
TAG_EVAL = "reparam.eval."
#: steps 1-5 of the race protocol are repeated at most this often
MAX_ROUNDS = 5
#: characters of the sha256 used as MLflow's dataset digest (its column holds 36)
MLFLOW_DIGEST_CHARS = 32

#: evaluates a downloaded deploy ``.pt`` on the conversion's dataset with its settings
Evaluator = Callable[[Path], Measured]


def measured_from_report(report: Report) -> tuple[Measured | None, bool]:
    """This conversion's evaluation as the gates see it, and whether every evaluated artifact passed.

    The mAP is the deploy ``.pt``'s (what a champion is re-evaluated from), else the dual model's; box, and mask
    for a segmentation model evaluated on polygon labels. ``(None, True)`` when the report has no ``evaluation``
    section.
    """
    ev = report.evaluation
    if not ev:
        return None, True
    done = [a for a in ev.get("artifacts") or [] if not a.get("skipped")]
    passed = all(bool(a.get("passed")) for a in done)
    pt = [a for a in done if a.get("format") == "pt"]
    best = pt[0] if pt else ev["dual"]
    imgsz = int((ev.get("settings") or {}).get("imgsz") or (report.options or {}).get("eval_imgsz") or 0)
    masks = best.get("masks") or {}  # the dual entry: a nested MaskMetrics dict; an artifact entry: flat keys
    mask_map50_95 = _float(best.get("mask_map50_95", masks.get("map50_95")))
    mask_map50 = _float(best.get("mask_map50", masks.get("map50")))
    return Measured(ev["dataset"]["digest"], imgsz, float(best["map50_95"]), _float(best.get("map50")),
                    mask_map50_95, mask_map50), passed


def _float(v: Any) -> float | None:
    """``float(v)``, or None for a value that is not a number (a missing or malformed tag)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _dataset_key(digest: str, imgsz: int) -> str:
    return f"{TAG_EVAL}d-{digest[:16]}-{int(imgsz)}"


def eval_tags(m: Measured) -> dict[str, str]:
    """The version tags that hold one evaluation: the latest one (``reparam.eval.digest``, ``.imgsz``,
    ``.map50_95``, ``.map50``, with masks ``.mask_map50_95``, ``.mask_map50``; ``.metric``: the one compared) and
    one tag per dataset and image size (``reparam.eval.d-<digest[:16]>-<imgsz>`` = ``map50_95,map50`` or, with
    masks, ``map50_95,map50,mask_map50_95,mask_map50``), so a version evaluated on several datasets keeps each
    result."""
    def text(v: float | None) -> str:
        return "" if v is None else repr(v)

    out = {f"{TAG_EVAL}digest": m.digest, f"{TAG_EVAL}imgsz": str(int(m.imgsz)),
           f"{TAG_EVAL}map50_95": repr(m.map50_95), f"{TAG_EVAL}metric": m.metric}
    if m.map50 is not None:
        out[f"{TAG_EVAL}map50"] = repr(m.map50)
    values = [repr(m.map50_95), text(m.map50)]
    if m.mask_map50_95 is not None:
        out[f"{TAG_EVAL}mask_map50_95"] = repr(m.mask_map50_95)
        if m.mask_map50 is not None:
            out[f"{TAG_EVAL}mask_map50"] = repr(m.mask_map50)
        values += [repr(m.mask_map50_95), text(m.mask_map50)]
    out[_dataset_key(m.digest, m.imgsz)] = ",".join(values)
    return out


def measured_from_tags(tags: dict[str, str] | None, digest: str | None = None, imgsz: int | None = None
                       ) -> Measured | None:
    """The evaluation recorded in a version's tags (:func:`eval_tags`): the one on ``digest`` at ``imgsz`` when
    given (None if it has none), else the latest one (None if none)."""
    t = tags or {}
    try:
        if digest is not None and imgsz is not None:
            value = t.get(_dataset_key(digest, imgsz))
            if value is None:
                return None
            parts = (value.split(",") + ["", "", ""])[:4]
            return Measured(digest, int(imgsz), float(parts[0]), _float(parts[1]), _float(parts[2]),
                            _float(parts[3]))
        return Measured(t[f"{TAG_EVAL}digest"], int(t[f"{TAG_EVAL}imgsz"]), float(t[f"{TAG_EVAL}map50_95"]),
                        _float(t.get(f"{TAG_EVAL}map50")), _float(t.get(f"{TAG_EVAL}mask_map50_95")),
                        _float(t.get(f"{TAG_EVAL}mask_map50")))
    except (KeyError, ValueError):
        return None


def record_evaluation(client: MlflowClient, model_name: str, mv: ModelVersion, m: Measured, source: str | None) -> None:
    """Write ``m`` on model version ``mv``: tags, and metrics on its run + logged model linked to the dataset."""
    import time

    from mlflow.entities import Dataset, DatasetInput, Metric

    for k, v in eval_tags(m).items():
        client.set_model_version_tag(model_name, mv.version, k, v)
    run_id = mv.run_id or None
    if not run_id:
        return
    name = f"reparam-eval-{m.digest[:12]}"
    digest = m.digest[:MLFLOW_DIGEST_CHARS]
    model_id = registry.model_id_of(mv)
    client.log_inputs(run_id, datasets=[DatasetInput(Dataset(name, digest, "reparam", redact(source or "")))])
    now = int(time.time() * 1000)
    metrics = [Metric("eval_map50_95", m.map50_95, now, 0, model_id=model_id, dataset_name=name, dataset_digest=digest)]
    for key, value in (("eval_map50", m.map50), ("eval_mask_map50_95", m.mask_map50_95),
                       ("eval_mask_map50", m.mask_map50)):
        if value is not None:
            metrics.append(Metric(key, value, now, 0, model_id=model_id, dataset_name=name, dataset_digest=digest))
    client.log_batch(run_id, metrics=metrics)


def holder_measured(client: MlflowClient, model_name: str, holder: str, ours: Measured, evaluate: Evaluator,
                    source: str | None, log: Callable[[str], None], tracking_uri: str | None = None) -> Measured:
    """Version ``holder``'s evaluation on ``ours``'s dataset and image size: from its tags (when they hold the metric
    ``ours`` compares, :meth:`Measured.same_data`), else evaluated now (its registered deploy ``.pt`` downloaded)
    and recorded on it.

    Raises:
        RegistryError: the version has no ``.pt`` deploy file, or cannot be read or downloaded.
    """
    mv = client.get_model_version(model_name, holder)
    known = measured_from_tags(dict(mv.tags or {}), ours.digest, ours.imgsz)
    if known is not None and ours.same_data(known):
        return known
    log(f"version {holder} has no evaluation on dataset {ours.digest[:12]} at {ours.imgsz} px: evaluating it")
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="reparam-champion-") as work:
        # the version's own artifact location (a models:/m-... URI or a store path): resolved through this
        # client's registry, not the process-wide default registry URI
        where = client.get_model_version_download_uri(model_name, holder)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=work,
                                                         tracking_uri=tracking.resolve_tracking_uri(tracking_uri)))
        pts = sorted(p for p in local.rglob("*.pt") if p.is_file())
        if not pts:
            raise RegistryError(f"{model_name} version {holder} holds the alias but has no .pt deploy file to "
                                "evaluate; move the alias by hand or register it again")
        m = evaluate(pts[0])
    record_evaluation(client, model_name, mv, m, source)
    log(f"version {holder}: {m.label} {m.primary:.4f} on dataset {m.digest[:12]}")
    return m


@dataclasses.dataclass
class GatedPromotion:
    """What :func:`promote_gated` decided (the report's ``promotion`` section, :meth:`to_dict`).

    ``map50_95`` / ``previous_map50_95`` are the compared metric's (``metric``: ``box`` or ``mask``,
    :attr:`Measured.metric`)."""

    alias: str
    decision: str  # "promoted" | "held"
    reason: str | None
    rule: str | None
    previous_version: str | None
    compared_on_digest: str | None
    map50_95: float | None
    previous_map50_95: float | None = None
    hold_alias: str | None = None
    metric: str = "box"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(model_name).aliases or {}
    v = aliases.get(alias)
    return None if v is None else str(v)


def promote_gated(model_name: str, version: str | int, alias: str, report: Report, gates: Gates, *,
                  evaluate: Evaluator, tracking_uri: str | None, hold_alias: str | None = None,
                  dataset_source: str | None = None, log: Callable[[str], None] = lambda _m: None,
                  measured: Measured | None = None, _after_set: Callable[[], None] | None = None) -> GatedPromotion:
    """Decide by the gates and move ``alias`` to ``version`` by the race protocol of the module docstring.

    Also records this version's evaluation (:func:`record_evaluation`) and the decision tags. ``_after_set`` runs
    between step 4 and 5 (tests use it to play the other conversion). ``measured`` replaces the report's
    evaluation (an existing version reused by the idempotency check, measured by :func:`holder_measured`).

    Raises:
        RegistryError: a registry read or write failed (naming the step).
    """
    version = str(version)
    from_report, artifacts_ok = measured_from_report(report)
    measured = measured or from_report
    passed = report.validation.passed is True
    client = tracking.client(tracking_uri)
    step = f"read {model_name} version {version}"
    try:
        mv = client.get_model_version(model_name, version)
        if from_report is not None and measured is not None:
            step = "record the evaluation"
            record_evaluation(client, model_name, mv, measured, dataset_source)
            mv = client.get_model_version(model_name, version)
        holder = None
        held_m: Measured | None = None
        decision = None
        for _round in range(MAX_ROUNDS):
            step = f"read alias @{alias}"
            holder = _holder(client, model_name, alias)
            held_m = None
            if holder is not None and holder != version and measured is not None:
                step = f"measure version {holder}"
                held_m = holder_measured(client, model_name, holder, measured, evaluate, dataset_source, log,
                                         tracking_uri)
            decision = promotion.decide([alias], validation_passed=passed, version_status=mv.status,
                                        version_tags=dict(mv.tags or {}), gates=gates, measured=measured,
                                        artifacts_passed=artifacts_ok, holder=holder, holder_measured=held_m,
                                        version=version)
            if not decision.allowed:
                return _hold(client, model_name, version, alias, decision.reason or "", decision.rule, holder, held_m,
                             measured, hold_alias, log)
            step = f"re-read alias @{alias}"
            if _holder(client, model_name, alias) != holder:
                log(f"alias @{alias} moved while deciding; deciding again")
                continue
            step = f"set alias @{alias}"
            client.set_registered_model_alias(model_name, alias, version)
            if _after_set:
                _after_set()
            for _verify in range(MAX_ROUNDS):
                step = f"verify alias @{alias}"
                now = _holder(client, model_name, alias)
                if now == version:
                    break
                if now is None:  # deleted meanwhile: set it again
                    client.set_registered_model_alias(model_name, alias, version)
                    continue
                assert measured is not None
                step = f"measure version {now}"
                other = holder_measured(client, model_name, now, measured, evaluate, dataset_source, log, tracking_uri)
                theirs = other.score(measured.metric)
                if theirs is not None and theirs >= measured.primary:
                    return _hold(client, model_name, version, alias,
                                 f"superseded: version {now} took @{alias} meanwhile with {measured.label} "
                                 f"{theirs:.4f} >= {measured.primary:.4f}", "superseded", now, other,
                                 measured, hold_alias, log)
                log(f"version {now} took @{alias} meanwhile with a lower {measured.label} ({theirs}); "
                    "setting it back")
                client.set_registered_model_alias(model_name, alias, version)
            step = "tag the decision"
            client.set_model_version_tag(model_name, version, TAG_PROMOTION, "promoted")
            client.set_model_version_tag(model_name, version, TAG_PROMOTION_REASON,
                                         "passed the gates"
                                         + (f" against version {holder}" if holder and holder != version else ""))
            log(f"@{alias} -> version {version} (promoted" + (f"; previous version {holder})" if holder else ")"))
            return GatedPromotion(alias, "promoted", None, None, holder if holder != version else None,
                                  measured.digest if measured else None, measured.primary if measured else None,
                                  measured.held_score(held_m) if measured and held_m else None,
                                  metric=measured.metric if measured else "box")
        return _hold(client, model_name, version, alias, f"alias @{alias} kept moving for {MAX_ROUNDS} rounds",
                     "race", holder, held_m, measured, hold_alias, log)
    except RegistryError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        raise RegistryError(
            redact(f"promote {model_name} v{version}: {step} failed: {tracking.describe_error(err)}")) from None


def _hold(client: MlflowClient, model_name: str, version: str, alias: str, reason: str, rule: str | None,
          holder: str | None, held_m: Measured | None, measured: Measured | None, hold_alias: str | None,
          log: Callable[[str], None]) -> GatedPromotion:
    client.set_model_version_tag(model_name, version, TAG_PROMOTION, "held")
    client.set_model_version_tag(model_name, version, TAG_PROMOTION_REASON, reason[:4000])
    if hold_alias:
        client.set_registered_model_alias(model_name, hold_alias, version)
    log(f"held: @{alias} not moved ({reason})" + (f"; @{hold_alias} -> version {version}" if hold_alias else ""))
    previous = None
    if measured is not None and held_m is not None:
        previous = held_m.score(measured.metric)
    return GatedPromotion(alias, "held", reason, rule, holder if holder != version else None,
                          measured.digest if measured else None, measured.primary if measured else None,
                          previous, hold_alias, measured.metric if measured else "box")
