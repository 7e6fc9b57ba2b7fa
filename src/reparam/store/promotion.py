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

Gated promotion (``reparam convert --promote ALIAS``, issue #11): for a :class:`Candidate` with ``gates`` set, the
alias moves only if additionally

5. ``evaluated``: the conversion was evaluated (``--eval-data``),
6. ``artifacts``: every evaluated deploy artifact passed (its mAP within ``--eval-atol`` of the dual model's),
7. ``min_map``: its mAP@0.5:0.95 >= ``--min-map`` (when given),
8. ``regression``: when another version holds the alias, that version's mAP@0.5:0.95 measured on the **same
   dataset digest and image size** exceeds ours by at most ``--max-regression`` (default 0: not worse). A holder
   without metrics for this dataset refuses with rule ``champion_unmeasured`` (the caller evaluates it first).

The first version of a model (no holder) passes rule 8. The mAP compared is the deploy ``.pt``'s (what a champion
is re-evaluated from), else the dual model's. Which mAP: :data:`reparam.spec.DEFAULT_PROMOTION_METRIC` (``mask``):
a segmentation model evaluated on polygon labels is compared on its mask mAP@0.5:0.95, every other model on its box
mAP@0.5:0.95 (:attr:`Measured.metric`); a holder measured without masks counts as unmeasured for a mask comparison.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from .. import spec
from ..errors import InvalidInputError, RegistryError
from . import tracking
from .uris import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_STATUS = "reparam.status"
TAG_VALIDATION = "reparam.validation_passed"
STATUS_READY = "ready"
#: MLflow's ``ModelVersionStatus`` of a complete model version (as the client returns it, a string)
MLFLOW_READY = "READY"



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
class Measured:
    """One model's evaluation as the gates compare it.

    Attributes:
        digest: the dataset's sha256 digest (:mod:`reparam.evaluation.dataset`).
        imgsz: the evaluation image size in pixels.
        map50_95, map50: COCO box mAP@0.5:0.95 and mAP@0.5, in [0, 1].
        mask_map50_95, mask_map50: COCO mask mAP@0.5:0.95 and mAP@0.5 of a segmentation model on polygon labels,
            None otherwise.
    """

    digest: str
    imgsz: int
    map50_95: float
    map50: float | None = None
    mask_map50_95: float | None = None
    mask_map50: float | None = None

    @property
    def metric(self) -> str:
        """The metric the gates compare (:data:`reparam.spec.DEFAULT_PROMOTION_METRIC`): ``mask`` when measured
        and chosen, else ``box``."""
        if spec.DEFAULT_PROMOTION_METRIC == "mask" and self.mask_map50_95 is not None:
            return "mask"
        return "box"

    def score(self, metric: str) -> float | None:
        """mAP@0.5:0.95 of ``metric`` (``box`` or ``mask``; None when not measured)."""
        return self.mask_map50_95 if metric == "mask" else self.map50_95

    @property
    def primary(self) -> float:
        """The mAP@0.5:0.95 the gates compare (of :attr:`metric`)."""
        value = self.score(self.metric)
        assert value is not None
        return value

    @property
    def label(self) -> str:
        """``mAP@0.5:0.95`` or ``mask mAP@0.5:0.95``, for messages."""
        return "mask mAP@0.5:0.95" if self.metric == "mask" else "mAP@0.5:0.95"

    def same_data(self, other: "Measured | None") -> bool:
        """Whether ``other`` was measured on the same dataset digest and image size, with the metric we compare."""
        return (other is not None and other.digest == self.digest and int(other.imgsz) == int(self.imgsz)
                and other.score(self.metric) is not None)

    def held_score(self, other: "Measured") -> float:
        """``other``'s value of the metric we compare (:meth:`same_data` must hold)."""
        value = other.score(self.metric)
        assert value is not None
        return value


@dataclasses.dataclass(frozen=True)
class Gates:
    """The gates of ``--promote`` (rules 5-8 of the module docstring).

    Attributes:
        min_map: lowest mAP@0.5:0.95 allowed, or None.
        max_regression: how much lower than the holder's mAP@0.5:0.95 ours may be (>= 0).
    """

    min_map: float | None = None
    max_regression: float = 0.0


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What the promotion rule reads about one model version (no registry access).

    Attributes:
        aliases: the aliases requested (validated, deduplicated).
        validation_passed: the conversion's equivalence check passed.
        version_status: MLflow's ``ModelVersion.status`` string.
        version_tags: the version's tags.
        gates: the ``--promote`` gates, or None for an ungated alias (rules 5-8 then do not apply).
        measured: this version's evaluation (None: not evaluated).
        artifacts_passed: every evaluated artifact passed.
        holder: the version holding the alias now (None: nobody), and ``holder_measured`` its evaluation on
            this dataset (None: not measured on it).
    """

    aliases: tuple[str, ...]
    validation_passed: bool
    version_status: str | None
    version_tags: Mapping[str, str]
    gates: Gates | None = None
    measured: Measured | None = None
    artifacts_passed: bool = True
    holder: str | None = None
    holder_measured: Measured | None = None
    version: str | None = None


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


def _evaluated(c: Candidate) -> str | None:
    if c.gates is None or c.measured is not None:
        return None
    return "not evaluated (gated promotion needs --eval-data)"


def _artifacts(c: Candidate) -> str | None:
    if c.gates is None or c.artifacts_passed:
        return None
    return "an evaluated deploy artifact failed (its mAP differs from the dual model's by more than --eval-atol)"


def _min_map(c: Candidate) -> str | None:
    if c.gates is None or c.gates.min_map is None or c.measured is None:
        return None
    if c.measured.primary >= c.gates.min_map:
        return None
    return f"min_map: {c.measured.label} {c.measured.primary:.4f} is below --min-map {c.gates.min_map:g}"


def _holder_measured(c: Candidate) -> str | None:
    if c.gates is None or c.holder is None or c.holder == c.version or c.measured is None:
        return None
    if c.measured.same_data(c.holder_measured):
        return None
    what = " with masks" if c.measured.metric == "mask" else ""
    return (f"version {c.holder} holds the alias and has no evaluation{what} on dataset {c.measured.digest[:12]} "
            f"at {c.measured.imgsz} px")


def _regression(c: Candidate) -> str | None:
    if c.gates is None or c.holder is None or c.holder == c.version or c.measured is None:
        return None
    held = c.holder_measured
    assert held is not None  # _holder_measured ran first
    ours, theirs = c.measured.primary, c.measured.held_score(held)
    if ours >= theirs - c.gates.max_regression:
        return None
    return (f"regression: {c.measured.label} {ours:.4f} is below version {c.holder}'s "
            f"{theirs:.4f} by {theirs - ours:.4f} "
            f"(> --max-regression {c.gates.max_regression:g}) on dataset {c.measured.digest[:12]}")


#: The rules, in order: (name, rule, whether it reads the version's status/tags); the first rule that returns a
#: reason refuses the promotion.
RULES: tuple[tuple[str, Callable[[Candidate], str | None], bool], ...] = (
    ("requested", _requested, False),
    ("validation", _validated, False),
    ("evaluated", _evaluated, False),
    ("artifacts", _artifacts, False),
    ("min_map", _min_map, False),
    ("version_complete", _version_complete, True),
    ("champion_unmeasured", _holder_measured, True),
    ("regression", _regression, True),
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


def check_aliases(aliases: Iterable[str] | None) -> list[str]:
    """Validate alias names (deduplicated, order kept) by MLflow's rules (:func:`reparam.spec.alias_problem`).

    Raises:
        InvalidInputError: names the first bad alias and why.
    """
    try:
        return spec.check_aliases(aliases)
    except spec.SpecError as err:
        raise InvalidInputError(str(err)) from None


def decide(aliases: Iterable[str], *, validation_passed: bool, version_status: str | None,
           version_tags: Mapping[str, str] | None, version_known: bool = True, gates: Gates | None = None,
           measured: Measured | None = None,
           artifacts_passed: bool = True, holder: str | None = None, holder_measured: Measured | None = None,
           version: str | None = None) -> Decision:
    """The promotion rule (pure): a :class:`Decision` from the :data:`RULES`.

    With ``version_known=False`` only the rules that do not read the registry (the version, the alias holder) run,
    so a caller can refuse before reading it; an allowed decision then means "read the registry and decide again".
    ``gates`` (None: an ungated ``--alias``) switches on rules 5-8; ``holder`` is the version holding the alias now
    and ``version`` the candidate's own number (a holder equal to it is no competitor).

    Raises:
        InvalidInputError: a malformed alias name (:func:`check_aliases`).
    """
    cand = Candidate(tuple(check_aliases(aliases)), bool(validation_passed), version_status, dict(version_tags or {}),
                     gates, measured, bool(artifacts_passed), None if holder is None else str(holder), holder_measured,
                     None if version is None else str(version))
    for name, rule, reads_version in RULES:
        if reads_version and not version_known:
            continue
        reason = rule(cand)
        if reason:
            return Decision([], reason, name)
    return Decision(list(cand.aliases))


def promote(model_name: str, version: str | int, aliases: Iterable[str], validation_passed: bool,
            tracking_uri: str | None = None) -> Promotion:
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
        raise RegistryError(
            redact(f"promote {model_name} v{version}: {step} failed: {tracking.describe_error(err)}")) from None
    previous: dict[str, str | None] = {}
    for alias in to_set:
        try:
            client.set_registered_model_alias(model_name, alias, version)
            previous[alias] = current.get(alias)
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
            _restore(client, model_name, previous)
            raise RegistryError(
                redact(f"promote {model_name} v{version}: set alias @{alias} failed: {tracking.describe_error(err)}")
            ) from None
    return Promotion(model_name, version, list(to_set), previous)


def _restore(client: MlflowClient, model_name: str, previous: dict[str, str | None]) -> None:
    for alias, old in previous.items():
        try:
            if old is None:
                client.delete_registered_model_alias(model_name, alias)
            else:
                client.set_registered_model_alias(model_name, alias, old)
        except Exception:  # noqa: BLE001 - best effort; the error raised names the failed step
            pass
