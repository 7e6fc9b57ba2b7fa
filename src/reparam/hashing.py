"""File hashing shared by the sources (download check) and the artifacts (report, registry tags); stdlib only."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Block size of every streamed read and download (1 MiB).
CHUNK = 1 << 20


def hash_file(path: str | Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of the file at ``path``, read in :data:`CHUNK` blocks.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n
