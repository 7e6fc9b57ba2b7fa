"""End to end: what a real GPU cluster does to a conversion, played by the test Job runner (issue #12).

The real operator process (kopf, the official client) runs against kmock's emulator; the runner plays the Job
controller, the kubelet, the scheduler and Kueue (``jobrunner.JobRunner`` fates). A conversion that must succeed
runs the real ``reparam`` CLI on the shared yolov9-t dual checkpoint from the real S3 server, registered in the
real MLflow server. Each case checks the status, the Events on the ModelConversion and the failure metric.
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

import pytest

from jobrunner import NO_GPU, JobRunner, SubprocessExecutor, reparam_entrypoint
from kube_env import EVENTS, JOBS, MC_RESOURCE, PODS, KubeEnv, child_env, mc_path, wait_for
from operator_env import OperatorProcess, metric
from reparam.operator import jobs

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def env():
    e = KubeEnv().start()
    yield e
    e.stop()


@pytest.fixture()
def ns(request) -> str:
    return "c-" + request.node.name.replace("test_", "").replace("_", "-")[:40]


@pytest.fixture(scope="module")
def real(s3_server, mlflow_server, fixtures):
    run = uuid.uuid4().hex[:8]
    key = f"operator-cluster/{run}/best.pt"
    s3_server.client().upload_file(str(fixtures / "ckpt" / "yolov9-t-dual-best.pt"), s3_server.bucket, key)
    return {"uri": f"s3://{s3_server.bucket}/{key}", "tracking_uri": mlflow_server.tracking_uri,
            "model": f"cluster-deploy-{run}", "s3": s3_server}


@pytest.fixture()
def make_runner(env: KubeEnv, ns: str, real: dict):
    runners: list[JobRunner] = []
    secret(env, real, ns)  # the kubelet resolves envFrom before any container starts

    def make(**kw) -> JobRunner:
        base = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "MLFLOW_"))}
        executor = SubprocessExecutor({"reparam": reparam_entrypoint()}, base)
        r = JobRunner(env, executor, namespace=ns, **kw).start()
        runners.append(r)
        return r
    yield make
    for r in runners:
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


def conversion(real: dict, name: str, ns: str, **job_over) -> dict:
    job = {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi", "cpu": "2"}},
           "envFrom": [{"secretRef": {"name": "s3-creds"}}], "backoffLimit": 2}
    job.update(job_over)
    return {"apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"source": {"uri": real["uri"], "sha256": ""},
                     "conversion": {"fuse": True, "precision": "fp16", "formats": ["pt"], "atol": 1e-4},
                     "registry": {"trackingUri": real["tracking_uri"], "modelName": real["model"]},
                     "job": job}}


def create(env: KubeEnv, body: dict) -> dict:
    status, data = env.request("POST", mc_path(body["metadata"]["namespace"]), body)
    assert status in (200, 201), data
    return data


def secret(env: KubeEnv, real: dict, ns: str) -> None:
    s3 = real["s3"]
    values = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
              "AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_DEFAULT_REGION": s3.region}
    status, data = env.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": ns},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}})
    assert status in (200, 201), data


def status_of(env: KubeEnv, ns: str, name: str) -> dict:
    return (env.get(MC_RESOURCE, ns, name) or {}).get("status") or {}


def cond(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def events(env: KubeEnv, ns: str, name: str) -> list[dict]:
    # the emulator keeps objects in creation order
    return [e for e in env.objects(EVENTS, ns) if e["involvedObject"]["name"] == name]


def reasons(env: KubeEnv, ns: str, name: str) -> list[str]:
    return [e["reason"] for e in events(env, ns, name)]


def failed_with(env: KubeEnv, ns: str, name: str, reason: str, timeout: float = 60) -> dict:
    wait_for(lambda: status_of(env, ns, name).get("phase") == "Failed", timeout, what=f"{name} Failed")
    st = status_of(env, ns, name)
    assert st["lastFailure"]["reason"] == reason, st["lastFailure"]
    assert cond(st, "Succeeded")["status"] == "False" and cond(st, "Succeeded")["reason"] == reason
    wait_for(lambda: reason in reasons(env, ns, name), 10, what=f"{reason} event")
    (ev,) = [e for e in events(env, ns, name) if e["reason"] == reason]
    assert ev["type"] == "Warning" and ev["message"] == st["lastFailure"]["message"][:1024]
    return st


def test_oom_killed_every_attempt_ends_out_of_memory(env, ns, real, make_runner, start_operator) -> None:
    make_runner(fates={"hungry": ["oom", "oom"]})
    op = start_operator()
    create(env, conversion(real, "hungry", ns, backoffLimit=1,
                           resources={"limits": {"nvidia.com/gpu": 1, "memory": "6Gi"}}))
    st = failed_with(env, ns, "hungry", "OutOfMemory")
    message = st["lastFailure"]["message"]
    assert "(6Gi)" in message and "spec.job.resources.limits.memory" in message
    assert st["lastFailure"]["exitCode"] == 137 and "retried" not in st["lastFailure"]
    assert len(env.objects(PODS, ns)) == 2  # backoffLimit 1: the Job controller retried once
    # the first attempt was reported while the Job retried it
    assert "Retried" in reasons(env, ns, "hungry")
    m = op.metrics()
    assert metric(m, "reparam_conversion_failures_total", reason="OutOfMemory") == 1
    assert metric(m, "reparam_conversion_retries_total", reason="OutOfMemory") >= 1
    assert metric(m, "reparam_conversions_total", outcome="failed") == 1


def test_image_pull_failure_fails_fast_and_deletes_the_job(env, ns, real, make_runner, start_operator) -> None:
    make_runner(fates={"typo": ["image-pull"]})
    op = start_operator()
    created = create(env, conversion(real, "typo", ns, image="registry.example/reparam:no-such-tag"))
    t0 = time.monotonic()
    st = failed_with(env, ns, "typo", "ImagePullFailed")
    assert time.monotonic() - t0 < 60  # not the Job's 1 h deadline
    assert "registry.example/reparam:no-such-tag" in st["lastFailure"]["message"]
    assert "spec.job.imagePullSecrets" in st["lastFailure"]["message"]
    name = jobs.job_name("typo", created["metadata"]["uid"], 1)
    wait_for(lambda: env.get(JOBS, ns, name) is None, 10, what="Job deleted")
    assert reasons(env, ns, "typo")[:1] == ["JobCreated"]
    assert metric(op.metrics(), "reparam_conversion_failures_total", reason="ImagePullFailed") == 1
    assert metric(op.metrics(), "reparam_conversions_in_progress") == 0


def test_unschedulable_past_the_timeout_fails_with_the_scheduler_message(env, ns, real, make_runner,
                                                                         start_operator) -> None:
    make_runner(fates={"no-gpu": ["unschedulable"]})
    op = start_operator("--schedule-timeout", "600")
    created = create(env, conversion(real, "no-gpu", ns, scheduleTimeoutSeconds=3))
    name = jobs.job_name("no-gpu", created["metadata"]["uid"], 1)
    # before the time-out: still waiting, and the status says why
    wait_for(lambda: cond(status_of(env, ns, "no-gpu"), "Succeeded").get("reason") == "Unschedulable", 30,
             what="waiting for a node")
    assert status_of(env, ns, "no-gpu")["phase"] in ("Pending", "Running")
    assert NO_GPU in cond(status_of(env, ns, "no-gpu"), "Succeeded")["message"]
    wait_for(lambda: "WaitingForNode" in reasons(env, ns, "no-gpu"), 10, what="WaitingForNode event")
    st = failed_with(env, ns, "no-gpu", "Unschedulable", timeout=30)
    assert NO_GPU in st["lastFailure"]["message"] and "3 s" in st["lastFailure"]["message"]
    wait_for(lambda: env.get(JOBS, ns, name) is None, 10, what="Job deleted")
    assert metric(op.metrics(), "reparam_conversion_failures_total", reason="Unschedulable") == 1


def test_restart_finds_a_pod_pending_too_long(env, ns, real, make_runner, start_operator) -> None:
    make_runner(fates={"stuck": ["unschedulable"]})
    first = start_operator()
    create(env, conversion(real, "stuck", ns, scheduleTimeoutSeconds=4))
    wait_for(lambda: cond(status_of(env, ns, "stuck"), "Succeeded").get("reason") == "Unschedulable", 30,
             what="waiting for a node")
    first.stop()
    time.sleep(4.5)  # the time-out passes while no operator runs
    assert status_of(env, ns, "stuck")["phase"] != "Failed"
    start_operator()
    failed_with(env, ns, "stuck", "Unschedulable", timeout=20)


def test_deadline_exceeded(env, ns, real, make_runner, start_operator) -> None:
    make_runner(fates={"slow": ["hang"]})
    op = start_operator()
    # the emulator does not apply the CRD's minimum of 60 s; the operator's own check allows any non-negative value
    create(env, conversion(real, "slow", ns, activeDeadlineSeconds=2))
    st = failed_with(env, ns, "slow", "DeadlineExceeded", timeout=30)
    assert "spec.job.activeDeadlineSeconds (2 s)" in st["lastFailure"]["message"]
    assert metric(op.metrics(), "reparam_conversion_failures_total", reason="DeadlineExceeded") == 1


def test_preempted_once_is_retried_without_counting_then_succeeds(env, ns, real, make_runner,
                                                                  start_operator) -> None:
    runner = make_runner(fates={"spot": ["preempted"]})
    op = start_operator()
    create(env, conversion(real, "spot", ns, backoffLimit=0))
    # the disruption shows while the Job retries it
    wait_for(lambda: (status_of(env, ns, "spot").get("lastFailure") or {}).get("reason") == "Disrupted"
             or status_of(env, ns, "spot").get("phase") == "Succeeded", 60, what="Disrupted noted")
    wait_for(lambda: status_of(env, ns, "spot").get("phase") == "Succeeded", 300, what="Succeeded")
    st = status_of(env, ns, "spot")
    assert st["result"]["version"] and "lastFailure" not in st
    pods = env.objects(PODS, ns)
    assert len(pods) == 2  # backoffLimit 0, yet a second pod: the disruption did not count
    (job,) = env.objects(JOBS, ns)
    assert not job["status"].get("failed")
    retried = [e for e in events(env, ns, "spot") if e["reason"] == "Retried"]
    assert len(retried) == 1 and "PreemptionByScheduler" in retried[0]["message"]
    assert "backoffLimit" in retried[0]["message"]
    story = {"JobCreated", "Started", "Converted", "Registered", "Succeeded"}
    wait_for(lambda: story <= set(reasons(env, ns, "spot")), 10, what="the story in Events")
    m = op.metrics()
    assert metric(m, "reparam_conversion_retries_total", reason="Disrupted") == 1
    assert metric(m, "reparam_conversions_total", outcome="succeeded") == 1
    assert sum(v for (n, _), v in m.items() if n == "reparam_conversion_failures_total") == 0
    assert runner.errors == []


def test_kueue_job_created_suspended_and_never_unsuspended_by_the_operator(env, ns, real, make_runner,
                                                                           start_operator) -> None:
    runner = make_runner(kueue_delay=2.0)
    # the operator's own limit is 1, yet both Kueue Jobs exist at once: Kueue's quota is the limit
    op = start_operator("--max-concurrent", "1", "--job-defaults", '{"job": {"queueName": "gpu-queue"}}')
    created = create(env, conversion(real, "queued", ns, priorityClassName="batch-low"))
    create(env, conversion(real, "queued-too", ns, queueName="other-queue"))
    name = jobs.job_name("queued", created["metadata"]["uid"], 1)
    wait_for(lambda: len(env.objects(JOBS, ns)) == 2, 20, what="both Jobs created")
    job = env.get(JOBS, ns, name)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][jobs.LABEL_KUEUE_QUEUE] == "gpu-queue"
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
    others = [j for j in env.objects(JOBS, ns) if j["metadata"]["name"] != name]
    assert others[0]["metadata"]["labels"][jobs.LABEL_KUEUE_QUEUE] == "other-queue"
    wait_for(lambda: status_of(env, ns, "queued").get("phase") == "Queued", 10, what="Queued")
    assert cond(status_of(env, ns, "queued"), "Succeeded")["reason"] == "WaitingForAdmission"
    assert env.objects(PODS, ns) == []
    seen: list[str] = []

    def phases() -> bool:
        p = status_of(env, ns, "queued").get("phase")
        if not seen or seen[-1] != p:
            seen.append(p)
        return p == "Succeeded"
    wait_for(phases, 300, interval=0.02, what="Succeeded")
    assert seen[0] == "Queued" and "Running" in seen and seen.index("Running") < seen.index("Succeeded")
    wait_for(lambda: status_of(env, ns, "queued-too").get("phase") == "Succeeded", 300, what="second Succeeded")
    assert sorted(runner.suspended_seen) == sorted(j["metadata"]["name"] for j in env.objects(JOBS, ns))
    assert runner.unsuspended_by_others == []
    wait_for(lambda: "Succeeded" in reasons(env, ns, "queued"), 10, what="Succeeded event")
    got = reasons(env, ns, "queued")
    assert got.index("WaitingForAdmission") < got.index("Admitted") < got.index("Succeeded")
    m = op.metrics()
    assert metric(m, "reparam_conversions_queued") == 0 and metric(m, "reparam_conversions_in_progress") == 0
    assert metric(m, "reparam_conversions_total", outcome="succeeded") == 2


def test_new_generation_keeps_the_result_in_force_and_delete_stops_the_job(env, ns, real, make_runner,
                                                                           start_operator) -> None:
    make_runner(fates={"live": ["run", "hang"]})  # generation 1 converts for real; generation 2's pod hangs
    start_operator()
    created = create(env, conversion(real, "live", ns))
    wait_for(lambda: status_of(env, ns, "live").get("phase") == "Succeeded", 300, what="g1 Succeeded")
    g1 = status_of(env, ns, "live")["result"]
    assert g1["generation"] == 1 and g1["version"]
    status, data = env.request("PATCH", mc_path(ns, "live"), {"spec": {"conversion": {"atol": 5e-4}}})
    assert status == 200 and data["metadata"]["generation"] == 2
    g2 = jobs.job_name("live", created["metadata"]["uid"], 2)
    wait_for(lambda: status_of(env, ns, "live").get("phase") == "Running"
             and status_of(env, ns, "live")["observedGeneration"] == 2, 30, what="g2 Running")
    st = status_of(env, ns, "live")
    # the registry still serves generation 1's version: the status says so until generation 2 ends
    assert st["result"] == g1
    assert cond(st, "Registered")["status"] == "True" and cond(st, "Registered")["observedGeneration"] == 1
    assert cond(st, "Succeeded")["observedGeneration"] == 2 and cond(st, "Converted") == {}
    # deleting the resource deletes the running Job itself, propagation Background (not only the GC's cascade)
    assert env.get(JOBS, ns, g2) is not None
    env.call(lambda: setattr(env.emulator, "gc_delay", 30.0))  # a slow garbage collector
    try:
        status, _ = env.request("DELETE", mc_path(ns, "live"))
        assert status == 200
        wait_for(lambda: env.get(JOBS, ns, g2) is None, 10, what="g2 Job gone before the GC")
    finally:
        env.call(lambda: setattr(env.emulator, "gc_delay", 0.0))
    assert ("jobs", ns, g2, "Background") in env.call(lambda: list(env.emulator.deletions))
