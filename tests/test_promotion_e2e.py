"""Champion/challenger end to end (issue #11): ``reparam convert --register --eval-data --promote`` against the
session's real ``mlflow server`` (artifacts in the real SeaweedFS S3), with the eval fixture's early (mAP@0.5:0.95
~0.464) and final (~0.834) checkpoints at ``--eval-imgsz 160``.

Order matters (one registered model per module): early -> champion; final -> promoted over it; early under other
settings -> held ("regression", @challenger set); --min-map holds; a subset of the val images (another digest)
makes the champion be evaluated first; the race protocol, played deterministically through ``_after_set``.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pytest

from test_registry_e2e import cli_env, one_error_line, reparam
from reparam import exitcodes
from reparam.report import Report, Source, Validation
from reparam.store import champion, registry
from reparam.store.promotion import Gates

pytestmark = [pytest.mark.servers, pytest.mark.slow]

COMMON = ("--imgsz", "160", "--eval-imgsz", "160", "--only", "pt", "--json", "-q")


@pytest.fixture(scope="module")
def env(s3_server, mlflow_server):
    return cli_env(s3_server, MLFLOW_TRACKING_URI=mlflow_server.tracking_uri, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def name():
    return f"shapes-deploy-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.tracking_uri)


def convert(fixtures, which: str, name: str, env, *extra: str, data=None) -> dict:
    proc = reparam("convert", str(fixtures / "eval" / f"yolov9-t-dual-shapes-{which}.pt"), "--register", name,
                   "--eval-data", str(data or fixtures / "eval"), "--promote", "champion", *COMMON, *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def holder(client, name: str, alias: str = "champion") -> str | None:
    v = client.get_registered_model(name).aliases.get(alias)
    return None if v is None else str(v)


def test_bad_promote_requests_exit_2_before_anything(fixtures, env, name, client):
    src = str(fixtures / "eval" / "yolov9-t-dual-shapes-early.pt")
    cases = [(("--register", name, "--promote", "champion"), "--promote needs --eval-data DATA"),
             (("--eval-data", str(fixtures / "eval"), "--promote", "champion"), "--promote needs --register NAME"),
             (("--register", name, "--min-map", "0.5"), "need --promote ALIAS"),
             (("--register", name, "--eval-data", str(fixtures / "eval"), "--promote", "champion", "--min-map", "2"),
              "--min-map must be between 0 and 1")]
    for args, message in cases:
        proc = reparam("convert", src, *args, env=env)
        assert proc.returncode == exitcodes.INVALID_INPUT, proc.stderr
        assert message in one_error_line(proc)
    assert client.search_registered_models(f"name = '{name}'") == []


def assert_eval_plots(client, mv, report: dict, fixtures, tmp_path) -> None:
    """The evaluation's plots and tables are artifacts of the version's run (``evaluation/``) and of its logged
    model, byte for byte as listed in the report; the PNGs are images of the documented size; the confusion counts
    are those of the registered .pt's own detections on the fixture set."""
    import csv
    import hashlib

    from PIL import Image

    from reparam.evaluation import EvalSettings, detect_dataset, load_model, open_dataset
    from reparam.evaluation.plots import CONFUSION_PX, PR_CURVE_PX

    listed = {f["name"]: f for f in report["evaluation"]["files"]}
    assert sorted(f["kind"] for f in listed.values()) == ["confusion_counts", "confusion_matrix", "per_class",
                                                          "pr_curve"]
    on_run = {Path(a.path).name for a in client.list_artifacts(mv.run_id, registry.EVAL_ARTIFACT_PATH)}
    assert on_run == set(listed)
    on_model = {a.path for a in client.list_logged_model_artifacts(registry.model_id_of(mv))}
    assert set(listed) <= on_model
    run_dir = Path(client.download_artifacts(mv.run_id, registry.EVAL_ARTIFACT_PATH, str(tmp_path / "run")))
    model_dir = Path(mlflow.artifacts.download_artifacts(client.get_model_version_download_uri(mv.name, mv.version),
                                                         dst_path=str(tmp_path / "model"),
                                                         tracking_uri=client.tracking_uri))
    for name, f in listed.items():
        for where in (run_dir, model_dir):
            assert hashlib.sha256((where / name).read_bytes()).hexdigest() == f["sha256"], (where, name)
    by_kind = {f["kind"]: run_dir / name for name, f in listed.items()}
    for kind, size in (("pr_curve", PR_CURVE_PX), ("confusion_matrix", CONFUSION_PX)):
        with Image.open(by_kind[kind]) as im:
            assert im.format == "PNG" and im.size == size
    counts = list(csv.reader(by_kind["confusion_counts"].open()))
    assert counts[0] == ["predicted\\true", "red", "green", "blue", "background"]
    cm = np.array([[int(v) for v in row[1:]] for row in counts[1:]])
    (pt,) = model_dir.glob("*-converted.pt")
    ds = open_dataset(fixtures / "eval", tmp_path / "ds")
    run = detect_dataset(load_model(pt), ds, EvalSettings(imgsz=160))
    confident = np.concatenate([d[d[:, 4] > 0.25] for d in run.per_image if d is not None])
    assert cm[:3].sum(1).tolist() == np.bincount(confident[:, 5].astype(int), minlength=3).tolist()
    assert cm[:, :3].sum(0).tolist() == [61, 79, 70] and cm[3, 3] == 0
    per_class = list(csv.DictReader(by_kind["per_class"].open()))
    assert per_class[0]["class"] == "all" and float(per_class[0]["map50_95"]) == report["promotion"]["map50_95"]


