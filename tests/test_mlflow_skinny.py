"""The registry paths work with the ``mlflow-skinny`` client the ``[converter]`` extra installs (issue 17.8).

``tests/skinny_client.py`` runs ``reparam`` with every module that only the full ``mlflow`` package brings made
unimportable, against the real ``mlflow server`` of the suite: register (ONNX flavor included), promote, fetch a
``models:/`` source back; and the default local sqlite store with ``sqlalchemy``/``alembic`` (installed by the
extra) as the only additions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest

import report_schema
import skinny_client
from reparam import exitcodes

pytestmark = [pytest.mark.servers, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"


def skinny(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).with_name("skinny_client.py")), *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(REPO / "src"), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", **extra)
    return env


def loaded_blocked(proc: subprocess.CompletedProcess) -> str:
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("skinny-client:")][-1]
    return line.split("loaded=")[1]


def test_blocked_modules_are_what_full_mlflow_adds_over_skinny() -> None:
    def requires(dist: str) -> set[str]:
        return {re.split(r"[ <>=!~;\[(]", r)[0].lower() for r in metadata.requires(dist) or [] if "extra ==" not in r}

    extra = requires("mlflow") - requires("mlflow-skinny") - {"mlflow-skinny", "mlflow-tracing", "numpy",
                                                               "cryptography"}
    assert extra == set(skinny_client.FULL_ONLY)
    converter = {re.split(r"[ <>=!~;\[(]", r)[0].lower() for r in metadata.requires("reparam") or []
                 if 'extra == "converter"' in r}
    assert "mlflow-skinny" in converter and "mlflow" not in converter
    assert {"sqlalchemy", "alembic"} <= converter  # the default local store


def test_register_promote_and_fetch_with_the_skinny_client(mlflow_server, s3_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    env = clean_env(**s3_server.env())
    name = f"skinny-{uuid.uuid4().hex[:8]}"
    proc = skinny("convert", str(EXAMPLE), "--imgsz", "128", "--format", "pt", "--format", "onnx", "--register",
                  name, "--alias", "champion", "--tracking-uri", mlflow_server.tracking_uri, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert loaded_blocked(proc) == "none"
    report = report_schema.check(json.loads(proc.stdout), "skinny --json report")
    assert report["registry"]["model_uri"] == f"models:/{name}/1" and report["registry"]["aliases"] == ["champion"]
    assert report["registry"]["tracking_uri"] == mlflow_server.tracking_uri
    c = MlflowClient(mlflow_server.tracking_uri)
    mv = c.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == "1" and mv.tags["reparam.deploy_sha256"] == report["deploy_sha256"]
    run = c.get_run(report["registry"]["run_id"])
    # the conversion's own wall time (the report's timing.total_s when it was registered; the final total_s adds
    # the fetch and the registration)
    assert 0 < run.data.metrics["duration_s"] < report["timing"]["total_s"] - report["timing"]["register_s"]

    # the download path: the registered version as a source
    proc = skinny("inspect", f"models:/{name}@champion", "--tracking-uri", mlflow_server.tracking_uri, "--json",
                  env=env)
    assert proc.returncode == 0, proc.stderr
    assert loaded_blocked(proc) == "none"
    desc = json.loads(proc.stdout)
    assert desc["source"]["sha256"] == report["deploy_sha256"] and desc["head"] == "DDetect"

    proc = skinny("inspect", f"models:/{name}/9", "--tracking-uri", mlflow_server.tracking_uri, env=env)
    assert proc.returncode == exitcodes.SOURCE_ERROR and "Traceback" not in proc.stderr


def test_default_local_store_with_the_skinny_client(tmp_path: Path) -> None:
    proc = skinny("--local-store", "convert", str(EXAMPLE), "--imgsz", "64", "-q", "--register", "local-skinny",
                  env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert loaded_blocked(proc) == "none"
    assert f"Registered in MLflow at sqlite:///{tmp_path}/mlruns/mlflow.db" in proc.stdout
    assert "models:/local-skinny/1" in proc.stdout
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
