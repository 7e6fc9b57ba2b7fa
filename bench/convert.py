"""CPU time, wall time and peak memory of `reparam convert`, phase by phase, next to the I/O floor, in one run.

For each checkpoint (default: the yolov9-t and yolov9-s fixtures and a yolov9-e-sized dual checkpoint with random
weights, built from the published config (``reparam.models.published``) and saved in the official format), every
measurement runs in a fresh child process, so each peak RSS (``ru_maxrss``) is its own:

* baseline: ``import torch`` + reparam, nothing else (the interpreter's own memory, subtracted below);
* floor:    ``torch.load(weights_only=False)`` + ``torch.save`` of the same file (the least any converter does),
            with empty stand-in classes for ``models.common.*``/``models.yolo.*`` so no official code is needed;
* convert:  ``reparam.converter.convert.convert`` with ``--check fast`` (the default) and ``--check full``; its
            report's per-phase wall and CPU times (load, derive, transfer, validate, stats, write, export);
* notebook: only with ``--official /path/to/a/WongKinYiu/yolov9/checkout`` (or ``REPARAM_OFFICIAL_YOLOV9``): the
            official ``tools/reparameterization.ipynb`` cells of the variant, read from that checkout at run time and
            executed there (nothing of it is stored here), by ``--official-python`` (an interpreter with the
            checkout's requirements; default this one); else "not run". Two accommodations, neither of which the
            cells' work depends on: ``torch.load`` unpickles the official classes as the notebook (written for torch
            1.x) expects (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), and when ``torchvision`` cannot be imported (a
            CPU-only torch with a CUDA build of torchvision) an empty stand-in package satisfies the checkout's
            module-level imports (the cells never call it);
* as processes, the way issue #16 measured: the ``reparam convert CKPT -o OUT`` command (default checks) and
            ``python -c 'torch.load; torch.save'`` (the floor above), each a child whose CPU time (user + system)
            and peak RSS come from its own ``wait4`` rusage: interpreter start and imports included;
* floor, official code: only with ``--official``: the same plain load + save as a process of ``--official-python``
            with the checkout on ``sys.path`` instead of stand-ins, as issue #16 measured its floor (a user's
            ``torch.load`` of an official checkpoint imports the official code, and with it its utils);
* tensor peak: the floor and ``convert --check fast`` once more under ``torch.profiler`` (``profile_memory``): the
            largest number of bytes the CPU tensor allocator held at once (every tensor storage; Python objects,
            file buffers and the allocator's own slack excluded): a better defined peak than RSS.

CPU time in-process is user + system of every thread of the child (``time.process_time`` around the measured block;
the interpreter start and imports excluded). Peak memory is reported absolute and above the baseline, and as a ratio
of the checkpoint's in-memory size (its model tensors as saved, e.g. fp16).

Usage: python bench/convert.py [CKPT ...] [--variants t,e] [--repeat N] [--threads N] [--work DIR]
                               [--official DIR [--official-python PY]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("REPARAM_FIXTURES", REPO.parent / "shared" / "fixtures"))

PRELUDE = r"""
import json, resource, sys, time
def done(cpu0, wall0, **extra):
    print(json.dumps({"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""

BASELINE = PRELUDE + r"""
import torch
import reparam.converter.convert
from reparam.converter.checkpoint import read_checkpoint
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ck = read_checkpoint(sys.argv[1])
size = sum(t.numel() * t.element_size() for t in ck.state_dict.values())
print(json.dumps({"peak_mib": peak, "ckpt_mib": size / 2**20, "variant": ck.model_attrs.get("yaml_file")}))
"""

#: stand-in modules so that a plain torch.load can resolve models.common.* / models.yolo.* (bench only: this
#: executes the pickle, which is exactly what reparam avoids)
STAND_INS = r"""
import types
from torch import nn
from reparam.converter.safe_load import OFFICIAL_CLASSES
sys.modules["models"] = types.ModuleType("models")
for mod, names in OFFICIAL_CLASSES.items():
    m = types.ModuleType(mod)
    for n in names:
        setattr(m, n, type(n, (nn.Module,), {"__module__": mod}))
    sys.modules[mod] = m
"""

FLOOR = PRELUDE + STAND_INS + r"""
import torch
cpu0, wall0 = time.process_time(), time.perf_counter()
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
torch.save(ckpt, sys.argv[2] + ".pt")
done(cpu0, wall0)
"""

#: an empty stand-in ``torchvision`` when the real one cannot be imported (a CPU-only torch next to a CUDA build of
#: torchvision): the official checkout's utils import it at module level; neither the notebook nor a load calls it
TORCHVISION = r"""
try:
    import torchvision  # noqa: F401
except Exception:
    import types
    for sub in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional",
                "torchvision.ops"):
        sys.modules[sub] = types.ModuleType(sub)
    sys.modules["torchvision.datasets"].ImageFolder = type("ImageFolder", (), {})
    for sub in ("datasets", "transforms", "ops"):
        setattr(sys.modules["torchvision"], sub, sys.modules["torchvision." + sub])
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
"""

#: the floor as a user without reparam meets it (issue #16 measured it so): ``torch.load`` of an official checkpoint
#: needs the official ``models`` package importable, which imports the checkout's utils (cv2, pandas, ...)
FLOOR_OFFICIAL = PRELUDE + TORCHVISION + r"""
sys.path.insert(0, sys.argv[3])
import torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
torch.save(ckpt, sys.argv[2] + ".pt")
"""

CONVERT = PRELUDE + r"""
from reparam.converter.convert import ConvertOptions, convert
cpu0, wall0 = time.process_time(), time.perf_counter()
report = convert(sys.argv[1], sys.argv[2], ConvertOptions(check_level=sys.argv[3]))
done(cpu0, wall0, timing=report.timing, threads=report.threads, check=report.validation.check,
     max_abs_diff=report.validation.max_abs_diff)
"""

NOTEBOOK = PRELUDE + r"""
# the official notebook's cells for one variant, read from the checkout at run time (never stored in reparam)
import os
checkout, variant, src, dst, nc = sys.argv[3], sys.argv[4], sys.argv[1], sys.argv[2] + ".pt", sys.argv[5]
os.chdir(checkout)
sys.path.insert(0, checkout)
""" + TORCHVISION + r"""
cells = json.load(open(os.path.join(checkout, "tools", "reparameterization.ipynb")))["cells"]
code = ["".join(cells[0]["source"])]
title = f"Convert YOLOv9-{variant.upper()}"
start = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and title in "".join(c["source"]))
for c in cells[start + 1:]:
    if c["cell_type"] == "markdown":
        break
    code.append("".join(c["source"]))
text = "\n".join(code).replace(f"./yolov9-{variant}.pt", src).replace(f"./yolov9-{variant}-converted.pt", dst)
text = text.replace("nc=80", f"nc={nc}").replace('print(k, "perfectly matched!!")', "pass")
cpu0, wall0 = time.process_time(), time.perf_counter()
exec(compile(text, "reparameterization.ipynb", "exec"), {"__name__": "__main__"})
done(cpu0, wall0)
"""

TENSOR_PEAK = PRELUDE + r"""
import os, tempfile, types, torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
what = sys.argv[3]
if what == "floor":
""" + textwrap.indent(STAND_INS.strip("\n"), "    ") + r"""
else:
    from reparam.converter.convert import ConvertOptions, convert
cpu0, wall0 = time.process_time(), time.perf_counter()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    if what == "floor":
        torch.save(torch.load(sys.argv[1], map_location="cpu", weights_only=False), sys.argv[2] + ".pt")
    else:
        convert(sys.argv[1], sys.argv[2], ConvertOptions(check_level=what))
fd, trace = tempfile.mkstemp(suffix=".json")
os.close(fd)
prof.export_chrome_trace(trace)
events = json.load(open(trace))["traceEvents"]
os.remove(trace)
held = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
done(cpu0, wall0, tensor_peak_mib=max(held) / 2**20 if held else 0.0)
"""

GENERATE = r"""
import sys, torch
from reparam.converter.official_format import save_official
from reparam.models import DetectionModel
from reparam.models.published import published_config
torch.manual_seed(0)
variant, path = sys.argv[1], sys.argv[2]
model = DetectionModel(published_config(f"yolov9-{variant}", nc=80), nc=80).eval()
with torch.no_grad():  # non-trivial BatchNorm statistics, as tests/test_pruning_variants.py
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
model.names = {i: f"class{i}" for i in range(80)}
model.yaml_file = f"yolov9-{variant}.yaml"
save_official(model.half(), path)
"""

PHASES = ("load", "derive", "transfer", "validate", "stats", "write", "export")


def child(code: str, *args: str, threads: int | None = None, python: str | None = None,
          env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([python or sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def process(argv: list[str], threads: int | None = None, env_extra: dict[str, str] | None = None) -> dict:
    """Run ``argv`` as a child; its CPU time (user + system), wall time and peak RSS from its own ``wait4``
    rusage (what ``resource.getrusage(RUSAGE_CHILDREN)`` adds up, for this child alone)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    wall = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - wall
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}


def reparam_command() -> list[str]:
    """The ``reparam`` console script next to this interpreter, else ``python -m reparam.cli``."""
    script = Path(sys.executable).with_name("reparam")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "reparam.cli"]


def median_process(argv: list[str], repeat: int, threads: int | None,
                   env_extra: dict[str, str] | None = None) -> dict:
    runs = sorted((process(argv, threads, env_extra) for _ in range(repeat)), key=lambda r: r["cpu_s"])
    best = dict(runs[len(runs) // 2])
    best["peak_mib"] = max(r["peak_mib"] for r in runs)
    return best


def median_run(code: str, args: list[str], repeat: int, threads: int | None, **how: Any) -> dict:
    runs = sorted((child(code, *args, threads=threads, **how) for _ in range(repeat)), key=lambda r: r["cpu_s"])
    best = dict(runs[len(runs) // 2])
    best["peak_mib"] = max(r["peak_mib"] for r in runs)
    return best


def generated(variant: str, work: Path) -> Path:
    path = work / f"yolov9-{variant}-dual-random.pt"
    if not path.is_file():
        print(f"generating {path.name} (random weights, official format) ...", flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        subprocess.run([sys.executable, "-c", GENERATE, variant, str(path)], env=env, check=True)
    return path


def measure(ckpt: Path, args: argparse.Namespace, tmp: Path) -> dict:
    base = child(BASELINE, str(ckpt), threads=args.threads)
    rows: dict[str, dict] = {}
    dst = str(tmp / "floor")
    rows["floor"] = median_run(FLOOR, [str(ckpt), dst], args.repeat, args.threads)
    for level in ("fast", "full"):
        rows[f"convert --check {level}"] = median_run(CONVERT, [str(ckpt), str(tmp / f"out-{level}"), level],
                                                      args.repeat, args.threads)
    for name, what in (("floor", "floor"), ("convert --check fast", "fast")):
        rows[name]["tensor_peak_mib"] = child(TENSOR_PEAK, str(ckpt), str(tmp / f"tensors-{what}"), what,
                                              threads=args.threads)["tensor_peak_mib"]
    rows["floor (process)"] = median_process([sys.executable, "-c", FLOOR, str(ckpt), str(tmp / "floor-process")],
                                             args.repeat, args.threads)
    rows["reparam convert (process)"] = median_process(
        [*reparam_command(), "convert", str(ckpt), "-o", str(tmp / "out-process")], args.repeat, args.threads)
    official = args.official
    if official:  # the official checkout importable, no stand-ins: what a plain load + save costs a user
        env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": official}
        rows["floor, official code (process)"] = median_process(
            [args.official_python, "-c", FLOOR_OFFICIAL, str(ckpt), str(tmp / "floor-official"), official],
            args.repeat, args.threads, env)
    variant = Path(str(base.get("variant") or "")).stem.replace("yolov9-", "")
    nb_note = ("not run: no official checkout given (--official)" if not official else
               f"not run: the notebook has no cells for yolov9-{variant}" if variant not in ("s", "m", "c", "e")
               else "")
    if official and variant in ("s", "m", "c", "e"):
        nc = json.loads(subprocess.run([sys.executable, "-c", "import sys, json; from reparam.converter.checkpoint "
                                        "import read_checkpoint; print(read_checkpoint(sys.argv[1]).nc)", str(ckpt)],
                                       capture_output=True, text=True, check=True,
                                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout)
        try:
            rows["notebook"] = median_run(NOTEBOOK, [str(ckpt), str(tmp / "nb"), official, variant, str(nc)],
                                          args.repeat, args.threads, python=args.official_python,
                                          env_extra={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": ""})
        except RuntimeError as err:
            nb_note = f"not run: it failed ({str(err).splitlines()[-1][:200]})"
    return {"ckpt": ckpt, "base": base, "rows": rows, "notebook": nb_note}


def report(m: dict) -> None:
    ckpt, base, rows = m["ckpt"], m["base"], m["rows"]
    nb = rows.get("notebook")
    size = base["ckpt_mib"]
    print(f"\n{ckpt.name}: {ckpt.stat().st_size / 1e6:.1f} MB file, {size:.1f} MiB of tensors in memory, "
          f"interpreter baseline {base['peak_mib']:.0f} MiB")
    print(f"  {'step':31s} {'CPU s':>7s} {'wall s':>7s} {'CPU/floor':>9s} {'CPU/nb':>7s} {'peak MiB':>9s} "
          f"{'above base':>10s} {'/ckpt':>6s} {'tensor peak':>11s} {'/ckpt':>6s}")
    for name, r in rows.items():
        floor = rows["floor (process)" if name.endswith("(process)") else "floor"]
        # a process's peak includes the interpreter and imports: its ratio is of the absolute peak
        above = r["peak_mib"] - (0 if name.endswith("(process)") else base["peak_mib"])
        ratio_nb = f"{r['cpu_s'] / nb['cpu_s']:7.2f}" if nb and name != "notebook" else f"{'-':>7s}"
        tensors = (f"{r['tensor_peak_mib']:11.0f} {r['tensor_peak_mib'] / size:6.2f}" if "tensor_peak_mib" in r
                   else f"{'-':>11s} {'-':>6s}")
        print(f"  {name:31s} {r['cpu_s']:7.2f} {r['wall_s']:7.2f} {r['cpu_s'] / floor['cpu_s']:9.2f} {ratio_nb} "
              f"{r['peak_mib']:9.0f} {above:10.0f} {above / size:6.2f} {tensors}")
    if m["notebook"]:
        print(f"  notebook procedure: {m['notebook']}")
    official = rows.get("floor, official code (process)")
    if official:
        print(f"  reparam convert (process) / floor with the official code imported (process): "
              f"{rows['reparam convert (process)']['cpu_s'] / official['cpu_s']:.2f}")
    for name, r in rows.items():
        if "timing" in r:
            t = r["timing"]
            parts = [f"{p} {t.get(p + '_cpu_s', 0):.2f}/{t.get(p + '_s', 0):.2f}" for p in PHASES]
            print(f"  {name} phases (CPU s / wall s, {r['threads']} threads): " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpts", nargs="*", type=Path, help="checkpoints (default: --variants)")
    ap.add_argument("--official", default=os.environ.get("REPARAM_OFFICIAL_YOLOV9"),
                    help="a WongKinYiu/yolov9 checkout: also time its notebook procedure (default: not run)")
    ap.add_argument("--official-python", default=os.environ.get("REPARAM_OFFICIAL_PYTHON", sys.executable),
                    help="the interpreter that runs the notebook (one with the checkout's requirements)")
    ap.add_argument("--variants", default="t,e",
                    help="t and s: the shared fixtures; other letters: generated yolov9-<v> with random weights")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (median CPU, max peak)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every child (default: unset)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "reparam-bench",
                    help="where generated checkpoints are kept between runs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpts = list(args.ckpts)
    if not ckpts:
        fixture = {"t": "yolov9-t-dual-best.pt", "s": "yolov9-s-dual.pt"}
        for v in args.variants.split(","):
            p = FIXTURES / "ckpt" / fixture[v] if v in fixture else generated(v, args.work)
            if p.is_file():
                ckpts.append(p)
    results = []
    for ckpt in ckpts:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"measuring {ckpt.name} ...", file=sys.stderr, flush=True)
            results.append(measure(ckpt, args, Path(tmp)))
    print(f"reparam convert vs the I/O floor, one run, {os.cpu_count()} host CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for m in results:
        report(m)


if __name__ == "__main__":
    main()
