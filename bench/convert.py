"""Wall time and peak memory of `reparam convert` next to the I/O floor, in one run.

For a checkpoint (default: the largest fixture checkpoint in ``ckpt/``) it runs, each in a fresh subprocess so peak RSS is its own:

* floor:   ``torch.load(weights_only=False)`` of the file + ``torch.save`` of it (the least any converter does),
           with empty stand-in classes for ``models.common.*``/``models.yolo.*`` so no official code is needed;
* convert: ``reparam convert`` with default settings (safe load, prune, validation at 640 px, GFLOPs, writes).

Usage: python bench/convert.py [CKPT] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import fixtures_root  # noqa: E402  (the one fixture lookup of the tests)

FLOOR = r"""
import resource, sys, time, types, torch
from torch import nn
from reparam.converter.safe_load import OFFICIAL_CLASSES
# stand-in modules so that a plain torch.load can resolve models.common.* / models.yolo.* (bench only: this
# executes the pickle, which is exactly what reparam avoids)
sys.modules["models"] = types.ModuleType("models")
for mod, names in OFFICIAL_CLASSES.items():
    m = types.ModuleType(mod)
    for n in names:
        setattr(m, n, type(n, (nn.Module,), {"__module__": mod}))
    sys.modules[mod] = m
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
ckpt = torch.load(src, map_location="cpu", weights_only=False)
torch.save(ckpt, dst)
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

CONVERT = r"""
import resource, sys, time
from reparam.converter.convert import ConvertOptions, convert
t = time.perf_counter()
report = convert(sys.argv[1], sys.argv[2], ConvertOptions())
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, report["timing"])
"""


def run(code: str, *args: str) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    parts = out.stdout.strip().split(" ", 2)
    return float(parts[0]), float(parts[1]) / 1024.0, parts[2] if len(parts) > 2 else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ckpts = sorted((fixtures_root() / "ckpt").glob("*.pt"), key=lambda p: p.stat().st_size)
    ckpt = Path(args.ckpt) if args.ckpt else ckpts[-1]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in (("torch.load + torch.save (floor)", FLOOR), ("reparam convert", CONVERT)):
            times, peaks, extra = [], [], ""
            for i in range(args.repeat):
                dst = str(Path(tmp) / f"{name[:5]}-{i}")
                dt, peak, extra = run(code, str(ckpt), dst)
                times.append(dt)
                peaks.append(peak)
            times.sort()
            rows[name] = (times[len(times) // 2], max(peaks), extra)
    base_t, base_m, _ = rows["torch.load + torch.save (floor)"]
    print(f"checkpoint: {ckpt.name} ({ckpt.stat().st_size / 1e6:.1f} MB), median of {args.repeat}, one run")
    print(f"{'step':34s} {'wall s':>8s} {'x floor':>8s} {'peak RSS MiB':>13s} {'x floor':>8s}")
    for name, (t, m, _extra) in rows.items():
        print(f"{name:34s} {t:8.2f} {t / base_t:8.1f} {m:13.0f} {m / base_m:8.2f}")
    print("convert phases:", rows["reparam convert"][2])


if __name__ == "__main__":
    main()
