"""Exit codes of the ``reparam`` command, one meaning each.

The operator's Job ``podFailurePolicy`` keys on these: ``INVALID_INPUT`` and
``VALIDATION_FAILED`` (and ``INTEGRITY_ERROR``) fail the Job at once (retrying cannot help), the others
may be retried. This module imports nothing heavy so the operator can use it.
"""

OK = 0
#: Unexpected internal error (a bug); retrying may or may not help.
INTERNAL = 1
#: The input is unusable: not a checkpoint, unknown block, bad URI, bad flags.
INVALID_INPUT = 2
#: The deploy model did not match the dual model within tolerance.
VALIDATION_FAILED = 3
#: The source could not be fetched (network, credentials, missing object).
SOURCE_ERROR = 4
#: Upload / registration / promotion in the model registry failed.
REGISTRY_ERROR = 5
#: A local source's bytes do not have the pinned ``--sha256``: the wrong file, or a corrupted one. Reading it
#: again gives the same bytes, so unlike a download (exit 4) a retry cannot help.
INTEGRITY_ERROR = 6

#: Exit codes for which a retry cannot succeed (used by the Job's podFailurePolicy).
PERMANENT = (INVALID_INPUT, VALIDATION_FAILED, INTEGRITY_ERROR)

#: CamelCase reason of each failure exit code: the termination summary's ``reason`` and the operator's
#: condition reasons.
REASONS = {
    INTERNAL: "InternalError",
    INVALID_INPUT: "InvalidInput",
    VALIDATION_FAILED: "ValidationFailed",
    SOURCE_ERROR: "SourceError",
    REGISTRY_ERROR: "RegistryError",
    INTEGRITY_ERROR: "IntegrityError",
}
