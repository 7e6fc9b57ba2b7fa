"""reparam.store: sources and sinks (local files, S3, MLflow tracking + Model Registry).

Modules (import them directly; this package imports nothing heavy):

- :mod:`.uris` - ``parse_source(uri) -> SourceRef``, ``redact(text) -> str`` (pure).
- :mod:`.sources` - ``fetch(uri, workdir, *, sha256=None, tracking_uri=None, progress=None, registry_wait=60)
  -> FetchedSource``.
- :mod:`.tracking` - ``resolve_tracking_uri(explicit=None)``, ``client(tracking_uri=None)``, ``REGISTRY_WAIT_S``,
  ``await_settled(...)``.
- :mod:`.registry` - ``idempotency_key(...)``, ``find_existing(...)``, ``register(...) -> Registration``,
  ``update_tags(...)``.
- :mod:`.promotion` - the completeness and alias rule: ``version_problem(status, tags)``, ``decide(...) ->
  Decision`` (pure) and ``promote(...) -> Promotion``.
"""
