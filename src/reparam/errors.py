"""Errors that the ``reparam`` command turns into one clear line and an exit code.

Every error a user can cause derives from :class:`ReparamError`; the CLI prints
``reparam: error: <message>`` and exits with ``exit_code``. Anything else is a bug
and exits with :data:`reparam.exitcodes.INTERNAL`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from . import exitcodes

if TYPE_CHECKING:  # annotations only: reparam.report is pure too, but errors stays at the bottom of the layers
    from .report import Report

#: The longest error line the ``reparam`` command prints, ``reparam: error: `` included (characters). The CLI's
#: error printer cuts longer messages there; messages themselves give counts and an example, never whole lists.
MAX_ERROR_CHARS = 300


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)`` (``str`` for exceptions) on one line, cut to ``limit`` characters with ``...``.

    For user-controlled values inside error messages (a key, an argument, a pickled name), whose size is unbounded.
    """
    text = str(value) if isinstance(value, BaseException) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def count_of(items: Iterable[Any], noun: str, *, examples: int = 1, limit: int = 60) -> str:
    """``"1,772 keys (e.g. 'model.0.conv.weight')"``: a count and the first ``examples`` items, each cut by
    :func:`brief`, instead of a whole list in an error message. ``noun`` is the plural; ``"0 keys"`` when empty."""
    items = list(items)
    shown = ", ".join(brief(x, limit) for x in items[:examples])
    return f"{len(items):,} {noun}" + (f" (e.g. {shown})" if shown else "")


class ReparamError(Exception):
    """Base of user-facing errors; ``str(err)`` names the problem and what to do."""

    exit_code: int = exitcodes.INTERNAL


class InvalidInputError(ReparamError):
    """The checkpoint, config, URI or option is unusable (exit 2)."""

    exit_code = exitcodes.INVALID_INPUT


class UnsafeCheckpointError(InvalidInputError):
    """The pickle references a global outside the allowlist; it was not called (exit 2)."""


class ValidationFailedError(ReparamError):
    """The deploy model's output differs from the dual model's main branch (exit 3).

    ``report``: the failed conversion's report (:class:`reparam.report.Report`, ``status: validation_failed``), set
    by the converter when it raises this, else ``None``. ``evaluation``: the failed ``--eval-data`` evaluation's
    report section (:func:`reparam.evaluation.conversion.evaluate_conversion`), set by the evaluation when its mAP
    check fails, else ``None``.
    """

    exit_code = exitcodes.VALIDATION_FAILED
    report: Report | None = None
    evaluation: dict[str, Any] | None = None


class SourceError(ReparamError):
    """A source could not be fetched: unreachable store, bad credentials, missing object (exit 4)."""

    exit_code = exitcodes.SOURCE_ERROR


class RegistryError(ReparamError):
    """Upload, registration or promotion in the MLflow Model Registry failed (exit 5)."""

    exit_code = exitcodes.REGISTRY_ERROR


class IntegrityError(ReparamError):
    """A local file's sha256 differs from the pinned one (``--sha256``): the wrong or a corrupted file (exit 6).

    Not retryable, unlike :class:`SourceError`: the same file gives the same hash. A download whose hash differs
    stays a :class:`SourceError` (a retry fetches the bytes again).
    """

    exit_code = exitcodes.INTEGRITY_ERROR
