"""Entry point of the operator: ``reparam operator [flags]`` / ``python -m reparam.operator``.

``kopf run -m reparam.operator`` works too (settings then come from the
environment only, see :mod:`.settings`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import kopf

from .. import exitcodes
from ..errors import ReparamError
from . import handlers, settings as settings_mod


def run(argv: Sequence[str] | None = None) -> int:
    """Parse flags (over the environment), then run kopf until SIGINT/SIGTERM.

    Returns the process exit code: 0 after a clean stop, 2 for bad settings or when there is no cluster to log
    in to (one line on stderr, instead of kopf retrying its start-up every 60 s).
    """
    try:
        cfg = settings_mod.parse(argv)
    except ReparamError as exc:
        print(f"reparam operator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    problem = _login_problem()
    if problem:
        print(f"reparam operator: error: {problem}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    handlers.configure(cfg)
    kopf.configure(verbose=cfg.verbose)  # kopf's logging setup (one handler, its format)
    clusterwide = cfg.clusterwide or not cfg.namespaces
    if not cfg.namespaces and not cfg.clusterwide:
        logging.getLogger("reparam.operator").info("no namespace given: watching all namespaces")
    liveness = f"http://0.0.0.0:{cfg.liveness_port}/healthz" if cfg.liveness_port else None
    kopf.run(
        clusterwide=clusterwide,
        namespaces=() if clusterwide else cfg.namespaces,
        standalone=cfg.peering is None,
        peering_name=cfg.peering,
        liveness_endpoint=liveness,
    )
    return 0


def _login_problem() -> str | None:
    """Why the operator cannot log in to a cluster, in one line; ``None`` when it can.

    Uses kopf's own login functions, the ones :mod:`.kube` uses: ``kopf.login_with_service_account`` returns
    ``None`` outside a pod, ``kopf.login_with_kubeconfig`` when no ``$KUBECONFIG`` / ``~/.kube/config`` exists, and
    raises for a malformed one.
    """
    try:
        st = kopf.OperatorSettings()
        if kopf.login_with_service_account(settings=st) or kopf.login_with_kubeconfig(settings=st):
            return None
    except Exception as exc:
        return f"cannot read the kubeconfig: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return ("no Kubernetes API to talk to: not in a pod with a service account, and no kubeconfig ($KUBECONFIG or "
            "~/.kube/config); run it in the cluster (the Helm chart) or point KUBECONFIG at one")
