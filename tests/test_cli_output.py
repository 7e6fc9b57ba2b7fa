"""The output folder, the formats and the precision of ``reparam convert``, as a user meets them.

The folder is checked first (before torch is imported or the source is read): an existing file, a path under a
file, a folder another user cannot write and a read-only mount are one line and exit 2. Permissions are tested as
a non-root user (``setpriv``; root bypasses them) and the read-only case with a real read-only bind mount (in a
private mount namespace, ``unshare``), never by trusting mode bits. Nothing this run did not write is deleted; deploy
files of an earlier run are named stale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
import pytest
from safetensors import safe_open

from reparam import cli, exitcodes, spec
from reparam.converter.safe_load import load_pickle
from reparam.hashing import hash_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"
STEM = "yolov9-t-dual-best-converted"
NOBODY = 65534


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "HOME": "/tmp"}


# run cli.main in a fresh interpreter; print the exit code and whether torch was imported by then
PROBE = ("import sys; from reparam import cli; rc = cli.main(sys.argv[1:]); "
         "print('exit', rc, 'torch', 'torch' in sys.modules)")


def _as_user(cmd: list[str]) -> list[str]:
    """``cmd`` run as an unprivileged user: ``nobody`` via setpriv when we are root, else ourselves."""
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return cmd


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder the unprivileged user can reach (pytest's tmp_path sits under a 0700 folder of root)."""
    path = Path(tempfile.mkdtemp(prefix="reparam-out-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _probe(*args: str, prefix: list[str] | None = None) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run([*(prefix or []), sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=_env(), timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("reparam: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc, errors[0]


def test_existing_file_or_path_under_a_file_is_refused_first(tmp_path: Path) -> None:
    """Before torch is imported and before the source is read (the source does not even exist here)."""
    a_file = tmp_path / "notes.txt"  # any file (not named report.json: the session validates those as reports)
    a_file.write_text("{}")
    missing = str(tmp_path / "never-read.pt")
    for out, words in ((a_file, "is an existing file, not a folder"),
                       (a_file / "sub", f"is inside {a_file}, which is a file")):
        proc, line = _probe("convert", missing, "-o", str(out))
        assert proc.stdout.split() == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], proc.stderr
        assert line == f"reparam: error: -o {out} {words}; choose a folder (it is created when missing)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_folder_this_user_cannot_write(shared_tmp: Path) -> None:
    """A folder owned by someone else (mode 0755), as an unprivileged user: refused first, nothing created."""
    locked = shared_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o755)
    for out in (locked, locked / "new" / "deeper"):
        proc, line = _probe("convert", str(EXAMPLE), "-o", str(out), prefix=_as_user([]))
        assert proc.stdout.split() == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], proc.stderr
        where = str(locked) if out == locked else f"{locked} (where {out} would be created)"
        assert line == (f"reparam: error: -o {out}: {where} is not writable by this user; choose another output "
                        "folder with -o")
    assert list(locked.iterdir()) == []


