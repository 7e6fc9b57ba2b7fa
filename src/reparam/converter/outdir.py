"""The output folder (``-o``): checked before any work, and what an earlier run left there.

Torch-free (the CLI calls :func:`check_output_dir` before it imports torch or reads the checkpoint).

Policy for files from earlier runs (README, "Writes atomically"): a run writes its own files into ``-o`` (a file of
the same name is replaced, atomically) and never deletes anything else. Deploy files of the same checkpoint that this
run did not write -- another format of an earlier run, or every earlier deploy file when this run failed -- are
*stale*: they are kept, listed in ``report.json`` (``stale_outputs``) and named in the summary.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import InvalidInputError

__all__ = ["artifact_names", "check_output_dir", "stale_outputs"]


def artifact_names(stem: str) -> list[str]:
    """Every file name a conversion of ``<stem>.pt`` can write besides ``report.json`` (the deploy files, then the
    evaluation's plots and tables, :func:`reparam.evaluation.plots.file_names`)."""
    from ..evaluation.plots import file_names  # at call time: reparam.evaluation imports the converter's NMS

    base = f"{stem}-converted"
    return [f"{base}.pt", f"{base}.safetensors", f"{base}.onnx", f"{base}-end2end.onnx", f"{base}.torchscript",
            *file_names(stem).values()]


def stale_outputs(out: Path, stem: str, written: Iterable[str] = ()) -> list[str]:
    """Names of deploy files of ``<stem>`` in ``out`` that this run did not write (``written``: its file names)."""
    mine = set(written)
    return [n for n in artifact_names(stem) if n not in mine and (out / n).is_file()]


def check_output_dir(path: str | Path, *, default: bool = False) -> None:
    """Make sure a conversion can write into the folder ``path`` (created later when missing), before any work.

    The nearest existing folder on the way (``path`` itself, else its closest existing parent) must be a folder and
    must take a new entry: a temporary folder is created there and removed again, so permissions, ACLs, a
    read-only mount (``EROFS``, which stops root too) and a full disk are all found by the kernel itself, not
    guessed from mode bits. Nothing is left behind.

    ``default``: no ``-o`` was given and ``path`` is the default folder (``./<stem>-deploy``, relative to the current
    folder): the message names it as that, with its absolute path, not as an ``-o`` the user never typed.

    Raises:
        InvalidInputError: ``path`` (or a parent) is an existing file, or the folder cannot be written; one line
            naming the path, the reason and what to do.
    """
    out = Path(path).expanduser()
    if default:
        out = Path.cwd() / out
    name = f"the default output folder {out} (no -o given)" if default else f"-o {out}"
    probe = out
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: the folder would be created at its target
            raise InvalidInputError(f"{name}: {probe} is a broken symbolic link; remove it or choose another "
                                    "output folder with -o")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        what = "is an existing file, not a folder" if probe == out else f"is inside {probe}, which is a file"
        fix = "choose an output folder with -o" if default else "choose a folder (it is created when missing)"
        raise InvalidInputError(f"{name} {what}; {fix}")
    try:
        made = tempfile.mkdtemp(prefix=".reparam-write-check-", dir=probe)
    except OSError as exc:
        reason = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable by this user",
                  errno.EPERM: "is not writable by this user", errno.ENOSPC: "is on a full disk",
                  errno.EDQUOT: "is over its disk quota"}.get(exc.errno, f"cannot be written ({exc.strerror})")
        where = f"{probe}" if probe == out or default else f"{probe} (where {out} would be created)"
        raise InvalidInputError(f"{name}: {where} {reason}; choose another output folder with "
                                "-o") from None
    os.rmdir(made)  # the empty folder this check made, nothing else
