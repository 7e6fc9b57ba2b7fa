"""CPU time of the end-to-end NMS: the ONNX graph (onnxruntime) and the check's numpy reference, both semantics.

Synthetic dense predictions ``y [1, 4 + nc, A]`` (640x640 image: A = 8400, nc = 80; boxes uniform over the image,
class scores ``u ** k`` so that a few are high), median of N runs after one warm-up. Also says whether the graph
and the reference agree (same detections, order-insensitive, within 1e-4). Not a test: numbers depend on the
machine and its load.

    python bench/nms.py [--n 5] [--anchors 8400] [--nc 80] [--sharpness 8] [--score-thres 0.25] [--max-det 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from reparam.converter.export import compare_detections, export_onnx, run_onnx  # noqa: E402
from reparam.converter.export.nms import NMSHead, nms_inputs, reference_detections  # noqa: E402


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--anchors", type=int, default=8400)
    ap.add_argument("--nc", type=int, default=80)
    ap.add_argument("--sharpness", type=float, default=8.0, help="class scores are uniform ** this")
    ap.add_argument("--iou-thres", type=float, default=0.45)
    ap.add_argument("--score-thres", type=float, default=0.25)
    ap.add_argument("--max-det", type=int, default=300)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    a = args.anchors
    y = torch.cat([torch.rand(1, 2, a, generator=g) * 640, torch.rand(1, 2, a, generator=g) * 100 + 5,
                   torch.rand(1, args.nc, a, generator=g) ** args.sharpness], 1)
    boxes, scores = nms_inputs(y)
    print(f"A={a}, nc={args.nc}: candidates best-class {int((scores.amax(1) > args.score_thres).sum())}, "
          f"multi-label {int((scores > args.score_thres).sum())}\n")
    print("| semantics | num_dets | ONNX graph ms (onnxruntime, with session start) | numpy reference ms | agree |")
    print("|---|---|---|---|---|")
    for multi_label in (False, True):
        settings = dict(iou_thres=args.iou_thres, score_thres=args.score_thres, max_det=args.max_det,
                        multi_label=multi_label)
        ref = reference_detections(boxes, scores, **settings)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "nms.onnx"
            export_onnx(NMSHead(**settings), path, y, dynamic=True)
            data = path.read_bytes()
            got = run_onnx(data, y)
            t_graph = median_ms(lambda d=data: run_onnx(d, y), args.n)
        t_ref = median_ms(lambda kw=settings: reference_detections(boxes, scores, **kw), args.n)
        _, why = compare_detections(ref, got, 1e-4)
        print(f"| {'multi-label' if multi_label else 'best-class'} | {int(got[0][0, 0])} | {t_graph:.0f} | "
              f"{t_ref:.0f} | {'yes' if not why else 'NO: ' + why} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
