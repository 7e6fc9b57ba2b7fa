"""ModelConversionPolicy end to end: the real operator process (kopf) against kmock's emulator and a real MLflow
server (sqlite backend: it delivers real, signed webhooks). Versions are registered with MlflowClient the way a
training script does; the tests observe the ModelConversions the operator creates with no other action."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from kube_env import EVENTS, MC_RESOURCE, POLICY_PLURAL, POLICY_RESOURCE, KubeEnv, child_env, wait_for
from operator_env import OperatorProcess, free_port, metric
from reparam import exitcodes
from reparam.operator import jobs, policy as pol, webhooks

pytestmark = pytest.mark.servers

SECRET = "policy-test-secret"


@pytest.fixture(scope="module")
def env():
    e = KubeEnv().start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def mlflow(mlflow_server_factory):
    """A dedicated MLflow server that may deliver webhooks to loopback http endpoints (MLflow allows only
    public https targets by default) and re-reads its webhook list every second."""
    return mlflow_server_factory(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https", MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
                                 MLFLOW_WEBHOOK_CACHE_TTL="1")


@pytest.fixture()
def client(mlflow):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow.tracking_uri, registry_uri=mlflow.tracking_uri)


@pytest.fixture()
def ns(request) -> str:
    return "p-" + request.node.name.replace("test_", "").replace("_", "-")[:40]


@pytest.fixture()
def model(request) -> str:
    return f"dual-{request.node.name[5:25]}-{uuid.uuid4().hex[:6]}"


@pytest.fixture()
def start_operator(env: KubeEnv, tmp_path: Path, ns: str):
    kubeconfig = env.write_kubeconfig(tmp_path / "kubeconfig")
    procs: list[OperatorProcess] = []

    def start(*extra: str, webhook_port: int = 0) -> OperatorProcess:
        args = list(extra)
        env_vars = {}
        if webhook_port:
            args += ["--webhook-host", "127.0.0.1", "--webhook-port", str(webhook_port)]
            env_vars["REPARAM_WEBHOOK_SECRET"] = SECRET
        op = OperatorProcess(kubeconfig, ns, tmp_path / f"operator-{len(procs)}.log", *args, env=env_vars).start()
        procs.append(op)
        return op
    yield start
    for p in procs:
        p.stop()


def register_version(client, model: str, tags: dict | None = None) -> int:
    """What a training script does: log the dual checkpoint as a new version of the registered model."""
    try:
        client.create_registered_model(model)
    except Exception:  # noqa: BLE001 - exists already
        pass
    mv = client.create_model_version(model, source=f"s3://ml-ckpts/train/{model}/best.pt", tags=tags or {})
    return int(mv.version)


def policy(name: str, ns: str, model: str, tracking_uri: str, select: dict, interval: str = "1h",
           **over) -> dict:
    spec = {"source": {"registeredModel": model, "select": select, "trackingUri": tracking_uri},
            "interval": interval,
            "template": {"registry": {"trackingUri": tracking_uri, "modelName": f"{model}-deploy"},
                         "promotion": {"alias": "champion", "maxRegression": 0.002},
                         "evaluation": {"data": "s3://ml-data/traffic-val/"}},
            "historyLimit": 10}
    spec.update(over)
    return {"apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversionPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def create_policy(env: KubeEnv, body: dict) -> dict:
    ns = body["metadata"]["namespace"]
    status, data = env.request("POST", f"/apis/{jobs.GROUP}/{jobs.VERSION}/namespaces/{ns}/{POLICY_PLURAL}", body)
    assert status in (200, 201), data
    return data


def pstatus(env: KubeEnv, ns: str, name: str) -> dict:
    return (env.get(POLICY_RESOURCE, ns, name) or {}).get("status") or {}


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def conversions(env: KubeEnv, ns: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in env.objects(MC_RESOURCE, ns)}


def policy_events(env: KubeEnv, ns: str, name: str) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["message"]) for e in env.objects(EVENTS, ns)
            if e["involvedObject"]["kind"] == "ModelConversionPolicy" and e["involvedObject"]["name"] == name]


def deliver(port: int, body: bytes, delivery_id: str, ts: int, secret: str = SECRET) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{webhooks.PATH}", data=body, method="POST", headers={
        "Content-Type": "application/json", webhooks.HEADER_DELIVERY_ID: delivery_id,
        webhooks.HEADER_TIMESTAMP: str(ts),
        webhooks.HEADER_SIGNATURE: webhooks.signature(secret, delivery_id, str(ts), body)})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def register_webhook_cli(tracking_uri: str, port: int, model: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reparam.cli", "webhook", "register", "--url",
         f"http://127.0.0.1:{port}{webhooks.PATH}", "--secret-env", "HOOK_SECRET", "--model", model,
         "--tracking-uri", tracking_uri],
        env=child_env(HOOK_SECRET=SECRET), capture_output=True, text=True, timeout=120)


def test_alias_policy_webhook_path(env, ns, model, client, mlflow, start_operator) -> None:
    """Poller stopped (interval 1h: one read at start); the alias moves and a real MLflow webhook makes the
    conversion; forged, replayed and stale deliveries are refused and counted."""
    port = free_port()
    op = start_operator(webhook_port=port)
    done = register_webhook_cli(mlflow.tracking_uri, port, model)
    assert done.returncode == 0, done.stderr
    assert f"-> http://127.0.0.1:{port}{webhooks.PATH}" in done.stdout and "model_version.created" in done.stdout
    v1 = register_version(client, model)
    client.set_registered_model_alias(model, "candidate", str(v1))
    created = create_policy(env, policy("traffic", ns, model, mlflow.tracking_uri, {"alias": "candidate"}))
    wait_for(lambda: "traffic-v1" in conversions(env, ns), 30, what="traffic-v1 (first poll)")
    mc = conversions(env, ns)["traffic-v1"]
    assert mc["spec"]["source"]["uri"] == f"models:/{model}/1"
    assert mc["spec"]["promotion"] == {"alias": "champion", "maxRegression": 0.002}
    labels = mc["metadata"]["labels"]
    assert labels[pol.LABEL_SOURCE_MODEL] == model and labels[pol.LABEL_SOURCE_VERSION] == "1"
    assert mc["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    st = wait_for(lambda: (s := pstatus(env, ns, "traffic")).get("lastConversion") and s, 20, what="status")
    assert cond(st, "Ready")["status"] == "True" and cond(st, "RegistryReachable")["status"] == "True"
    assert st["lastSeenVersion"] == "1" and st["lastPollTime"]
    assert st["conversions"][0]["name"] == "traffic-v1" and st["conversions"][0]["version"] == "1"
    assert metric(op.metrics(), "reparam_policy_conversions_total", trigger="poll") == 1

    # a new version without the alias: delivered, nothing to convert
    v2 = register_version(client, model)
    wait_for(lambda: metric(op.metrics(), "reparam_webhook_deliveries_total", result="accepted") >= 1, 30,
             what="model_version.created delivered")
    wait_for(lambda: pstatus(env, ns, "traffic").get("lastSeenVersion") == str(v2), 10, what="v2 seen")
    assert sorted(conversions(env, ns)) == ["traffic-v1"]
    # the alias moves: the webhook (not the 1h poll) converts v2 within seconds
    t0 = time.monotonic()
    client.set_registered_model_alias(model, "candidate", str(v2))
    wait_for(lambda: "traffic-v2" in conversions(env, ns), 30, what="traffic-v2 by webhook")
    assert time.monotonic() - t0 < 30
    m = op.metrics()
    assert metric(m, "reparam_policy_conversions_total", trigger="webhook") == 1
    assert metric(m, "reparam_policy_conversions_total", trigger="poll") == 1
    assert metric(m, "reparam_webhook_deliveries_total", result="bad_signature") == 0
    evs = wait_for(lambda: len(policy_events(env, ns, "traffic")) >= 2 and policy_events(env, ns, "traffic"), 10,
                   what="ConversionCreated events")
    assert ("Normal", "ConversionCreated", f"traffic-v2: {model} version 2 (webhook)") in evs
    assert ("Normal", "ConversionCreated", f"traffic-v1: {model} version 1 (poll)") in evs

    # forged, replayed and stale deliveries
    payload = json.dumps({"entity": "model_version", "action": "created", "timestamp": "x",
                          "data": {"name": model, "version": "9"}}).encode()
    now = int(time.time())
    assert deliver(port, payload, "forged-1", now, secret="not-the-secret") == 401
    assert deliver(port, payload, "fresh-1", now) == 200
    assert deliver(port, payload, "fresh-1", now) == 409  # replay
    assert deliver(port, payload, "stale-1", now - 3600) == 401
    req = urllib.request.Request(f"http://127.0.0.1:{port}{webhooks.PATH}", data=payload, method="POST")
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(req, timeout=5)
    assert unsigned.value.code == 401
    other = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "nobody-watches"}})
    assert deliver(port, other.encode(), "other-1", now) == 200
    m = op.metrics()
    assert metric(m, "reparam_webhook_deliveries_total", result="bad_signature") == 2
    assert metric(m, "reparam_webhook_deliveries_total", result="replay") == 1
    assert metric(m, "reparam_webhook_deliveries_total", result="stale") == 1
    assert metric(m, "reparam_webhook_deliveries_total", result="ignored") >= 1
    time.sleep(1.0)
    assert sorted(conversions(env, ns)) == ["traffic-v1", "traffic-v2"]  # nothing made from forged input

    # deleting the policy deletes its conversions (owner references, garbage collector)
    status, _ = env.request("DELETE", f"/apis/{jobs.GROUP}/{jobs.VERSION}/namespaces/{ns}/{POLICY_PLURAL}/traffic")
    assert status == 200
    wait_for(lambda: not conversions(env, ns), 10, what="conversions collected")


class Proxy:
    """A TCP forwarder in front of the MLflow server that a test can take down and bring back (same port)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.up()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        assert self.listener is not None
        # shutdown first: on Linux a close() alone leaves the socket listening while a thread blocks in accept()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.listener = None
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_polling_path_outage_and_recovery(env, ns, model, client, mlflow, start_operator) -> None:
    """Webhooks off: every version >= minVersion is found by polling; a registry outage sets
    RegistryReachable=False (no crash, no busy loop) and polling recovers by itself."""
    host, port = mlflow.tracking_uri.rsplit(":", 1)
    proxy = Proxy((host.split("//")[1], int(port)))
    uri = f"http://127.0.0.1:{proxy.port}"
    for _ in range(3):
        register_version(client, model)
    op = start_operator()
    create_policy(env, policy("poll", ns, model, uri, {"newest": True}, interval="1s",
                              source={"registeredModel": model, "select": {"newest": True}, "trackingUri": uri,
                                      "minVersion": 2}))
    wait_for(lambda: sorted(conversions(env, ns)) == ["poll-v2", "poll-v3"], 30, what="v2, v3 (not v1)")
    v4 = register_version(client, model)
    wait_for(lambda: f"poll-v{v4}" in conversions(env, ns), 15, what="v4 by polling")
    assert metric(op.metrics(), "reparam_policy_conversions_total", trigger="poll") == 3
    assert metric(op.metrics(), "reparam_policy_conversions_total", trigger="webhook") == 0

    proxy.down()
    st = wait_for(lambda: (s := pstatus(env, ns, "poll")) and cond(s, "RegistryReachable").get("status") == "False"
                  and s, 30, what="RegistryReachable=False")
    assert cond(st, "RegistryReachable")["reason"] == "RegistryUnreachable"
    assert "cannot connect" in cond(st, "RegistryReachable")["message"]
    errors0 = metric(op.metrics(), "reparam_policy_poll_errors_total")
    time.sleep(6)
    errors = metric(op.metrics(), "reparam_policy_poll_errors_total") - errors0
    # backoff of 1 s capped at the 1 s interval: about one read a second, not a busy loop
    assert 1 <= errors <= 7, (errors, st, op.log()[-3000:])
    assert op.proc.poll() is None
    v5 = register_version(client, model)  # registered while the operator cannot see the registry
    proxy.up()
    wait_for(lambda: f"poll-v{v5}" in conversions(env, ns), 30, what="v5 after recovery")
    wait_for(lambda: cond(pstatus(env, ns, "poll"), "RegistryReachable").get("status") == "True", 10,
             what="RegistryReachable=True")
    assert sorted(conversions(env, ns)) == sorted(f"poll-v{v}" for v in (2, 3, v4, v5))
    proxy.down()


