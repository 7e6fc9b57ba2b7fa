"""What a new user meets first, from issue #17's walk-through: every mistake in the command line or the local path
is one line and exit 2 in milliseconds, before torch is imported (it takes seconds, tens of seconds on a busy
machine), and names what the user actually gave.

Each test runs ``reparam.cli.main`` in a fresh interpreter and prints the exit code and whether torch was imported
by then, so "before torch" is observed, not assumed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reparam import exitcodes

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"

# run cli.main in a fresh interpreter; print the exit code and whether torch was imported by then
PROBE = ("import sys; from reparam import cli; rc = cli.main(sys.argv[1:]); "
         "print('exit', rc, 'torch', 'torch' in sys.modules)")


def _probe(*args: str, cwd: Path) -> tuple[list[str], list[str]]:
    """(the probe's stdout words, the ``reparam`` lines on stderr) of ``reparam ARGS`` run in ``cwd``."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout.split(), [ln for ln in proc.stderr.splitlines() if ln.startswith("reparam")]


def test_evaluate_missing_model_before_torch(tmp_path: Path) -> None:
    """``reparam evaluate`` with a mistyped model path: reported before torch (as ``convert`` and ``inspect``)."""
    data = REPO / "tests" / "fixtures" / "eval" / "data.yaml"
    words, lines = _probe("evaluate", "no-such.pt", "--data", str(data), cwd=tmp_path)
    assert words == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"]
    assert lines == ["reparam: error: checkpoint 'no-such.pt' does not exist (no such file)"]


def test_folder_without_exactly_one_checkpoint_before_torch(tmp_path: Path) -> None:
    """A folder source with two ``*.pt`` or none: the same one line as before (how many, examples, a path to paste),
    for convert, inspect and evaluate, now before torch is imported; nothing is written."""
    two = tmp_path / "two"
    two.mkdir()
    for name in ("b.pt", "a.pt"):
        (two / name).symlink_to(EXAMPLE)
    empty = tmp_path / "empty"
    empty.mkdir()
    data = REPO / "tests" / "fixtures" / "eval" / "data.yaml"
    for cmd in (["convert", "-o", str(tmp_path / "out")], ["inspect"], ["evaluate", "--data", str(data)]):
        words, lines = _probe(*cmd, str(two), cwd=tmp_path)
        assert words == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], (cmd, lines)
        assert lines == [f"reparam: error: {two} holds 2 checkpoints (e.g. 'a.pt', 'b.pt'); name one, e.g. "
                         f"{two}/a.pt"]
        words, lines = _probe(*cmd, str(empty), cwd=tmp_path)
        assert words == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], (cmd, lines)
        assert lines == [f"reparam: error: {empty} holds no files; expected one *.pt checkpoint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "two"]


def test_default_output_folder_name_taken_by_a_file(tmp_path: Path) -> None:
    """No -o and a file where the default ./<stem>-deploy would go: the message names the default folder (not an
    ``-o`` the user never gave); refused before torch for a local file source, and after the fetch for a folder
    source (whose checkpoint, hence stem, is known only then). Nothing is written, the file is untouched."""
    work = tmp_path / "work"
    work.mkdir()
    taken = work / "yolov9-t-dual-best-deploy"
    taken.write_text("not a folder")
    expected = (f"reparam: error: the default output folder {taken} (no -o given) is an existing file, not a "
                "folder; choose an output folder with -o")
    words, lines = _probe("convert", str(EXAMPLE), cwd=work)
    assert words == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"]
    assert lines == [expected]
    folder = tmp_path / "ckpts"  # a folder holding exactly one checkpoint is a valid source
    folder.mkdir()
    (folder / EXAMPLE.name).symlink_to(EXAMPLE)
    words, lines = _probe("convert", str(folder), "-q", cwd=work)
    assert words[:2] == ["exit", str(exitcodes.INVALID_INPUT)]
    assert lines == [expected]
    assert sorted(p.name for p in work.iterdir()) == [taken.name] and taken.read_text() == "not a folder"


def test_safetensors_is_the_same_bytes_every_run(tmp_path: Path) -> None:
    """safetensors writes its metadata in a random order (safetensors#584), so the same model gave a new sha256 each
    run (the README's example, the registry's deploy sha256). Saved five times: one sha256, metadata keys sorted
    in the header, and the file still loads (safetensors' own reader and ``load_safetensors``) to the same tensors."""
    import json

    import torch
    from safetensors import safe_open

    from reparam.converter.artifacts import load_safetensors, save_safetensors
    from reparam.hashing import hash_file
    from reparam.models import DetectionModel
    from reparam.models.published import published_config

    torch.manual_seed(0)
    model = DetectionModel(published_config("gelan-t", nc=3), ch=3, nc=3).half().eval()
    names = {0: "red", 1: "green", 2: "blue"}
    paths = [tmp_path / f"m{i}.safetensors" for i in range(5)]
    for p in paths:
        save_safetensors(model, p, nc=3, names=names, stride=[8.0, 16.0, 32.0])
    assert len({hash_file(p)[0] for p in paths}) == 1
    data = paths[0].read_bytes()
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0
    header = json.loads(data[8:8 + size])
    assert list(header)[0] == "__metadata__"
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(paths[0]), framework="pt") as f:
        meta = f.metadata()
    assert (meta["nc"], json.loads(meta["names"]), json.loads(meta["stride"])) == (
        "3", {"0": "red", "1": "green", "2": "blue"}, [8.0, 16.0, 32.0])
    loaded = load_safetensors(paths[0], dtype=None)
    want = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_readme_example_summary_is_what_convert_prints(tmp_path: Path, monkeypatch, capsys) -> None:
    """The README's example of ``reparam convert examples/yolov9-t-dual-best.pt -o out/`` is the tool's real
    output, line for line, except the two lines that depend on the machine (``device``, ``time``). The check runs at
    ``--imgsz 64`` to keep the test short; the README's GFLOPs at 640 px are then the report's GFLOPs at 64 px
    scaled by area (as the summary scales them; the report keeps 3 decimals, i.e. +-0.05 at 640 px after scaling);
    max |diff| is 0 at both sizes."""
    import json

    from reparam import cli

    text = (REPO / "README.md").read_text()
    start = text.index("```text\n$ reparam convert examples/yolov9-t-dual-best.pt -o out/\n")
    block = text[start:text.index("```\n", start + 8)].splitlines()[2:]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / EXAMPLE.name).symlink_to(EXAMPLE)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["convert", "examples/yolov9-t-dual-best.pt", "-o", "out/", "--imgsz", "64", "-q"])
    printed = capsys.readouterr().out.splitlines()
    assert code == exitcodes.OK

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gflops_imgsz"] == 64
    [gflops] = [ln.split() for ln in block if ln.startswith("  GFLOPs ")]
    assert gflops[0] == "GFLOPs" and gflops[2] == "->" and gflops[4:] == ["(at", "640px)"]
    assert abs(float(gflops[1]) - 100 * report["gflops"]["before"]) <= 0.05 + 1e-9
    assert abs(float(gflops[3]) - 100 * report["gflops"]["after"]) <= 0.05 + 1e-9

    # the lockstep line names the full-size input the check ran on: 640x640 in the README, 64x64 here
    block = [ln.replace("  lockstep     deploy at 640x640:", "  lockstep     deploy at 64x64:") for ln in block]

    def same(lines: list[str]) -> list[str]:
        return [ln for ln in lines if not ln.startswith(("  device ", "  time ", "  GFLOPs "))]

    assert same(printed) == same(block)
    assert [ln.split()[0] for ln in printed if ln.startswith(("  device ", "  time "))] == ["device", "time"]


