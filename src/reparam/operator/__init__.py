"""reparam.operator: the ModelConversion operator (kopf), without torch.

Importing the package registers the kopf handlers, so ``kopf run -m reparam.operator``
works; ``reparam operator`` calls :func:`reparam.operator.main.run`. Submodules:
``settings`` (env/flags), ``jobs`` (pure Job builder), ``status`` (pure status
transitions), ``queue`` (concurrency slots), ``metrics``, ``kube`` (API client),
``reconciler`` (handler logic), ``handlers`` (kopf glue), ``main``.
"""

from . import handlers  # noqa: F401  (registers the kopf handlers)

__all__ = ["handlers"]