def test_bad_input_ready_false_nothing_created(env, ns, model, client, mlflow, start_operator) -> None:
    register_version(client, model)
    start_operator()
    uri = mlflow.tracking_uri
    create_policy(env, policy("missing", ns, f"{model}-nope", uri, {"newest": True}))
    create_policy(env, policy("selector", ns, model, uri, {"newest": True},
                              source={"registeredModel": model, "select": {"label": "x"}}))
    bad_template = policy("template", ns, model, uri, {"newest": True})
    del bad_template["spec"]["template"]["evaluation"]  # a promotion needs an evaluation
    create_policy(env, bad_template)
    expected = {"missing": "RegisteredModelNotFound", "selector": "InvalidSelector", "template": "InvalidTemplate"}
    for name, reason in expected.items():
        wait_for(lambda n=name: cond(pstatus(env, ns, n), "Ready").get("status") == "False", 30, what=name)
        ready = cond(pstatus(env, ns, name), "Ready")
        assert ready["reason"] == reason, ready
    assert "does not exist" in cond(pstatus(env, ns, "missing"), "Ready")["message"]
    assert "spec.source.select" in cond(pstatus(env, ns, "selector"), "Ready")["message"]
    assert "spec.promotion needs spec.evaluation" in cond(pstatus(env, ns, "template"), "Ready")["message"]
    wait_for(lambda: [r for t, r, _ in policy_events(env, ns, "selector") if t == "Warning"] == ["InvalidSelector"],
             10, what="one InvalidSelector warning (deduplicated)")
    time.sleep(1.0)
    assert conversions(env, ns) == {}


