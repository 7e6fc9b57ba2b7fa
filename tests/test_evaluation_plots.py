"""The evaluation's confusion matrix (official val.py rule, hand-made cases), its plots and tables, and where
matplotlib may be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reparam.evaluation.confusion import box_iou, confusion_matrix, image_confusion

REPO = Path(__file__).resolve().parents[1]


def det(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def test_box_iou_values():
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], dtype=float)
    assert box_iou(a, b).tolist() == [[1.0, 50 / 150, 0.0, 0.0]]


def test_match_class_confusion_and_background():
    """Two labels (class 0 and 1): one found with the right class, one found as class 2; a stray detection; a
    detection under the score threshold; a label nobody found."""
    labels = (np.array([0, 1, 2]), np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=float))
    d = det([0, 0, 10, 9, 0.9, 0],  # IoU 0.9 with label 0: correct
            [20, 20, 30, 31, 0.8, 2],  # IoU 0.91 with label 1 (class 1): detected as 2
            [70, 70, 80, 80, 0.7, 1],  # no label there: background FP of class 1
            [50, 50, 60, 60, 0.25, 2])  # exactly at conf 0.25: not counted (official: score > conf)
    cm = image_confusion(*labels, d, nc=3)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1  # red found as red
    expected[2, 1] = 1  # green found as blue
    expected[1, 3] = 1  # a green detection on background
    expected[3, 2] = 1  # the blue label missed
    assert cm.tolist() == expected.tolist()


def test_iou_threshold_is_strict_and_each_side_matches_once():
    labels = (np.array([0]), np.array([[0, 0, 10, 10]], dtype=float))
    # IoU exactly 0.45 is no match (official: iou > iou_thres): one missed label and one background detection
    w = 4.5  # box [0, 0, 4.5, 10] inside the label: IoU 45/100
    cm = image_confusion(*labels, det([0, 0, w, 10, 0.9, 0]), nc=1)
    assert cm.tolist() == [[0, 1], [1, 0]]
    # two detections on one label: the higher IoU matches, the other is a background FP
    cm = image_confusion(*labels, det([0, 0, 10, 10, 0.5, 0], [0, 0, 10, 8, 0.9, 0]), nc=1)
    assert cm.tolist() == [[1, 1], [0, 0]]


def test_detection_whose_best_label_is_taken_stays_unmatched():
    """Official rule: a detection keeps only its best label; if another detection takes that label, it does not
    fall back to its second-best one."""
    labels = (np.array([0, 0]), np.array([[0, 0, 10, 10], [0, 0, 10, 14]], dtype=float))
    d = det([0, 0, 10, 10, 0.9, 0],  # IoU 1.0 with label 0, 0.71 with label 1
            [0, 0, 10, 11, 0.8, 0])  # IoU 0.91 with label 0 (taken), 0.79 with label 1
    cm = image_confusion(*labels, d, nc=1)
    assert cm.tolist() == [[1, 1], [1, 0]]


def test_images_without_labels_or_detections():
    empty_labels = (np.zeros(0, dtype=np.int64), np.zeros((0, 4)))
    cm = confusion_matrix([empty_labels, (np.array([1]), np.array([[0, 0, 5, 5]], dtype=float))],
                          [det([0, 0, 5, 5, 0.9, 1]), det()], nc=2)
    # the FP in the image without labels counts (the official code drops it); the label without detection too
    assert cm.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]


def test_matplotlib_only_on_the_evaluation_path():
    """``reparam`` (the CLI's start), the operator and the converter's report writing never import matplotlib."""
    code = ("import sys, reparam.cli, reparam.operator.main, reparam.converter.artifacts as a; "
            "a.artifact_names('x'); import reparam.evaluation; "
            "print('matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("nc", [1, 3, 40])
def test_plots_have_the_documented_size(tmp_path, nc):
    """PNG files of the documented pixel sizes for any class count, the tables with one row per class."""
    from PIL import Image

    from reparam.evaluation.plots import CONFUSION_PX, PR_CURVE_PX, write_evaluation_files
    from reparam.evaluation.result import ClassMetrics, EvalCurves, EvalResult

    rec = np.linspace(0, 1, 101)
    prec = np.clip(1 - rec[:, None] * np.linspace(0.1, 0.9, nc)[None], 0, 1)
    prec[:, 0] = np.nan  # a class without labels
    cm = np.arange((nc + 1) ** 2, dtype=np.int64).reshape(nc + 1, nc + 1)
    per_class = [ClassMetrics(f"c{k}", 0 if k == 0 else k, None if k == 0 else 0.5, None if k == 0 else 0.75,
                              None if k == 0 else 0.6, None if k == 0 else 0.7) for k in range(nc)]
    res = EvalResult("pt", None, 0.5, 0.75, 0.6, 0.7, per_class, {"source": "here", "images": 2, "digest": "ab" * 32},
                     {}, curves=EvalCurves(rec, prec, cm, 0.25, 0.45))
    files = write_evaluation_files(res, tmp_path, "m")
    assert [f["name"] for f in files] == ["m-eval-pr-curve.png", "m-eval-confusion-matrix.png",
                                          "m-eval-per-class.csv", "m-eval-confusion-matrix.csv"]
    with Image.open(tmp_path / "m-eval-pr-curve.png") as im:
        assert im.format == "PNG" and im.size == PR_CURVE_PX
    with Image.open(tmp_path / "m-eval-confusion-matrix.png") as im:
        assert im.format == "PNG" and im.size == CONFUSION_PX
    rows = (tmp_path / "m-eval-per-class.csv").read_text().splitlines()
    assert rows[0] == "class,instances,precision,recall,map50,map50_95" and len(rows) == nc + 2
    assert rows[1] == f"all,{sum(range(nc))},0.6,0.7,0.75,0.5" and rows[2] == "c0,0,,,,"
    counts = (tmp_path / "m-eval-confusion-matrix.csv").read_text().splitlines()
    assert counts[-1].split(",")[0] == "background" and len(counts) == nc + 2
    assert [int(v) for v in counts[1].split(",")[1:]] == cm[0].tolist()
