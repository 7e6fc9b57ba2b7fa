"""End to end: the real operator process (kopf) against kmock's emulator on 127.0.0.1,
with the test Job runner playing the Job controller and kubelet.

Conversions run the real ``reparam`` CLI (``jobrunner.reparam_entrypoint()``): the source is the shared
yolov9-t dual checkpoint on the real S3 server (credentials only through the namespace's Secret) and the
registry is the real MLflow server, so every success or failure below is a real conversion's.
"""

from __future__ import annotations

import base64
import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from jobrunner import Gate, JobRunner, SubprocessExecutor, reparam_entrypoint
from kube_env import EVENTS, JOBS, MC_RESOURCE, PODS, KubeEnv, child_env, mc_path, wait_for
from operator_env import OperatorProcess, metric
from reparam import exitcodes
from reparam.operator import jobs

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def env():
    e = KubeEnv().start()
    yield e
    e.stop()


@pytest.fixture()
def ns(request) -> str:
    return "t-" + request.node.name.replace("test_", "").replace("_", "-")[:40]


@pytest.fixture(scope="module")
def real(s3_server, mlflow_server, fixtures):
    """The source checkpoint on S3 and the MLflow registry the Jobs use (unique names per module run)."""
    run = uuid.uuid4().hex[:8]
    key = f"operator-e2e/{run}/best.pt"
    s3_server.client().upload_file(str(fixtures / "ckpt" / "yolov9-t-dual-best.pt"), s3_server.bucket, key)
    from mlflow import MlflowClient

    return {
        "uri": f"s3://{s3_server.bucket}/{key}",
        "tracking_uri": mlflow_server.tracking_uri,
        "model": f"traffic-deploy-{run}",
        "s3": s3_server,
        "client": MlflowClient(tracking_uri=mlflow_server.tracking_uri),
    }


def alias_version(real: dict, alias: str) -> str | None:
    try:
        return str(real["client"].get_model_version_by_alias(real["model"], alias).version)
    except Exception:  # noqa: BLE001 - no such alias / model yet
        return None


@pytest.fixture()
def runner(env: KubeEnv, ns: str):
    # the child gets no S3/MLflow credentials from the test process: only what the Job's Secret gives it
    base = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "MLFLOW_"))}
    executor = SubprocessExecutor({"reparam": reparam_entrypoint()}, base)
    gate = Gate(executor)
    r = JobRunner(env, gate, namespace=ns).start()
    r.gate, r.executor_ = gate, executor  # type: ignore[attr-defined]
    yield r
    r.stop()
    assert r.errors == [], r.errors


@pytest.fixture()
def start_operator(env: KubeEnv, tmp_path: Path, ns: str):
    kubeconfig = env.write_kubeconfig(tmp_path / "kubeconfig")
    procs: list[OperatorProcess] = []

    def start(*extra: str) -> OperatorProcess:
        op = OperatorProcess(kubeconfig, ns, tmp_path / f"operator-{len(procs)}.log", *extra).start()
        procs.append(op)
        return op
    yield start
    for p in procs:
        p.stop()


REAL: dict = {}  # filled by the autouse fixture below: source URI, tracking URI, model name


@pytest.fixture(autouse=True)
def _real(real):
    REAL.update(real)


def conversion(name: str, ns: str, **spec_over) -> dict:
    spec = {
        "source": {"uri": REAL["uri"], "sha256": ""},
        "conversion": {"fuse": True, "precision": "fp16", "formats": ["pt", "safetensors"], "atol": 1e-4},
        "registry": {"trackingUri": REAL["tracking_uri"], "modelName": REAL["model"],
                     "aliases": ["champion"], "tags": {"team": "vision"}},
        "job": {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}},
                "envFrom": [{"secretRef": {"name": "s3-creds"}}], "backoffLimit": 2},
    }
    spec.update(spec_over)
    return {"apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def create(env: KubeEnv, body: dict) -> dict:
    status, data = env.request("POST", mc_path(body["metadata"]["namespace"]), body)
    assert status in (200, 201), data
    return data


def secret(env: KubeEnv, ns: str) -> None:
    s3 = REAL["s3"]
    values = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
              "AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_DEFAULT_REGION": s3.region}
    status, data = env.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": ns},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}})
    assert status in (200, 201), data