def test_history_limit_deletes_old_finished(env, ns, model, client, mlflow, start_operator) -> None:
    for _ in range(4):
        register_version(client, model)
    start_operator()
    create_policy(env, policy("hist", ns, model, mlflow.tracking_uri, {"tag": {"stage": "trained"}},
                              interval="1s", historyLimit=1))
    time.sleep(2)
    assert conversions(env, ns) == {}  # no version carries the tag yet
    for v in (1, 2, 3):
        client.set_model_version_tag(model, str(v), "stage", "trained")
    wait_for(lambda: sorted(conversions(env, ns)) == ["hist-v1", "hist-v2", "hist-v3"], 30, what="3 conversions")
    # the Jobs finish (the status the operator would write), v3 still running
    for name, phase in (("hist-v1", "Succeeded"), ("hist-v2", "Failed"), ("hist-v3", "Running")):
        status, data = env.request("PATCH", f"/apis/{jobs.GROUP}/{jobs.VERSION}/namespaces/{ns}/{jobs.PLURAL}/"
                                            f"{name}/status", {"status": {"phase": phase}})
        assert status == 200, data
    wait_for(lambda: sorted(conversions(env, ns)) == ["hist-v2", "hist-v3"], 30, what="v1 pruned")
    # (the operator's reconciler owns a conversion's status: v3's phase may be rewritten while its Job waits)
    st = wait_for(lambda: (s := pstatus(env, ns, "hist")).get("historyFloor") == 1
                  and [c["name"] for c in s.get("conversions", [])] == ["hist-v3", "hist-v2"]
                  and s.get("lastOutcome") == (conversions(env, ns)["hist-v3"].get("status") or {}).get("phase")
                  and s, 10, what="floor, history, v3's outcome")
    assert st["lastConversion"] == "hist-v3" and st["conversions"][1]["outcome"] == "Failed"
    time.sleep(2.5)  # several polls: the pruned v1 is not made again
    assert sorted(conversions(env, ns)) == ["hist-v2", "hist-v3"]


