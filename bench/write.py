"""CPU time, wall time and peak memory of the ``write`` phase of ``reparam convert`` alone (issue #16).

The checkpoint is read and pruned once (as :func:`reparam.converter.convert.convert` does), then
:func:`reparam.converter.artifacts.write_all` writes the ``.pt`` and ``.safetensors`` artifacts (+ ``report.json``)
``--repeat`` times into fresh folders; each run's CPU time (``time.process_time``: user + system of all threads),
wall time and peak resident memory above the memory held just before it are printed, then the median. The peak is
the kernel's high-water mark ``VmHWM`` of ``/proc/self/status``, reset before each run by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0, ``Documentation/admin-guide/mm/soft-dirty.rst``), so the load's own peak
does not hide the write's. ``--profile`` prints the top of a cProfile of one more run.

Run it single-threaded as the issue measured: ``OMP_NUM_THREADS=1 python bench/write.py CKPT [--fp32]``
(default checkpoint: ``/tmp/reparam-bench/yolov9-e-dual-random.pt``, written by ``bench/convert.py --variants e``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", default="/tmp/reparam-bench/yolov9-e-dual-random.pt")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="write fp32 weights (--fp32)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more run, print the top 25 by cumtime")
    args = ap.parse_args()

    import torch

    from reparam.converter import artifacts
    from reparam.converter.checkpoint import read_checkpoint
    from reparam.converter.convert import ConvertOptions, prune
    from reparam.report import Report, Source, Validation

    path = Path(args.ckpt)
    ckpt = read_checkpoint(path)
    pruned = prune(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict, fits=ckpt.fits, stride=ckpt.stride)
    options = ConvertOptions(fp32=args.fp32, formats=("pt", "safetensors"))
    size = sum(t.numel() * t.element_size() for t in pruned.deploy_sd.values())
    print(f"{path.name}: deploy weights {size / 2**20:.1f} MiB, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {'fp32' if args.fp32 else 'fp16'}")

    def once(out: Path) -> None:
        report = Report(status="running", source=Source(uri=str(path), bytes=path.stat().st_size),
                        validation=Validation(passed=True, max_abs_diff=0.0))
        artifacts.write_all(out, path, ckpt, pruned.plan, pruned.dual, pruned.deploy, pruned.deploy,
                            options, report, lambda _msg: None)

    cpus, walls, peaks = [], [], []
    with tempfile.TemporaryDirectory(prefix="reparam-bench-write-") as tmp:
        for i in range(args.repeat):
            Path("/proc/self/clear_refs").write_text("5")
            rss0 = _status_kib("VmRSS")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            once(Path(tmp) / f"run{i}")
            cpus.append(time.process_time() - cpu0)
            walls.append(time.perf_counter() - wall0)
            peaks.append((_status_kib("VmHWM") - rss0) / 1024)
            print(f"run {i}: cpu {cpus[-1]:.3f} s  wall {walls[-1]:.3f} s  peak +{peaks[-1]:.1f} MiB "
                  f"(rss before {rss0 / 1024:.0f} MiB)")
        print(f"median: cpu {statistics.median(cpus):.3f} s  wall {statistics.median(walls):.3f} s  "
              f"peak +{statistics.median(peaks):.1f} MiB ({statistics.median(peaks) / (size / 2**20):.2f}x the "
              "deploy weights)")
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(once, Path(tmp) / "profiled")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
