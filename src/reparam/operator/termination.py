"""Why a converter container ended when the converter itself could not say: one table, pure functions.

The converter writes a JSON summary to its termination message (``reparam.summary``) for every end it
controls (exit codes of :mod:`reparam.exitcodes`). When the container is killed from outside, Kubernetes is the
only witness: the container's ``state.terminated`` carries ``exitCode`` (128 + signal number for a signal, see
the Kubernetes docs "Debug Running Pods" / POSIX shell convention) and a ``reason``. The kubelet reports the
kernel OOM killer as ``reason: OOMKilled``, but not always: a cgroup-v2 kill of the whole pod, a kill by the
container runtime or a node-pressure kill can leave ``reason: Error`` with exit code 137 (SIGKILL). Both are
mapped here to a reason and a message a user can act on; the operator uses nothing else for them.
"""

from __future__ import annotations

import dataclasses

#: Signal number -> name, for exit codes 128 + n (Linux numbering).
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 7: "SIGBUS", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """A container end in words: ``reason`` (CamelCase, for ``lastFailure.reason`` and conditions) and ``message``."""

    reason: str
    message: str


def _limit_text(memory_limit: str | None) -> str:
    return f"the memory limit ({memory_limit})" if memory_limit else "the memory limit (none set on the container)"


def explain(exit_code: int | None, k8s_reason: str, memory_limit: str | None) -> Explanation | None:
    """Explain a container termination the converter did not describe itself; ``None`` when there is nothing to add.

    Args:
        exit_code: ``state.terminated.exitCode`` of the ``convert`` container.
        k8s_reason: ``state.terminated.reason`` (``OOMKilled``, ``Error``, ``Completed`` ...).
        memory_limit: ``resources.limits.memory`` of the container as written in the pod spec (``"8Gi"``), if any.

    Rules: ``OOMKilled`` -> ``OutOfMemory``; exit 137 (SIGKILL) with any other reason -> ``Killed``, "most often
    the memory limit"; exit 143 (SIGTERM) -> ``Terminated`` (eviction, preemption or deletion); another signal
    -> ``Crashed`` naming it.
    """
    limit = _limit_text(memory_limit)
    if k8s_reason == "OOMKilled":
        return Explanation("OutOfMemory", f"the converter was killed for exceeding {limit} (OOMKilled); raise "
                                          "spec.job.resources.limits.memory")
    if exit_code is None or exit_code <= 128:
        return None
    signal = SIGNALS.get(exit_code - 128, f"signal {exit_code - 128}")
    if exit_code == 137:
        return Explanation("Killed", f"the converter was killed by SIGKILL (exit 137), most often {limit}; raise "
                                     "spec.job.resources.limits.memory, or see the pod's events for another killer")
    if exit_code == 143:
        return Explanation("Terminated", "the converter was stopped by SIGTERM (exit 143): the pod was evicted, "
                                         "preempted or deleted; the Job retries it")
    return Explanation("Crashed", f"the converter crashed with {signal} (exit {exit_code}); see the pod's log")
