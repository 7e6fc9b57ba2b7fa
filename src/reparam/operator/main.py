"""Entry point of the operator: ``reparam operator [flags]`` / ``python -m reparam.operator``.

``kopf run -m reparam.operator`` works too (settings then come from the
environment only, see :mod:`.settings`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import kopf

from ..errors import ReparamError
from . import handlers, settings as settings_mod


def run(argv: Sequence[str] | None = None) -> int:
    """Parse flags (over the environment), then run kopf until SIGINT/SIGTERM.

    Returns the process exit code: 0 after a clean stop, 2 for bad settings.
    """
    try:
        cfg = settings_mod.parse(argv)
    except ReparamError as exc:
        print(f"reparam operator: error: {exc}", file=sys.stderr)
        return exc.exit_code
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