def test_two_replicas_and_restart_make_one_conversion(env, ns, model, client, mlflow, start_operator) -> None:
    register_version(client, model)
    a, b = start_operator(), start_operator()
    create_policy(env, policy("twin", ns, model, mlflow.tracking_uri, {"newest": True}, interval="1s"))
    wait_for(lambda: "twin-v1" in conversions(env, ns), 30, what="twin-v1")
    v2 = register_version(client, model)
    wait_for(lambda: f"twin-v{v2}" in conversions(env, ns), 30, what="twin-v2")
    time.sleep(2)
    assert sorted(conversions(env, ns)) == ["twin-v1", "twin-v2"]
    made = sum(metric(o.metrics(), "reparam_policy_conversions_total", trigger="poll") for o in (a, b))
    assert made == 2  # each conversion created once; the other replica's create answered 409
    # killed, then a version registered while no operator runs: the next one converts it exactly once
    a.stop(signal.SIGKILL)
    b.stop(signal.SIGKILL)
    v3 = register_version(client, model)
    c = start_operator()
    wait_for(lambda: f"twin-v{v3}" in conversions(env, ns), 30, what="twin-v3 after restart")
    time.sleep(1.5)
    assert sorted(conversions(env, ns)) == ["twin-v1", "twin-v2", "twin-v3"]
    assert metric(c.metrics(), "reparam_policy_conversions_total", trigger="poll") == 1


