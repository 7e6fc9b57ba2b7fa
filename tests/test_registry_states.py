"""Registry objects that are not READY, and tag changes, against a real ``mlflow server`` (issue #9, points 1 and 7).

How the server is driven into each state:

- Model version ``PENDING_REGISTRATION`` / ``FAILED_REGISTRATION``: MLflow's OSS SQL store creates every version
  ``READY`` (``status`` column default in ``mlflow/store/model_registry/dbmodels/models.py``; no OSS call writes
  another value, only an asynchronous registry such as Unity Catalog does). So the test writes the ``status`` (and
  ``status_message``) column of the server's own sqlite store, as such a registry records an unfinished or failed
  registration, and the real server then serves that state over REST to the real ``reparam`` command.
- MLflow 3 logged model ``PENDING`` / ``FAILED``: real API calls (``create_logged_model`` leaves it ``PENDING``,
  ``finalize_logged_model(..., FAILED)`` is what an interrupted ``log_model`` records).
- Run ``FAILED``: ``set_terminated(run_id, "FAILED")``, what MLflow records for a training that raised.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from reparam import exitcodes
from reparam.errors import InvalidInputError, SourceError
from reparam.store.sources import fetch

pytestmark = [pytest.mark.servers, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARGS = ("--imgsz", "160", "--json")


def set_version_status(server, name: str, version: str, status: str, message: str | None = None) -> None:
    """Write a model version's MLflow status in the server's own sqlite store (see the module docstring)."""
    path = server.backend_uri[len("sqlite:///") :]
    with sqlite3.connect(path, timeout=30) as db:
        cur = db.execute("UPDATE model_versions SET status = ?, status_message = ? WHERE name = ? AND version = ?",
                         (status, message, name, int(version)))  # fmt: skip
        assert cur.rowcount == 1


def cli_env(s3_server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(s3_server.env())
    env.update({"PYTHONPATH": str(REPO / "src"), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                "PYTHONUNBUFFERED": "1"})  # fmt: skip
    return env


def reparam(*args: str, server, s3_server, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reparam.cli", "convert", *args, "--tracking-uri",
                           server.tracking_uri], capture_output=True, text=True, env=cli_env(s3_server),
                          timeout=timeout)  # fmt: skip


def lines(proc: subprocess.CompletedProcess, prefix: str) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]


def versions_of(client, name: str) -> dict[str, tuple[str, dict]]:
    return {str(mv.version): (mv.status, dict(mv.tags or {}))
            for mv in client.search_model_versions(f"name = '{name}'")}


@pytest.fixture(scope="module")
def world(mlflow_server, s3_server, fixtures, tmp_path_factory):
    """A training run that FAILED with ``weights/best.pt``; a source model whose versions 1..3 hold the same
    checkpoint through one READY logged model; logged models left PENDING and finalized FAILED, each behind a
    version of a second source model."""
    from mlflow import MlflowClient

    ckpt = fixtures / "ckpt" / "yolov9-t-dual-best.pt"
    c = MlflowClient(mlflow_server.tracking_uri)
    tag = uuid.uuid4().hex[:8]
    exp = c.create_experiment(f"states-{tag}")
    run = c.create_run(exp)
    w = tmp_path_factory.mktemp("weights")
    shutil.copyfile(ckpt, w / "best.pt")
    c.log_artifact(run.info.run_id, str(w / "best.pt"), "weights")
    c.set_terminated(run.info.run_id, "FAILED")

    src = f"states-src-{tag}"
    c.create_registered_model(src)
    lm = c.create_logged_model(exp, name="dual", source_run_id=run.info.run_id)
    c.log_model_artifacts(lm.model_id, str(w))
    c.finalize_logged_model(lm.model_id, "READY")
    for _ in range(3):
        c.create_model_version(src, f"models:/{lm.model_id}", model_id=lm.model_id)

    lm_src = f"states-lm-{tag}"
    c.create_registered_model(lm_src)
    pending = c.create_logged_model(exp, name="dual-pending")
    c.log_model_artifacts(pending.model_id, str(w))  # never finalized: PENDING
    failed = c.create_logged_model(exp, name="dual-failed")
    c.log_model_artifacts(failed.model_id, str(w))
    c.finalize_logged_model(failed.model_id, "FAILED")
    for m in (pending, failed):
        c.create_model_version(lm_src, f"models:/{m.model_id}", model_id=m.model_id)
    return {"client": c, "run_id": run.info.run_id, "src": src, "lm_src": lm_src, "pending_id": pending.model_id,
            "failed_id": failed.model_id, "tag": tag, "ckpt": ckpt}  # fmt: skip


# --- sources --------------------------------------------------------------------------------------------------


def test_failed_registration_source_is_exit_2_and_registers_nothing(world, mlflow_server, s3_server):
    src, c = world["src"], world["client"]
    set_version_status(mlflow_server, src, "1", "FAILED_REGISTRATION", "copy of the artifacts failed")
    deploy = f"states-deploy-failed-{world['tag']}"
    proc = reparam(f"models:/{src}/1", "--register", deploy, "--alias", "prod", *ARGS, server=mlflow_server,
                   s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.INVALID_INPUT, proc.stderr
    (line,) = lines(proc, "reparam: error:")
    assert line == (f"reparam: error: fetch models:/{src}/1: model version 1 of {src} is FAILED_REGISTRATION "
                    "(copy of the artifacts failed): its registration did not complete, so its files cannot be "
                    "trusted; register the checkpoint again and convert the new version")  # fmt: skip
    assert proc.stdout == ""
    assert c.search_registered_models(f"name = '{deploy}'") == []
    assert c.get_model_version(src, "1").status == "FAILED_REGISTRATION"  # untouched


def test_pending_registration_source_is_waited_for_then_exit_4(world, mlflow_server, s3_server):
    src, c = world["src"], world["client"]
    set_version_status(mlflow_server, src, "2", "PENDING_REGISTRATION")
    deploy = f"states-deploy-pending-{world['tag']}"
    t0 = time.monotonic()
    proc = reparam(f"models:/{src}/2", "--register", deploy, "--registry-wait", "2", *ARGS, server=mlflow_server,
                   s3_server=s3_server)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == exitcodes.SOURCE_ERROR, proc.stderr
    (line,) = lines(proc, "reparam: error:")
    assert line == (f"reparam: error: fetch models:/{src}/2: model version 2 of {src} is PENDING_REGISTRATION after "
                    "waiting 2 s (its registration has not finished); retry later or wait longer with "
                    "--registry-wait SECONDS")  # fmt: skip
    assert elapsed >= 2.0
    assert c.search_registered_models(f"name = '{deploy}'") == []
    assert c.get_model_version(src, "2").status == "PENDING_REGISTRATION"


def test_pending_source_that_becomes_ready_within_the_wait_is_fetched(world, mlflow_server, tmp_path):
    src = world["src"]
    set_version_status(mlflow_server, src, "3", "PENDING_REGISTRATION")
    timer = threading.Timer(1.5, set_version_status, (mlflow_server, src, "3", "READY"))
    timer.start()
    try:
        t0 = time.monotonic()
        got = fetch(f"models:/{src}/3", tmp_path, tracking_uri=mlflow_server.tracking_uri, registry_wait=30)
        elapsed = time.monotonic() - t0
    finally:
        timer.cancel()
    assert got.sha256 == fetch(str(world["ckpt"]), tmp_path).sha256
    assert got.lineage["source_model_version"] == "3" and 1.5 <= elapsed < 30


@pytest.mark.parametrize("state", ["PENDING", "FAILED"])
def test_logged_model_behind_a_version_must_be_ready(state, world, mlflow_server, tmp_path):
    version = {"PENDING": "1", "FAILED": "2"}[state]
    model_id = world["pending_id" if state == "PENDING" else "failed_id"]
    uri = f"models:/{world['lm_src']}/{version}"
    assert world["client"].get_model_version(world["lm_src"], version).status == "READY"  # the version itself is
    t0 = time.monotonic()
    with pytest.raises((SourceError, InvalidInputError)) as ei:
        fetch(uri, tmp_path, tracking_uri=mlflow_server.tracking_uri, registry_wait=1)
    what = f"fetch {uri}: logged model {model_id} of model version {version} of {world['lm_src']} is {state}"
    if state == "PENDING":
        assert ei.value.exit_code == exitcodes.SOURCE_ERROR and time.monotonic() - t0 >= 1.0
        assert str(ei.value) == (f"{what} after waiting 1 s (its upload was not finalized); retry later or wait "
                                 "longer with --registry-wait SECONDS")  # fmt: skip
    else:
        assert ei.value.exit_code == exitcodes.INVALID_INPUT
        assert str(ei.value) == (f"{what}: its upload failed, so its files cannot be trusted; log the model again "
                                 "and register a new version")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing downloaded
    assert str(world["client"].get_logged_model(model_id).status) == state  # untouched


# --- one conversion: a FAILED run's checkpoint; then a broken deploy version and tag changes ------------------


@pytest.fixture(scope="module")
def converted(world, mlflow_server, s3_server):
    """``runs:/<failed run>/weights/best.pt`` -> version 1 of a fresh deploy model, alias champion, tag team=vision."""
    deploy = f"states-deploy-{world['tag']}"
    proc = reparam(f"runs:/{world['run_id']}/weights/best.pt", "--register", deploy, "--alias", "champion",
                   "--tag", "team=vision", *ARGS, server=mlflow_server, s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    return {"deploy": deploy, "proc": proc, "report": json.loads(proc.stdout),
            "uri": f"runs:/{world['run_id']}/weights/best.pt"}


def test_source_run_that_failed_is_a_warning_in_the_report_and_on_stderr(converted, world):
    warning = (f"source run {world['run_id']} is FAILED: its training did not finish; the checkpoint is what the run "
               "left behind, check that it is the one you want")  # fmt: skip
    assert lines(converted["proc"], "reparam: warning:") == [f"reparam: warning: {warning}"]
    assert converted["report"]["source"]["warnings"] == [warning]
    assert converted["report"]["registry"]["version"] == "1" and converted["report"]["registry"]["existing"] is False


def test_tag_change_updates_the_existing_version_without_a_new_one(converted, world, mlflow_server, s3_server):
    deploy, c = converted["deploy"], world["client"]
    before = versions_of(c, deploy)
    proc = reparam(converted["uri"], "--register", deploy, "--alias", "champion", "--tag", "team=perception",
                   "--tag", "stage=qa", *ARGS, server=mlflow_server, s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    report = json.loads(proc.stdout)
    assert "layers" not in report  # nothing converted
    assert report["registry"]["existing"] is True and report["registry"]["version"] == "1"
    assert report["registry"]["updated_tags"] == ["stage", "team"]
    assert f"updated tags on {deploy} version 1: stage, team" in proc.stderr
    tags = c.get_model_version(deploy, "1").tags
    assert (tags["team"], tags["stage"]) == ("perception", "qa")
    assert set(versions_of(c, deploy)) == set(before) == {"1"}
    # the same tags again: nothing to update; the human summary says which tags changed only when some did
    proc = reparam(converted["uri"], "--register", deploy, "--tag", "team=perception", "--tag", "stage=qa",
                   "--imgsz", "160", server=mlflow_server, s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert "already holds this conversion" in proc.stdout and "updated tags" not in proc.stdout
    proc = reparam(converted["uri"], "--register", deploy, "--tag", "owner=ml-team", "--imgsz", "160",
                   server=mlflow_server, s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert "  updated tags: owner" in proc.stdout.splitlines()
    assert c.get_model_version(deploy, "1").tags["owner"] == "ml-team"
    # a reserved key is refused before anything is fetched: exit 2, one line
    proc = reparam(converted["uri"], "--register", deploy, "--tag", "reparam.status=ready", *ARGS,
                   server=mlflow_server, s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert lines(proc, "reparam: error:") == [
        "reparam: error: tag 'reparam.status' is reserved (the reparam.* tags are set by reparam); choose another key"]
    assert set(versions_of(c, deploy)) == {"1"}


def test_failed_deploy_version_is_not_reused_nor_promoted(converted, world, mlflow_server, s3_server):
    """The issue's case: the deploy version holding this conversion ends FAILED_REGISTRATION. Converting again must
    not report it as "already holds this conversion" nor move ``--alias prod`` onto it: a new version is made and
    promoted; the broken one is left exactly as it was (status, tags, no alias)."""
    deploy, c = converted["deploy"], world["client"]
    set_version_status(mlflow_server, deploy, "1", "FAILED_REGISTRATION", "the registry lost the artifacts")
    broken_tags = c.get_model_version(deploy, "1").tags
    proc = reparam(converted["uri"], "--register", deploy, "--alias", "champion", "--alias", "prod", *ARGS,
                   server=mlflow_server, s3_server=s3_server)  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    report = json.loads(proc.stdout)
    assert "layers" in report  # converted again
    reg = report["registry"]
    assert reg["existing"] is False and reg["version"] == "2" and reg["aliases"] == ["champion", "prod"]
    assert reg["previous_aliases"] == {"champion": "1", "prod": None}
    assert (f"{deploy} version 1 holds this conversion but is not usable (MLflow status is FAILED_REGISTRATION "
            "(not READY)); left as it is, a new version will be registered") in proc.stderr
    versions = versions_of(c, deploy)
    assert set(versions) == {"1", "2"}
    assert versions["1"] == ("FAILED_REGISTRATION", broken_tags)
    assert versions["2"][0] == "READY" and versions["2"][1]["reparam.status"] == "ready"
    assert str(c.get_model_version_by_alias(deploy, "prod").version) == "2"
    assert str(c.get_model_version_by_alias(deploy, "champion").version) == "2"
    # and the promotion rule refuses the broken version whatever the caller says
    from reparam.store.promotion import promote

    p = promote(deploy, "1", ["prod"], validation_passed=True, tracking_uri=mlflow_server.tracking_uri)
    assert p.aliases == [] and p.skipped_reason == "MLflow status is FAILED_REGISTRATION (not READY)"
    assert str(c.get_model_version_by_alias(deploy, "prod").version) == "2"


def test_pending_deploy_version_is_not_reused_nor_promoted(converted, world, mlflow_server):
    """Runs after the test above: version 2 is the good one; a registry that has not finished it yet."""
    from reparam.store.promotion import promote
    from reparam.store.registry import find_existing

    deploy, c = converted["deploy"], world["client"]
    key = c.get_model_version(deploy, "2").tags["reparam.idempotency_key"]
    assert find_existing(deploy, key, mlflow_server.tracking_uri)["version"] == "2"
    set_version_status(mlflow_server, deploy, "2", "PENDING_REGISTRATION")
    said: list[str] = []
    assert find_existing(deploy, key, mlflow_server.tracking_uri, log=said.append) is None
    assert said == [f"{deploy} version {v} holds this conversion but is not usable (MLflow status is {s} (not READY)); "
                    "left as it is, a new version will be registered"
                    for v, s in (("1", "FAILED_REGISTRATION"), ("2", "PENDING_REGISTRATION"))]  # fmt: skip
    c.delete_registered_model_alias(deploy, "prod")
    p = promote(deploy, "2", ["prod"], validation_passed=True, tracking_uri=mlflow_server.tracking_uri)
    assert p.aliases == [] and p.skipped_reason == "MLflow status is PENDING_REGISTRATION (not READY)"
    assert "prod" not in c.get_registered_model(deploy).aliases
    assert c.get_model_version(deploy, "2").status == "PENDING_REGISTRATION"