def test_champion_challenger_sequence(fixtures, env, name, client, tmp_path):
    early = convert(fixtures, "early", name, env)
    p = early["promotion"]
    assert p["decision"] == "promoted" and p["previous_version"] is None and p["alias"] == "champion"
    assert 0.40 < p["map50_95"] < 0.52
    digest = early["evaluation"]["dataset"]["digest"]
    assert p["compared_on_digest"] == digest
    assert holder(client, name) == "1"
    t1 = client.get_model_version(name, "1").tags
    assert t1["reparam.promotion"] == "promoted" and t1["reparam.eval.digest"] == digest
    assert float(t1["reparam.eval.map50_95"]) == pytest.approx(p["map50_95"])
    # metrics on the run and the logged model, linked to the dataset input
    mv1 = client.get_model_version(name, "1")
    run = client.get_run(mv1.run_id)
    assert run.data.metrics["eval_map50_95"] == pytest.approx(p["map50_95"])
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest[:32]]
    lm = client.get_logged_model(registry.model_id_of(mv1))
    assert {m.key: m.value for m in lm.metrics}["eval_map50_95"] == pytest.approx(p["map50_95"])
    assert {m.dataset_digest for m in lm.metrics if m.key.startswith("eval_")} == {digest[:32]}
    assert_eval_plots(client, mv1, early, fixtures, tmp_path)

    final = convert(fixtures, "final", name, env)
    p2 = final["promotion"]
    assert p2["decision"] == "promoted" and p2["previous_version"] == "1"
    assert p2["previous_map50_95"] == pytest.approx(p["map50_95"]) and p2["map50_95"] > 0.78
    assert holder(client, name) == "2"
    assert final["registry"]["aliases"] == ["champion"] and final["registry"]["previous_aliases"] == {"champion": "1"}

    again = convert(fixtures, "early", name, env, "--atol", "0.0002", "--hold-alias", "challenger")
    p3 = again["promotion"]
    assert p3["decision"] == "held" and p3["reason"].startswith("regression") and p3["previous_version"] == "2"
    assert again["registry"]["version"] == "3" and again["registry"]["aliases"] == ["challenger"]
    assert holder(client, name) == "2" and holder(client, name, "challenger") == "3"
    t3 = client.get_model_version(name, "3").tags
    assert t3["reparam.promotion"] == "held" and t3["reparam.promotion_reason"].startswith("regression")

    # the same conversion again: nothing converted, the existing version 2 (the holder) stays promoted
    same = convert(fixtures, "final", name, env)
    assert same["registry"]["existing"] is True and same["registry"]["version"] == "2"
    assert same["promotion"]["decision"] == "promoted" and same["promotion"]["previous_version"] is None
    assert same["promotion"]["map50_95"] == pytest.approx(p2["map50_95"])

    gate = convert(fixtures, "final", name, env, "--atol", "0.0003", "--min-map", "0.99")
    assert gate["promotion"]["decision"] == "held" and "below --min-map 0.99" in gate["promotion"]["reason"]
    assert holder(client, name) == "2"

    # another dataset digest: half of the val images; the champion (v2) has no metrics on it and is evaluated first
    sub = tmp_path / "half"
    (sub / "images" / "val").mkdir(parents=True)
    (sub / "labels" / "val").mkdir(parents=True)
    shutil.copyfile(fixtures / "eval" / "data.yaml", sub / "data.yaml")
    for img in sorted((fixtures / "eval" / "images" / "val").glob("*.jpg"))[:32]:
        shutil.copyfile(img, sub / "images" / "val" / img.name)
        shutil.copyfile(fixtures / "eval" / "labels" / "val" / f"{img.stem}.txt",
                        sub / "labels" / "val" / f"{img.stem}.txt")
    half = convert(fixtures, "early", name, env, data=sub)
    p5 = half["promotion"]
    new_digest = half["evaluation"]["dataset"]["digest"]
    assert new_digest != digest and p5["compared_on_digest"] == new_digest
    assert p5["decision"] == "held" and p5["reason"].startswith("regression") and p5["previous_version"] == "2"
    t2 = client.get_model_version(name, "2").tags
    re_eval = champion.measured_from_tags(t2, new_digest, 160)
    assert re_eval is not None and re_eval.map50_95 == pytest.approx(p5["previous_map50_95"])
    assert champion.measured_from_tags(t2, digest, 160).map50_95 == pytest.approx(p2["map50_95"])  # kept


