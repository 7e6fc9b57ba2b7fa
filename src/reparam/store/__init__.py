"""reparam.store: sources and sinks (local files, S3, MLflow tracking + Model Registry).

Modules (import them directly; this package imports nothing heavy):

- :mod:`.uris` - ``parse_source(uri) -> SourceRef``, ``redact(text) -> str`` (pure).
- :mod:`.sources` - ``fetch(uri, workdir, *, sha256=None, tracking_uri=None, progress=None) -> FetchedSource``.
- :mod:`.tracking` - ``resolve_tracking_uri(explicit=None)``, ``client(tracking_uri=None)``.
- :mod:`.registry` - ``idempotency_key(...)``, ``find_existing(...)``, ``register(...) -> Registration``.
- :mod:`.promotion` - the alias rule: ``decide(...)`` (pure) and ``promote(...) -> Promotion``.
"""