def test_operator_killed_between_delivery_and_reconcile(env, ns, model, client, mlflow, start_operator) -> None:
    """The alias moves and the operator dies at once (the delivery in flight, or accepted and not yet acted on);
    the next operator, on the same endpoint, converts the version exactly once."""
    port = free_port()
    first = start_operator(webhook_port=port)
    assert register_webhook_cli(mlflow.tracking_uri, port, model).returncode == 0
    v1 = register_version(client, model)
    client.set_registered_model_alias(model, "candidate", str(v1))
    create_policy(env, policy("crash", ns, model, mlflow.tracking_uri, {"alias": "candidate"}))
    wait_for(lambda: f"crash-v{v1}" in conversions(env, ns), 30, what="v1")
    v2 = register_version(client, model)
    client.set_registered_model_alias(model, "candidate", str(v2))
    first.stop(signal.SIGKILL)
    second = start_operator(webhook_port=port)
    wait_for(lambda: f"crash-v{v2}" in conversions(env, ns), 30, what="v2 after the crash")
    time.sleep(2)
    assert sorted(conversions(env, ns)) == [f"crash-v{v1}", f"crash-v{v2}"]
    made = metric(second.metrics(), "reparam_policy_conversions_total", trigger="poll") + \
        metric(second.metrics(), "reparam_policy_conversions_total", trigger="webhook")
    assert made <= 1  # 0 when the first operator had created it just before it died


def test_webhook_register_one_line_errors(tmp_path) -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reparam.cli", "webhook", "register", "--url",
                               "https://op.example/webhooks/mlflow", "--model", "m", *args],
                              env=child_env(**env), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    unset = run("--secret-env", "NO_SUCH_VAR_FOR_SURE")
    assert unset.returncode == exitcodes.INVALID_INPUT
    assert unset.stderr.strip().count("\n") == 0 and "NO_SUCH_VAR_FOR_SURE is empty or unset" in unset.stderr
    file_store = run("--secret-env", "S", "--tracking-uri", str(tmp_path / "mlruns"), S="x")
    assert file_store.returncode == exitcodes.REGISTRY_ERROR, file_store.stderr
    assert file_store.stderr.strip().count("\n") == 0 and "has no webhooks" in file_store.stderr