def test_onnx_usage_line_names_the_real_input(tmp_path: Path, capsys) -> None:
    """The closing usage line of an ONNX file gives its real input (it said ``[1, 3, H, W]`` for a static
    ``[1, 3, 640, 640]`` graph, and nothing of an fp16 graph's float16 input): name, dtype and shape as in the file."""
    import onnx

    from reparam import cli

    out = tmp_path / "out"
    code = cli.main(["convert", str(EXAMPLE), "-o", str(out), "--imgsz", "64", "-q", "--only", "onnx",
                     "--precision", "export=fp16"])
    printed = capsys.readouterr().out.splitlines()
    assert code == exitcodes.OK
    path = out / "yolov9-t-dual-best-converted.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    [inp] = graph.input
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, inp.type.tensor_type.elem_type, shape) == ("images", onnx.TensorProto.FLOAT16, [1, 3, 64, 64])
    assert f"  {path.name:<40} onnxruntime.InferenceSession('{path}'); input 'images' float16 [1, 3, 64, 64] " \
           "RGB 0-1" in printed


def test_flag_mistakes_are_refused_before_torch(tmp_path: Path) -> None:
    """The rest of the command line's mistakes (a precision for a family nothing written belongs to, --alias or
    --tag without --register, a reserved tag key) are one line and exit 2 before torch is imported, as the
    output folder, the export flags and the path already were; nothing is written."""
    out = str(tmp_path / "out")
    cases = {
        ("--precision", "export=fp16"): "reparam: error: --precision 'export=fp16' sets the export family (onnx, "
                                        "torchscript), but no such file is written (formats: pt, safetensors); add "
                                        "one, or drop export=",
        ("--alias", "champion"): "reparam: error: --alias and --tag need --register NAME",
        ("--tag", "team=vision"): "reparam: error: --alias and --tag need --register NAME",
    }
    for flags, line in cases.items():
        words, lines = _probe("convert", str(EXAMPLE), "-o", out, *flags, cwd=tmp_path)
        assert words == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], (flags, lines)
        assert lines == [line]
    words, lines = _probe("convert", str(EXAMPLE), "-o", out, "--register", "m", "--tag", "reparam.x=1", cwd=tmp_path)
    assert words == ["exit", str(exitcodes.INVALID_INPUT), "torch", "False"], lines
    assert len(lines) == 1 and "reparam.x" in lines[0] and "reserved" in lines[0]
    assert list(tmp_path.iterdir()) == []
