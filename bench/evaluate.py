"""Throughput of ``reparam evaluate`` next to a plain torch loop of the same model on the same data (one run each).

* ``reparam evaluate``: the ``reparam evaluate MODEL --data DATA --json`` command (wall time of the process,
  start-up and model load included), and its own images/s over the pass (read, letterbox, forward, NMS);
* plain torch loop: the same model (our :class:`DetectionModel`, fp32), the same images read with OpenCV and
  letterboxed to the same shapes, batched the same way, forward only: no NMS, no metrics. The ratio shows what
  the evaluation adds around the forward pass.

Not a test: numbers depend on the machine and its load.

    python bench/evaluate.py [--model CKPT] [--data DATA] [--imgsz 160] [--batch 16] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from reparam.evaluation import load_model, open_dataset  # noqa: E402
from reparam.evaluation.letterbox import letterbox, load_image, rect_batches, to_tensor  # noqa: E402


def fixtures_root() -> Path:
    env = os.environ.get("REPARAM_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


def plain_loop(model_path: Path, data: Path, imgsz: int, batch: int) -> tuple[float, int]:
    """Seconds and images of a forward-only pass over the dataset's val split."""
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        ds = open_dataset(data, Path(work))
        model = load_model(model_path)
        t0 = time.perf_counter()
        for idx, shape in rect_batches([(i.width, i.height) for i in ds.items], batch, imgsz, model.stride):
            x = to_tensor([letterbox(load_image(str(ds.items[j].path), imgsz)[0], shape)[0] for j in idx])
            model.predict(x)
        return time.perf_counter() - t0, len(ds.items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=fixtures_root() / "eval" / "yolov9-t-dual-shapes-final.pt")
    ap.add_argument("--data", type=Path, default=fixtures_root() / "eval")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads, also OMP_NUM_THREADS of the reparam process (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reparam.cli", "evaluate", str(args.model), "--data", str(args.data),
                           "--imgsz", str(args.imgsz), "--batch", str(args.batch), "--json", "-q"],
                          capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    ev = json.loads(proc.stdout)["evaluation"]
    entry = ev["dual"] or ev["artifacts"][0]
    images = ev["dataset"]["images"]
    plain_s, plain_n = plain_loop(args.model, args.data, args.imgsz, args.batch)
    print(f"model {args.model.name}, data {args.data} ({images} images), imgsz {args.imgsz}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'':34} {'images/s':>9} {'seconds':>8}")
    print(f"{'reparam evaluate (process wall)':34} {images / wall:9.2f} {wall:8.1f}")
    print(f"{'reparam evaluate (pass only)':34} {entry['images_per_s']:9.2f} {images / entry['images_per_s']:8.1f}")
    print(f"{'plain torch loop (forward only)':34} {plain_n / plain_s:9.2f} {plain_s:8.1f}")
    print(f"mAP@0.5:0.95 {entry['map50_95']:.4f}, mAP@0.5 {entry['map50']:.4f}")


if __name__ == "__main__":
    main()