def test_read_only_mount(tmp_path: Path) -> None:
    """A read-only bind mount stops root too (EROFS): refused first, one line."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("x")
    ns = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--mount"]
    mount = [*ns, "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(ro)]
    proc, line = _probe("convert", str(EXAMPLE), "-o", str(ro / "out"), prefix=mount)
    assert proc.stdout.split() == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], proc.stderr
    assert line == (f"reparam: error: -o {ro / 'out'}: {ro} (where {ro / 'out'} would be created) is on a read-only "
                    "file system; choose another output folder with -o")
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]


def test_default_output_folder_in_an_unwritable_working_folder(shared_tmp: Path) -> None:
    """No -o: the default ./<stem>-deploy is created in the working folder, which is checked first; the message
    names the default folder, not an -o the user never gave."""
    proc = subprocess.run(_as_user([sys.executable, "-c", PROBE, "convert", str(EXAMPLE)]), capture_output=True,
                          text=True, env=_env(), cwd=shared_tmp, timeout=300)
    assert proc.stdout.split() == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], proc.stderr
    assert proc.stderr.strip() == (f"reparam: error: the default output folder {shared_tmp}/yolov9-t-dual-best-deploy "
                                   f"(no -o given): {shared_tmp} is not writable by this user; choose another output "
                                   "folder with -o")
    assert list(shared_tmp.iterdir()) == []


def _convert(capsys, out: Path, *args: str) -> tuple[dict, str, str]:
    code = cli.main(["convert", str(EXAMPLE), "-o", str(out), "--imgsz", "64", "-q", *args])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return json.loads((out / "report.json").read_text()), cap.out, cap.err


def test_formats_are_additive_and_earlier_files_are_named_stale(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    report, _, _ = _convert(capsys, out, "--format", "onnx")
    assert [a["name"] for a in report["artifacts"]] == [f"{STEM}.pt", f"{STEM}.safetensors", f"{STEM}.onnx"]
    assert report["stale_outputs"] == []
    before = {p.name: hash_file(p)[0] for p in out.iterdir() if p.name != "report.json"}
    assert sorted(before) == sorted(a["name"] for a in report["artifacts"])

    report, text, _ = _convert(capsys, out, "--only", "torchscript")
    assert [a["name"] for a in report["artifacts"]] == [f"{STEM}.torchscript"]
    assert report["options"]["formats"] == ["torchscript"]
    stale = [f"{STEM}.pt", f"{STEM}.safetensors", f"{STEM}.onnx"]
    assert report["stale_outputs"] == stale
    assert {n: hash_file(out / n)[0] for n in before} == before  # kept, untouched
    assert (f"  stale        3 file(s) of an earlier run, kept but not written now (not in report.json's "
            f"artifacts): {', '.join(stale)}") in text.splitlines()

    report, text, _ = _convert(capsys, out)  # the defaults again: .pt/.safetensors rewritten, the rest stale
    assert [a["name"] for a in report["artifacts"]] == [f"{STEM}.pt", f"{STEM}.safetensors"]
    assert report["stale_outputs"] == [f"{STEM}.onnx", f"{STEM}.torchscript"]


def test_format_and_only_together_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["convert", str(EXAMPLE), "--format", "onnx", "--only", "pt"])
    assert done.value.code == exitcodes.INVALID_INPUT
    assert spec.resolve_formats(["onnx", "onnx"]) == ("pt", "safetensors", "onnx")
    assert spec.resolve_formats(only=["torchscript", "pt"]) == ("pt", "torchscript")


def _dtypes(out: Path, report: dict) -> dict[str, str]:
    """The stored precision of each written file, read from the file itself."""
    found = {}
    for a in report["artifacts"]:
        path = out / a["name"]
        if a["format"] == "pt":
            model = load_pickle(path).obj["model"]
            conv = dict(model.named_modules())["model.0.conv"]
            found["pt"] = str(conv.get("_parameters")["weight"].dtype).replace("torch.", "")
        elif a["format"] == "safetensors":
            with safe_open(str(path), framework="pt") as f:
                found["safetensors"] = str(f.get_tensor("model.0.conv.weight").dtype).replace("torch.", "")
        elif a["format"] == "onnx":
            elem = onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type
            found["onnx"] = {"FLOAT": "float32", "FLOAT16": "float16"}[onnx.TensorProto.DataType.Name(elem)]
        assert a["dtype"] == found[a["format"]], a
    return found


@pytest.mark.parametrize("args, expected", [
    ((), {"pt": "float16", "safetensors": "float16", "onnx": "float32"}),  # as the official tools
    (("--precision", "fp32"), {"pt": "float32", "safetensors": "float32", "onnx": "float32"}),
    (("--precision", "fp16"), {"pt": "float16", "safetensors": "float16", "onnx": "float16"}),
    (("--precision", "weights=fp32,export=fp16"), {"pt": "float32", "safetensors": "float32", "onnx": "float16"}),
])
def test_precision_per_artifact_family(tmp_path: Path, capsys, args, expected) -> None:
    report, _, _ = _convert(capsys, tmp_path / "out", "--format", "onnx", *args)
    got = _dtypes(tmp_path / "out", report)
    assert got == expected
    want = spec.parse_precision(args[1]) if args else spec.OFFICIAL_PRECISION
    assert report["options"]["precision"] == {"weights": want.weights, "export": want.export}


@pytest.mark.parametrize("flag, means", [("--half", "fp16"), ("--fp32", "fp32")])
def test_deprecated_precision_flags_say_so_once(tmp_path: Path, capsys, flag: str, means: str) -> None:
    report, _, err = _convert(capsys, tmp_path / "out", "--only", "pt", flag)
    assert err.splitlines() == [f"reparam: note: {flag} is deprecated; use --precision {means}"]
    assert report["options"]["precision"] == {"weights": means, "export": means}
    assert _dtypes(tmp_path / "out", report) == {"pt": "float16" if means == "fp16" else "float32"}


def test_precision_grammar_errors_are_one_line(capsys) -> None:
    assert cli.main(["convert", str(EXAMPLE), "--precision", "weights=fp16,weights=fp32", "--register", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reparam: error: --precision: precision 'weights=fp16,weights=fp32' is not valid")
    assert err.count("\n") == 1


def test_setpriv_is_there() -> None:
    """The permission tests need a way to drop root (util-linux); fail loudly rather than test nothing."""
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test permissions as a non-root user"
    assert shutil.which("unshare"), "unshare (util-linux) is needed for the read-only mount test"


@pytest.mark.parametrize("args, family", [
    (("--precision", "export=fp16"), "export"),  # the defaults (.pt, .safetensors) have no ONNX/TorchScript file
    (("--only", "onnx", "--precision", "weights=fp32"), "weights"),
])
def test_precision_for_a_family_that_is_not_written_is_refused(capsys, args, family: str) -> None:
    """The CRD's PRECISION_FAMILY_RULE, the operator's check and the CLI give the same answer (reparam.spec)."""
    assert cli.main(["convert", str(EXAMPLE), *args]) == exitcodes.INVALID_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"reparam: error: --precision '{args[-1].split()[0]}' sets the {family} family")
    assert err.count("\n") == 1
