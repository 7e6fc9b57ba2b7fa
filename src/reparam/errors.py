"""Errors that the ``reparam`` command turns into one clear line and an exit code.

Every error a user can cause derives from :class:`ReparamError`; the CLI prints
``reparam: error: <message>`` and exits with ``exit_code``. Anything else is a bug
and exits with :data:`reparam.exitcodes.INTERNAL`.
"""

from __future__ import annotations

from . import exitcodes


class ReparamError(Exception):
    """Base of user-facing errors; ``str(err)`` names the problem and what to do."""

    exit_code: int = exitcodes.INTERNAL


class InvalidInputError(ReparamError):
    """The checkpoint, config, URI or option is unusable (exit 2)."""

    exit_code = exitcodes.INVALID_INPUT


class UnsafeCheckpointError(InvalidInputError):
    """The pickle references a global outside the allowlist; it was not called (exit 2)."""


class ValidationFailedError(ReparamError):
    """The deploy model's output differs from the dual model's main branch (exit 3)."""

    exit_code = exitcodes.VALIDATION_FAILED


class SourceError(ReparamError):
    """A source could not be fetched: unreachable store, bad credentials, missing object (exit 4)."""

    exit_code = exitcodes.SOURCE_ERROR


class RegistryError(ReparamError):
    """Upload, registration or promotion in the MLflow Model Registry failed (exit 5)."""

    exit_code = exitcodes.REGISTRY_ERROR