def mc(env: KubeEnv, ns: str, name: str) -> dict:
    return env.get(MC_RESOURCE, ns, name) or {}


def phase(env: KubeEnv, ns: str, name: str) -> str | None:
    return (mc(env, ns, name).get("status") or {}).get("phase")


def cond(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def job_names(env: KubeEnv, ns: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in env.objects(JOBS, ns))


def open_gate(env: KubeEnv, runner: JobRunner, job_name: str) -> None:
    env.call(lambda: runner.gate.open(job_name))  # type: ignore[attr-defined]


def events(env: KubeEnv, ns: str, name: str) -> list[str]:
    return [e["reason"] for e in env.objects(EVENTS, ns) if e["involvedObject"]["name"] == name]


def test_conversion_registers_and_promotes(env, ns, runner, start_operator) -> None:
    secret(env, ns)
    op = start_operator()
    env.call(lambda: runner.gate.open_all())
    created = create(env, conversion("traffic-v7", ns))
    wait_for(lambda: phase(env, ns, "traffic-v7") == "Succeeded", 300, what="Succeeded")
    obj = mc(env, ns, "traffic-v7")
    st = obj["status"]
    expected_job = jobs.job_name("traffic-v7", created["metadata"]["uid"], 1)
    assert job_names(env, ns) == [expected_job]
    assert st["observedGeneration"] == 1
    model = REAL["model"]
    assert st["result"]["modelName"] == model and st["result"]["version"] == "1"
    assert st["result"]["aliases"] == ["champion"] and st["result"]["modelUri"].startswith("models:/")
    assert 0 < st["result"]["maxAbsDiff"] <= 1e-4
    assert st["result"]["paramsAfter"] < st["result"]["paramsBefore"]
    assert st["job"]["name"] == expected_job and st["job"]["completionTime"]
    for t in ("JobCreated", "Converted", "Validated", "Registered", "Promoted", "Succeeded"):
        assert cond(obj, t)["status"] == "True", (t, cond(obj, t))
        assert cond(obj, t)["observedGeneration"] == 1
    assert "lastFailure" not in st
    # the registry really moved the alias, and the version carries the deploy sha256 the status reports
    assert alias_version(REAL, "champion") == "1"
    mv = REAL["client"].get_model_version(model, "1")
    assert mv.tags["reparam.deploy_sha256"] == st["result"]["deploySha256"]
    assert mv.tags["team"] == "vision"
    # the Job: owned, labelled, credentials only by Secret reference, exactly the container command ran
    job = env.get(JOBS, ns, expected_job)
    assert job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert job["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
    (run,) = runner.executor_.runs  # type: ignore[attr-defined]
    assert run.command[:3] == ["reparam", "convert", REAL["uri"]]
    secret_value = REAL["s3"].secret_key
    assert run.env["AWS_SECRET_ACCESS_KEY"] == secret_value
    assert secret_value not in json.dumps(obj) and secret_value not in json.dumps(job)
    pods = env.objects(PODS, ns)
    assert len(pods) == 1
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and json.loads(term["message"])["version"] == st["result"]["version"]
    wait_for(lambda: {"JobCreated", "Started", "Succeeded"} <= set(events(env, ns, "traffic-v7")), 10,
             what="events")
    m = op.metrics()
    assert metric(m, "reparam_conversions_total", outcome="succeeded") == 1
    assert metric(m, "reparam_conversions_total", outcome="failed") == 0
    assert metric(m, "reparam_registry_operations_total", operation="register", result="success") == 1
    assert metric(m, "reparam_registry_operations_total", operation="promote", result="success") == 1
    assert metric(m, "reparam_conversion_duration_seconds_count", outcome="succeeded") == 1
    assert metric(m, "reparam_job_queue_duration_seconds_count") == 1
    assert metric(m, "reparam_conversions_in_progress") == 0 and metric(m, "reparam_conversions_queued") == 0
    assert abs(metric(m, "reparam_last_success_timestamp_seconds") - time.time()) < 120
    assert metric(m, "reparam_operator_reconcile_total", handler="reconcile", result="ok") >= 1
    assert metric(m, "reparam_operator_reconcile_total", handler="job_event", result="ok") >= 3
    # no resource names or UIDs as label values
    assert not [k for k in m if any("traffic" in v or created["metadata"]["uid"] in v for _, v in k[1])]
    # a changed spec.registry.tags is metadata: generation 2's Job sets it on the same version, no new version
    status, data = env.request("PATCH", mc_path(ns, "traffic-v7"),
                               {"spec": {"registry": {"tags": {"team": "vision", "stage": "qa"}}}})
    assert status == 200 and data["metadata"]["generation"] == 2
    wait_for(lambda: (mc(env, ns, "traffic-v7").get("status") or {}).get("observedGeneration") == 2
             and phase(env, ns, "traffic-v7") == "Succeeded", 300, what="Succeeded g2")
    assert mc(env, ns, "traffic-v7")["status"]["result"]["version"] == "1"
    tags = REAL["client"].get_model_version(model, "1").tags
    assert (tags["team"], tags["stage"]) == ("vision", "qa")
    assert [str(v.version) for v in REAL["client"].search_model_versions(f"name = '{model}'")] == ["1"]


def test_validation_failure_moves_no_alias_and_invalid_spec(env, ns, runner, start_operator) -> None:
    secret(env, ns)
    champion_before = alias_version(REAL, "champion")
    op = start_operator()
    env.call(lambda: runner.gate.open_all())
    create(env, conversion("strict", ns, conversion={"fuse": True, "atol": 1e-12, "formats": ["pt"]}))
    create(env, conversion("bad-uri", ns, source={"uri": "file:///tmp/x.pt"}))
    wait_for(lambda: phase(env, ns, "strict") == "Failed", 300, what="strict Failed")
    obj = mc(env, ns, "strict")
    assert cond(obj, "Validated")["status"] == "False" and cond(obj, "Validated")["reason"] == "ValidationFailed"
    assert cond(obj, "Converted")["status"] == "True"
    assert cond(obj, "Registered")["status"] == "False" and cond(obj, "Promoted")["status"] == "False"
    assert cond(obj, "Succeeded").get("status") == "False"
    assert obj["status"]["lastFailure"]["exitCode"] == exitcodes.VALIDATION_FAILED
    assert "exceeds atol" in obj["status"]["lastFailure"]["message"]
    # podFailurePolicy: exit 3 failed the Job at once (backoffLimit 2 not used)
    assert len([p for p in env.objects(PODS, ns)]) == 1
    (job,) = env.objects(JOBS, ns)
    assert job["status"]["failed"] == 1
    assert alias_version(REAL, "champion") == champion_before
    # an invalid spec fails at once, with a clear message, and gets no Job
    wait_for(lambda: phase(env, ns, "bad-uri") == "Failed", 20, what="bad-uri Failed")
    bad = mc(env, ns, "bad-uri")
    assert cond(bad, "Succeeded")["reason"] == "InvalidSpec"
    assert "spec.source.uri" in cond(bad, "Succeeded")["message"]
    assert len(env.objects(JOBS, ns)) == 1
    wait_for(lambda: "InvalidSpec" in events(env, ns, "bad-uri") and "ValidationFailed" in events(env, ns, "strict"),
             10, what="warning events")
    m = op.metrics()
    assert metric(m, "reparam_conversions_total", outcome="validation_failed") == 1
    assert metric(m, "reparam_conversions_total", outcome="succeeded") == 0
    assert metric(m, "reparam_conversions_total", outcome="failed") == 1  # the invalid spec
    assert metric(m, "reparam_conversion_duration_seconds_count", outcome="validation_failed") == 1
    assert metric(m, "reparam_operator_reconcile_errors_total", handler="reconcile", result="permanent_error") >= 1
    assert metric(m, "reparam_registry_operations_total", operation="register", result="success") == 0


def test_spec_change_replaces_running_job(env, ns, runner, start_operator) -> None:
    secret(env, ns)
    start_operator()
    created = create(env, conversion("evolving", ns))
    uid = created["metadata"]["uid"]
    g1, g2 = jobs.job_name("evolving", uid, 1), jobs.job_name("evolving", uid, 2)
    wait_for(lambda: phase(env, ns, "evolving") == "Running", 30, what="Running g1")
    assert job_names(env, ns) == [g1]
    status, data = env.request("PATCH", mc_path(ns, "evolving"),
                               {"spec": {"conversion": {"atol": 5e-4, "formats": ["pt"]}}})
    assert status == 200 and data["metadata"]["generation"] == 2
    wait_for(lambda: job_names(env, ns) == [g2], 30, what="g1 replaced by g2")
    open_gate(env, runner, g2)
    wait_for(lambda: phase(env, ns, "evolving") == "Succeeded", 300, what="Succeeded g2")
    obj = mc(env, ns, "evolving")
    assert obj["status"]["observedGeneration"] == 2 and obj["status"]["job"]["name"] == g2
    assert cond(obj, "Succeeded")["observedGeneration"] == 2
    assert "JobReplaced" in events(env, ns, "evolving")
    job = env.get(JOBS, ns, g2)
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--atol") + 1] == "0.0005" and "safetensors" not in cmd
    assert [r.job_name for r in runner.executor_.runs] == [g2]  # type: ignore[attr-defined]


def test_operator_restart_mid_run(env, ns, runner, start_operator) -> None:
    secret(env, ns)
    first = start_operator()
    created = create(env, conversion("survivor", ns))
    g1 = jobs.job_name("survivor", created["metadata"]["uid"], 1)
    wait_for(lambda: phase(env, ns, "survivor") == "Running", 30, what="Running")
    first.stop(signal.SIGKILL)  # a crash, not a clean stop
    second = start_operator()
    time.sleep(1.0)  # let the new operator resume and see the Job
    assert job_names(env, ns) == [g1]
    m = second.metrics()
    assert metric(m, "reparam_conversions_in_progress") == 1  # the running Job holds its slot again
    open_gate(env, runner, g1)
    wait_for(lambda: phase(env, ns, "survivor") == "Succeeded", 300, what="Succeeded after restart")
    assert job_names(env, ns) == [g1] and len(env.objects(PODS, ns)) == 1
    obj = mc(env, ns, "survivor")
    assert obj["status"]["result"]["version"] == "1"
    assert metric(second.metrics(), "reparam_conversions_total", outcome="succeeded") == 1


def test_concurrency_limit_queues_in_creation_order(env, ns, runner, start_operator) -> None:
    secret(env, ns)
    op = start_operator("--max-concurrent", "2")
    for name in ("c1", "c2", "c3"):
        create(env, conversion(name, ns))
        time.sleep(0.01)
    uids = {n: mc(env, ns, n)["metadata"]["uid"] for n in ("c1", "c2", "c3")}
    jn = {n: jobs.job_name(n, uids[n], 1) for n in uids}
    wait_for(lambda: len(job_names(env, ns)) == 2 and phase(env, ns, "c3") == "Queued", 30, what="2 Jobs, 1 Queued")
    assert job_names(env, ns) == sorted([jn["c1"], jn["c2"]])
    queued = mc(env, ns, "c3")
    assert cond(queued, "JobCreated")["reason"] == "ConcurrencyLimit"
    assert "2 of 2" in cond(queued, "JobCreated")["message"]
    m = op.metrics()
    assert metric(m, "reparam_conversions_in_progress") == 2 and metric(m, "reparam_conversions_queued") == 1
    time.sleep(0.5)
    assert len(job_names(env, ns)) == 2 and phase(env, ns, "c3") == "Queued"
    open_gate(env, runner, jn["c1"])
    wait_for(lambda: phase(env, ns, "c1") == "Succeeded", 300, what="c1 Succeeded")
    wait_for(lambda: jn["c3"] in job_names(env, ns), 30, what="c3 admitted")
    assert phase(env, ns, "c2") in ("Pending", "Running")
    # deleting a resource removes its Job (owner reference + GC) and frees its slot
    status, _ = env.request("DELETE", mc_path(ns, "c2"))
    assert status == 200
    wait_for(lambda: jn["c2"] not in job_names(env, ns), 10, what="c2's Job collected")
    wait_for(lambda: metric(op.metrics(), "reparam_conversions_in_progress") == 1, 10, what="slot freed")
    open_gate(env, runner, jn["c3"])
    wait_for(lambda: phase(env, ns, "c3") == "Succeeded", 300, what="c3 Succeeded")
    wait_for(lambda: metric(op.metrics(), "reparam_conversions_in_progress") == 0, 10, what="all slots free")
    m = op.metrics()
    assert metric(m, "reparam_conversions_total", outcome="succeeded") == 2
    assert metric(m, "reparam_conversions_queued") == 0
    assert metric(m, "reparam_job_queue_duration_seconds_count") == 3  # c1, c2 (deleted while running), c3


def test_segmentation_conversion_registers_and_promotes_on_mask_map(env, ns, runner, start_operator,
                                                                    tmp_path) -> None:
    """Issue #14 point 5: a segmentation ModelConversion (a quarter-width yolov9-c-dseg dual checkpoint built from
    the published config) with a polygon-labelled evaluation set on S3 converts, evaluates box and mask mAP,
    registers and is promoted on its mask mAP like detection; the status and the version carry both metrics."""
    import shutil

    from reparam.converter.official_format import save_official
    from reparam.models.published import published_config
    from test_segmentation_eval import NAMES, draw_polygon_set
    from test_segmentation_heads import build, quarter

    dual = build(quarter(published_config("yolov9-c-dseg", nc=len(NAMES))))
    dual.names = dict(enumerate(NAMES))
    ckpt = tmp_path / "seg-best.pt"
    save_official(dual.half(), ckpt)
    draw_polygon_set(tmp_path / "seg-data")
    archive = shutil.make_archive(str(tmp_path / "seg-val"), "zip", tmp_path / "seg-data")
    s3 = REAL["s3"]
    run = uuid.uuid4().hex[:8]
    s3.client().upload_file(str(ckpt), s3.bucket, f"operator-e2e/{run}/seg-best.pt")
    s3.client().upload_file(archive, s3.bucket, f"operator-e2e/{run}/seg-val.zip")
    model = f"{REAL['model']}-seg"
    secret(env, ns)
    start_operator()
    env.call(lambda: runner.gate.open_all())
    body = conversion("seg-v1", ns, source={"uri": f"s3://{s3.bucket}/operator-e2e/{run}/seg-best.pt", "sha256": ""},
                      conversion={"fuse": False, "precision": "fp16", "formats": ["pt"], "atol": 1e-4},
                      evaluation={"data": f"s3://{s3.bucket}/operator-e2e/{run}/seg-val.zip", "imgsz": 128},
                      promotion={"alias": "champion", "minMap": 0.0})
    body["spec"]["registry"]["modelName"] = model
    body["spec"]["registry"].pop("aliases")
    create(env, body)
    wait_for(lambda: phase(env, ns, "seg-v1") in ("Succeeded", "Failed"), 600, what="seg-v1 finished")
    obj = mc(env, ns, "seg-v1")
    assert phase(env, ns, "seg-v1") == "Succeeded", obj.get("status")
    result = obj["status"]["result"]
    metrics = result["metrics"]
    assert isinstance(metrics["map50_95"], float) and isinstance(metrics["mask_map50_95"], float)
    assert isinstance(metrics["mask_map50"], float) and len(metrics["datasetDigest"]) == 64
    assert result["promotion"]["decision"] == "promoted" and result["version"] == "1"
    assert cond(obj, "Registered")["status"] == "True"
    assert str(REAL["client"].get_model_version_by_alias(model, "champion").version) == "1"
    tags = REAL["client"].get_model_version(model, "1").tags
    assert tags["reparam.eval.metric"] == "mask"
    assert float(tags["reparam.eval.mask_map50_95"]) == metrics["mask_map50_95"]
    assert float(tags["reparam.eval.map50_95"]) == metrics["map50_95"]
    (run_,) = runner.executor_.runs  # type: ignore[attr-defined]
    assert "--eval-data" in run_.command and "--promote" in run_.command