def _report_of(client, name: str, version: str, digest: str) -> Report:
    """A conversion report of an existing version, rebuilt from its evaluation tags on ``digest`` at 160 px."""
    m = champion.measured_from_tags(client.get_model_version(name, version).tags, digest, 160)
    return Report(status="succeeded", source=Source(uri=f"models:/{name}/{version}"),
                  validation=Validation(passed=True, max_abs_diff=None),
                  evaluation={"dataset": {"digest": m.digest}, "settings": {"imgsz": m.imgsz},
                              "dual": {"map50_95": m.map50_95, "map50": m.map50},
                              "artifacts": [{"format": "pt", "map50_95": m.map50_95, "map50": m.map50,
                                             "passed": True}]})


def test_race_never_leaves_the_alias_on_the_worse_model(name, client, mlflow_server):
    """Versions 1 (early) and 2 (final) race for @race: whichever sets last, the alias ends on version 2."""
    def never(_path):
        raise AssertionError("both versions carry metrics on this dataset: nothing is evaluated")

    digest = client.get_model_version(name, "1").tags["reparam.eval.digest"]  # the full val set
    # the better one sets, then the worse one overwrites it: the better one takes it back
    won = champion.promote_gated(name, "2", "race", _report_of(client, name, "2", digest), Gates(), evaluate=never,
                                 tracking_uri=mlflow_server.tracking_uri,
                                 _after_set=other_sets_alias(client, name, "race", "1"))
    assert won.decision == "promoted" and holder(client, name, "race") == "2"
    # the worse one sets (no holder yet for @race2), then the better one overwrites it: the worse one yields
    lost = champion.promote_gated(name, "1", "race2", _report_of(client, name, "1", digest), Gates(), evaluate=never,
                                  tracking_uri=mlflow_server.tracking_uri,
                                  _after_set=other_sets_alias(client, name, "race2", "2"))
    assert lost.decision == "held" and lost.rule == "superseded" and "version 2" in lost.reason
    assert holder(client, name, "race2") == "2"
    assert client.get_model_version(name, "1").tags["reparam.promotion"] == "held"


def other_sets_alias(client, name: str, alias: str, version: str):
    return lambda: client.set_registered_model_alias(name, alias, version)


def test_two_concurrent_conversions_leave_the_alias_on_the_better_model(fixtures, env, client):
    """Two real ``reparam convert --promote`` processes racing for a new model's first @champion."""
    import subprocess
    import sys

    race_name = f"shapes-race-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, "-m", "reparam.cli", "convert",
                               str(fixtures / "eval" / f"yolov9-t-dual-shapes-{which}.pt"), "--register", race_name,
                               "--eval-data", str(fixtures / "eval"), "--promote", "champion", *COMMON],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for which in ("final", "early")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    final, early = (json.loads(o[0]) for o in outs)
    assert holder(client, race_name) == final["registry"]["version"]
    assert final["promotion"]["decision"] == "promoted"
    # the early one was either held against the final one or superseded after it
    tags = client.get_model_version(race_name, early["registry"]["version"]).tags
    if early["promotion"]["decision"] == "held":
        assert tags["reparam.promotion"] == "held"
        assert early["promotion"]["rule"] in ("regression", "superseded")
