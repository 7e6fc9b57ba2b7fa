"""CPU latency of the dual model vs the deploy model vs the fused deploy model vs ONNX Runtime (fused deploy).

Median of N timed forwards after warm-up, batch 1, 640x640 (``--imgsz``), fp32, one table for the fixture
checkpoints, as ratios to the dual model (< 1 = faster). Not a test: numbers depend on the machine and its load.

    python bench/latency.py [--n 10] [--warmup 2] [--imgsz 640] [--threads 0] [CKPT ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from conftest import fixtures_root  # noqa: E402  (the one fixture lookup of the tests)

from reparam.converter.checkpoint import read_checkpoint  # noqa: E402
from reparam.converter.convert import prune  # noqa: E402
from reparam.converter.export import Predictions, export_onnx  # noqa: E402
from reparam.models import fuse_model  # noqa: E402

DEFAULT = ["yolov9-t-dual-best", "yolov9-c-quarter-dual"]


def median_ms(fn, x, n: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def models_of(path: Path):
    ck = read_checkpoint(path)
    pruned = prune(ck.cfg, ck.nc, ck.names, ck.state_dict)  # the converter's own rule, exactness checked
    dual, deploy = pruned.dual.float().eval(), pruned.deploy.float().eval()
    return dual, deploy, fuse_model(copy.deepcopy(deploy)).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpts", nargs="*", default=DEFAULT, help="fixture stems or checkpoint paths")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT intra-op threads (0: library default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime as ort

    x = torch.rand(1, 3, args.imgsz, args.imgsz, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.ckpts:
        path = Path(name) if name.endswith(".pt") else fixtures_root() / "ckpt" / f"{name}.pt"
        dual, deploy, fused = models_of(path)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "m.onnx"
            export_onnx(Predictions(fused), onnx_path, x)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if args.threads:
                opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
            feed = x.numpy()
            with torch.inference_mode():
                t = {
                    "dual": median_ms(dual, x, args.n, args.warmup),
                    "deploy": median_ms(deploy, x, args.n, args.warmup),
                    "fused": median_ms(fused, x, args.n, args.warmup),
                    "onnxruntime": median_ms(lambda a, s=sess: s.run(None, {"images": a}), feed, args.n, args.warmup),
                }
        rows.append((path.stem, t))
        print(f"# {path.stem}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items()), file=sys.stderr, flush=True)

    print(f"\nCPU latency, batch 1, {args.imgsz}x{args.imgsz}, fp32, median of {args.n} after {args.warmup} warm-up "
          f"(torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads)\n")
    print("| checkpoint | dual ms | deploy ms (x dual) | fused deploy ms (x dual) | ORT fused deploy ms (x dual) |")
    print("|---|---|---|---|---|")
    for stem, t in rows:
        d = t["dual"]
        cells = [f"{t[k]:.1f} ({t[k] / d:.2f}x)" for k in ("deploy", "fused", "onnxruntime")]
        print(f"| {stem} | {d:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