@pytest.mark.slow
def test_training_registers_moves_candidate_and_the_policy_converts_and_promotes(
        env, ns, model, client, mlflow, start_operator, fixtures, tmp_path) -> None:
    """The whole loop with no human step: a 'training script' logs the early checkpoint, registers it and points
    @candidate at it; later the final checkpoint. The policy's conversions run the real converter (test Job runner),
    evaluate on the validation set (a run artifact) and promote @champion through the gates."""
    import shutil

    from jobrunner import Gate, JobRunner, SubprocessExecutor, reparam_entrypoint

    base = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "MLFLOW_"))}
    gate = Gate(SubprocessExecutor({"reparam": reparam_entrypoint()}, base))
    runner = JobRunner(env, gate, namespace=ns).start()
    try:
        env.call(lambda: gate.open_all())
        exp = client.create_experiment(f"train-{model}")
        data_run = client.create_run(exp)
        data = tmp_path / "val"
        shutil.copytree(fixtures / "eval", data, ignore=shutil.ignore_patterns("*.pt"))
        client.log_artifacts(data_run.info.run_id, str(data), "val-data")
        port = free_port()
        op = start_operator(webhook_port=port)
        assert register_webhook_cli(mlflow.tracking_uri, port, model).returncode == 0
        deploy = f"{model}-deploy"
        template = {
            "conversion": {"fuse": False, "formats": ["pt"]},
            "registry": {"trackingUri": mlflow.tracking_uri, "modelName": deploy},
            "evaluation": {"data": f"runs:/{data_run.info.run_id}/val-data", "imgsz": 160},
            "promotion": {"alias": "champion", "maxRegression": 0.002},
            "job": {"backoffLimit": 0},
        }

        def train(which: str) -> int:
            """What train_dual.py + a registration step do: a run with weights/best.pt, a logged model, a
            version, then @candidate moved to it."""
            run = client.create_run(exp, tags={"mlflow.runName": f"train_dual-{which}"})
            weights = tmp_path / which
            weights.mkdir()
            shutil.copyfile(fixtures / "eval" / f"yolov9-t-dual-shapes-{which}.pt", weights / "best.pt")
            client.log_artifact(run.info.run_id, str(weights / "best.pt"), "weights")
            client.set_terminated(run.info.run_id)
            try:
                client.create_registered_model(model)
            except Exception:  # noqa: BLE001 - the second training
                pass
            lm = client.create_logged_model(exp, name=model, source_run_id=run.info.run_id)
            client.log_model_artifacts(lm.model_id, str(weights))
            client.finalize_logged_model(lm.model_id, "READY")
            mv = client.create_model_version(model, f"models:/{lm.model_id}", run_id=run.info.run_id,
                                             model_id=lm.model_id)
            client.set_registered_model_alias(model, "candidate", mv.version)
            return int(mv.version)

        def phase(name: str) -> str | None:
            return ((conversions(env, ns).get(name) or {}).get("status") or {}).get("phase")

        def deploy_versions() -> list[str]:
            return sorted(str(v.version) for v in client.search_model_versions(f"name = '{deploy}'"))

        # v1 is converted by hand before any policy exists (its delivery is ignored: nobody watches the model)
        v1 = train("early")
        status, data = env.request("POST", f"/apis/{jobs.GROUP}/{jobs.VERSION}/namespaces/{ns}/{jobs.PLURAL}", {
            "apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
            "metadata": {"name": "by-hand", "namespace": ns},
            "spec": {**template, "source": {"uri": f"models:/{model}/{v1}"}}})
        assert status in (200, 201), data
        wait_for(lambda: phase("by-hand") in ("Succeeded", "Failed"), 400, what="by-hand converted")
        hand = conversions(env, ns)["by-hand"]["status"]
        assert phase("by-hand") == "Succeeded", hand.get("lastFailure")
        assert deploy_versions() == [hand["result"]["version"]]
        # the policy: its first poll finds v1 under @candidate; the registry's idempotency key finds the version
        # made by hand, so nothing new is registered
        body = policy("loop", ns, model, mlflow.tracking_uri, {"alias": "candidate"})
        body["spec"]["template"] = template
        create_policy(env, body)
        wait_for(lambda: phase(f"loop-v{v1}") in ("Succeeded", "Failed"), 400, what="v1 by the policy")
        st1 = conversions(env, ns)[f"loop-v{v1}"]["status"]
        assert phase(f"loop-v{v1}") == "Succeeded", st1
        assert st1["result"]["version"] == hand["result"]["version"] and deploy_versions() == [st1["result"]["version"]]
        assert str(client.get_model_version_by_alias(deploy, "champion").version) == hand["result"]["version"]
        # training registers the final checkpoint and moves @candidate: converted, evaluated, promoted
        v2 = train("final")
        wait_for(lambda: phase(f"loop-v{v2}") in ("Succeeded", "Failed"), 400, what="v2 converted")
        st2 = conversions(env, ns)[f"loop-v{v2}"]["status"]
        assert phase(f"loop-v{v2}") == "Succeeded", st2
        assert st2["result"]["promotion"]["decision"] == "promoted"  # mAP 0.83 beats 0.46
        assert str(client.get_model_version_by_alias(deploy, "champion").version) == st2["result"]["version"]
        assert len(deploy_versions()) == 2
        lineage = client.get_model_version(deploy, st2["result"]["version"]).tags
        assert lineage["reparam.source_model_name"] == model and lineage["reparam.source_model_version"] == str(v2)
        st = wait_for(lambda: (s := pstatus(env, ns, "loop")).get("lastOutcome") == "Succeeded"
                      and s.get("lastConversion") == f"loop-v{v2}" and s, 30, what="policy status")
        assert st["lastSeenVersion"] == str(v2)
        assert [c["outcome"] for c in st["conversions"]] == ["Succeeded", "Succeeded"]
        assert metric(op.metrics(), "reparam_policy_conversions_total", trigger="webhook") >= 1
        assert sorted(conversions(env, ns)) == ["by-hand", f"loop-v{v1}", f"loop-v{v2}"]
    finally:
        runner.stop()
    assert runner.errors == [], runner.errors
