"""A real Prometheus scrapes the real operator while it runs a conversion.

Debian's ``prometheus`` binary listens on 127.0.0.1 (free port, temporary config and
storage, scrape interval 1 s) and scrapes the operator (``python -m reparam.operator``,
kopf) running against the kmock emulator with the test Job runner (see
test_operator_e2e.py). The test then reads the conversions counter back through
Prometheus' HTTP API, runs every Grafana dashboard query and loads the chart's alert
rules in that Prometheus, runs two gated promotions (evaluation on the eval fixture) and reads
``reparam_promotions_total{decision}`` and ``reparam_last_map50_95{model}`` back, lints the live
exposition with ``promtool check metrics``,
and checks every API request the operator made against the chart's namespaced Role.

Skipped only when the ``prometheus`` binary is absent (CI installs Debian's package).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import uuid
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from conftest import installed
from jobrunner import JobRunner, SubprocessExecutor, reparam_entrypoint
from kube_env import MC_RESOURCE, ClusterEmulator, KubeEnv, child_env, mc_path, wait_for
from operator_env import OperatorProcess, free_port
from test_chart import CHART, dashboard, dashboard_exprs, render, rule_groups, rules_of

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("require_prometheus")]


@pytest.fixture
def require_prometheus() -> str:
    return installed(PROMETHEUS, "prometheus")
NS = "scrape"
JOB = "reparam-operator"

#: kmock action -> Kubernetes RBAC verb (PATCH is the only update the clients send).
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch",
         "DELETE": "delete"}


class Prometheus:
    """One ``prometheus`` server on 127.0.0.1 with its own config and storage."""

    def __init__(self, workdir: Path, target: str, rules: dict[str, Any]) -> None:
        self.port = free_port()
        self.dir = workdir
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "Prometheus":
        assert PROMETHEUS is not None
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400: bad query; the body says why
            body = json.load(exc)
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def recorded() -> list[dict[str, Any]]:
    """Every request the emulator serves: client, method, action, resource, namespace."""
    calls: list[dict[str, Any]] = []
    original = ClusterEmulator._handle

    async def recording(self, request):  # type: ignore[no-untyped-def]
        res = request.resource
        calls.append({"agent": request.headers.get("User-Agent", ""), "action": getattr(request.action, "value", None),
                      "group": res.group if res is not None else None,
                      "plural": res.plural if res is not None else None,
                      "subresource": request.subresource, "namespace": request.namespace,
                      "path": request.url.path})
        return await original(self, request)

    mp = pytest.MonkeyPatch()
    mp.setattr(ClusterEmulator, "_handle", recording)
    yield calls
    mp.undo()


@pytest.fixture(scope="module")
def env(recorded):
    e = KubeEnv().start()
    yield e
    e.stop()


def test_prometheus_scrapes_a_conversion(env: KubeEnv, recorded, tmp_path: Path, s3_server, mlflow_server,
                                         fixtures: Path) -> None:
    # a real conversion: the shared checkpoint on the real S3 server, registered in the real MLflow server
    key = f"scrape/{uuid.uuid4().hex[:8]}/best.pt"
    s3_server.client().upload_file(str(fixtures / "ckpt" / "yolov9-t-dual-best.pt"), s3_server.bucket, key)
    status, data = env.request("POST", f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": NS},
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                       "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_DEFAULT_REGION": s3_server.region}})
    assert status in (200, 201), data
    with helm.Chart.load(CHART) as chart:
        rules = rule_groups(chart)
        exprs = dashboard_exprs(dashboard(chart))
        (role,) = [o for o in render(chart, {"watchNamespaces": [NS]}) if o["kind"] == "Role"]
    base = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "MLFLOW_"))}
    executor = SubprocessExecutor({"reparam": reparam_entrypoint()}, base)
    op = OperatorProcess(env.write_kubeconfig(tmp_path / "kubeconfig"), NS, tmp_path / "operator.log")
    (tmp_path / "prom").mkdir()
    prom = Prometheus(tmp_path / "prom", f"127.0.0.1:{op.metrics_port}", rules)
    runner = JobRunner(env, executor, namespace=NS).start()
    try:
        op.start()
        prom.start()
        wait_for(lambda: prom.value(f'up{{job="{JOB}"}}') == 1, 30, interval=0.2, what="target up")
        assert prom.value('reparam_conversions_total{outcome="succeeded"}') == 0
        example = yaml.safe_load((CHART.parents[1] / "examples" / "conversion-models-version.yaml").read_text())
        example["metadata"]["namespace"] = NS
        example["spec"]["source"] = {"uri": f"s3://{s3_server.bucket}/{key}"}
        example["spec"]["registry"]["trackingUri"] = mlflow_server.tracking_uri
        example["spec"]["registry"]["modelName"] = f"scrape-{uuid.uuid4().hex[:8]}"
        example["spec"]["job"]["envFrom"] = [{"secretRef": {"name": "s3-creds"}}]
        example["spec"]["conversion"]["formats"] = ["pt", "safetensors"]  # keep the test quick
        status, data = env.request("POST", mc_path(NS), example)
        assert status in (200, 201), data

        def phase() -> str | None:
            obj = env.get(MC_RESOURCE, NS, example["metadata"]["name"]) or {}
            return (obj.get("status") or {}).get("phase")
        wait_for(lambda: phase() == "Succeeded", 300, what="conversion Succeeded")
        wait_for(lambda: prom.value(f'reparam_conversions_total{{job="{JOB}", outcome="succeeded"}}') == 1,
                 30, interval=0.2, what="Prometheus sees the succeeded conversion")
        assert prom.value('reparam_conversions_total{outcome="failed"}') == 0
        assert prom.value('reparam_conversion_duration_seconds_count{outcome="succeeded"}') == 1
        assert prom.value("reparam_job_queue_duration_seconds_count") == 1
        assert prom.value('reparam_registry_operations_total{operation="promote", result="success"}') == 1
        assert abs(prom.value("reparam_last_success_timestamp_seconds") - time.time()) < 120
        wait_for(lambda: prom.value("reparam_conversions_in_progress") == 0, 10, interval=0.2, what="slot free")

        # every Grafana query parses and runs here; the outcome panel shows all three outcomes
        for expr in exprs:
            prom.query(expr.replace("$__rate_interval", "1m").replace("$job", ".+"))
        outcomes = prom.query(exprs[0].replace("$__rate_interval", "1m").replace("$job", ".+"))
        assert {s["metric"]["outcome"] for s in outcomes} == {"succeeded", "failed", "validation_failed"}
        # the chart's alert rules load and evaluate cleanly; none fires after a success
        groups = wait_for(lambda: [g for g in prom.api("rules")["groups"]
                                   if all(r.get("lastEvaluation", "").startswith("20") for r in g["rules"])],
                          10, interval=0.2, what="rules evaluated")
        (group,) = groups
        assert {r["name"] for r in group["rules"]} == {"ReparamConversionFailures", "ReparamNoRecentSuccess",
                                                       "ReparamReconcileErrors"}
        assert {r["health"] for r in group["rules"]} == {"ok"}
        states = {r["name"]: (r["state"], r["query"]) for r in group["rules"]}
        assert {k: v[0] for k, v in states.items()} == dict.fromkeys(states, "inactive"), states

        # gated promotions (spec.evaluation + spec.promotion) on the eval fixture: the early checkpoint is promoted
        # (first version), the final one held by minMap; Prometheus sees both decisions and the last mAP
        assert prom.value('reparam_promotions_total{decision="promoted"}') == 0
        assert prom.value('reparam_promotions_total{decision="held"}') == 0
        data_prefix = f"scrape/{uuid.uuid4().hex[:8]}/val"
        files = [fixtures / "eval" / "data.yaml"]
        for img in sorted((fixtures / "eval" / "images" / "val").glob("*.jpg"))[:16]:
            files += [img, fixtures / "eval" / "labels" / "val" / f"{img.stem}.txt"]
        for f in files:
            s3_server.client().upload_file(str(f), s3_server.bucket,
                                           f"{data_prefix}/{f.relative_to(fixtures / 'eval').as_posix()}")
        gated_model = f"scrape-gated-{uuid.uuid4().hex[:8]}"
        results = {}
        for which, promotion in (("early", {"alias": "champion"}), ("final", {"alias": "champion", "minMap": 0.99})):
            ckpt_key = f"{data_prefix}-{which}.pt"
            s3_server.client().upload_file(str(fixtures / "eval" / f"yolov9-t-dual-shapes-{which}.pt"),
                                           s3_server.bucket, ckpt_key)
            name = f"gated-{which}"
            status, data = env.request("POST", mc_path(NS), {
                "apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"source": {"uri": f"s3://{s3_server.bucket}/{ckpt_key}"},
                         "conversion": {"formats": ["pt"], "fuse": False, "atol": 1.0e-3},
                         "registry": {"trackingUri": mlflow_server.tracking_uri, "modelName": gated_model},
                         "evaluation": {"data": f"s3://{s3_server.bucket}/{data_prefix}", "imgsz": 160},
                         "promotion": promotion,
                         "job": {"envFrom": [{"secretRef": {"name": "s3-creds"}}]}}})
            assert status in (200, 201), data

            def gated_status(name: str = name) -> dict[str, Any]:
                return (env.get(MC_RESOURCE, NS, name) or {}).get("status") or {}
            wait_for(lambda: gated_status().get("phase") in ("Succeeded", "Failed"), 300, what=f"{name} finished")
            assert gated_status()["phase"] == "Succeeded", json.dumps(gated_status().get("lastFailure"))
            results[which] = gated_status()["result"]
        assert results["early"]["promotion"]["decision"] == "promoted"
        assert results["final"]["promotion"]["decision"] == "held"
        final_map = results["final"]["metrics"]["map50_95"]
        assert 0.7 < final_map < 0.99 and final_map != results["early"]["metrics"]["map50_95"]
        wait_for(lambda: prom.value('reparam_promotions_total{decision="held"}') == 1, 30, interval=0.2,
                 what="Prometheus sees the held promotion")
        assert prom.value(f'reparam_promotions_total{{job="{JOB}", decision="promoted"}}') == 1
        # the gauge holds the last succeeded evaluated conversion's mAP, per registered model
        assert prom.value(f'reparam_last_map50_95{{model="{gated_model}"}}') == final_map
        assert prom.value('count(reparam_last_map50_95)') == 1

        # the live exposition passes Prometheus' metric lint
        if PROMTOOL:
            with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
            res = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                                 timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        prom.stop()
        if op.proc is not None:
            op.stop()
        runner.stop()
    assert runner.errors == []

    # every API call the operator (kopf + its own client) made is allowed by the chart's Role
    allowed = rules_of(role)
    ops = [c for c in recorded if c["agent"].startswith(("kopf", "reparam-operator"))]
    assert {c["agent"].split("/")[0] for c in ops} == {"kopf", "reparam-operator"}
    resource_calls = [c for c in ops if c["plural"] is not None]
    assert resource_calls
    for c in resource_calls:
        res = c["plural"] + (f"/{c['subresource']}" if c["subresource"] else "")
        verb = VERBS[c["action"]]
        assert c["namespace"] == NS, c  # nothing cluster-wide
        assert verb in allowed.get((c["group"], res), set()), c
    # the rest is API discovery (allowed to every authenticated user)
    for c in ops:
        if c["plural"] is None:
            assert c["path"] == "/api" or c["path"].startswith(("/apis", "/api/v1")), c
    seen = {(c["group"], c["plural"], VERBS[c["action"]]) for c in resource_calls}
    assert {("reparam.dev", "modelconversions", "watch"), ("batch", "jobs", "create"),
            ("", "pods", "list"), ("", "events", "create")} <= seen
