"""The Helm chart (charts/reparam-operator): rendered offline with Helm's own SDK
(helm-python-sdk), linted, every object validated against the Kubernetes API schemas
(kubernetes-validate), the important properties asserted, the alert rules checked
and unit-tested with promtool, the metric exposition linted with promtool.

promtool comes from Debian's ``prometheus`` package; the tests that need it fail with
one line when it is absent (``.ci/run`` installs it): never a skip.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from conftest import installed
from reparam.operator import jobs, settings as settings_mod
from reparam.operator.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "reparam-operator"
CRD_FILE = ROOT / "crds" / "modelconversion.yaml"
POLICY_CRD_FILE = ROOT / "crds" / "modelconversionpolicy.yaml"
EXAMPLES = ROOT / "examples"
RELEASE, NAMESPACE = "rp", "reparam-system"
#: Kubernetes versions the rendered objects are validated against: the oldest the
#: chart's kubeVersion admits that kubernetes-validate still ships, and the newest.
KUBE_VERSIONS = ("1.31", kubernetes_validate.latest_version())
#: Kinds without a schema in kubernetes-validate (Prometheus Operator CRDs).
MONITORING = "monitoring.coreos.com/v1"

PROMTOOL = shutil.which("promtool")


@pytest.fixture
def require_promtool() -> str:
    return installed(PROMTOOL, "promtool")


needs_promtool = pytest.mark.usefixtures("require_promtool")

#: Values files of the render matrix: name -> values.
VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-cluster": yaml.safe_load((EXAMPLES / "values-gpu-cluster.yaml").read_text()),
    "one-namespace": {"watchNamespaces": ["ml"], "converter": {"image": "registry.local/reparam:dev",
                                                               "maxConcurrent": 1}},
    "everything": {
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "watchNamespaces": ["team-a", "team-b", "team-c"],
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "operator": {"verbose": True, "peering": "reparam", "extraEnv": [{"name": "TZ", "value": "UTC"}]},
        "metrics": {"port": 9400, "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                    "dashboard": {"enabled": True}},
        "jobDefaults": {"envFromSecrets": ["s3-creds", "mlflow-creds"],
                        "mlflow": {"trackingUri": "https://mlflow.example.internal"}},
        "priorityClassName": "system-cluster-critical",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "webhook": {"enabled": True, "secretName": "mlflow-webhook", "toleranceSeconds": 120,
                    "ingress": {"enabled": True, "className": "nginx", "host": "hooks.example.com",
                                "tls": [{"hosts": ["hooks.example.com"], "secretName": "hooks-tls"}]}},
    },
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (templates only; CRDs: ``chart.crds``)."""
    out = []
    for path, text in sorted(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["metadata"]["annotations"]["test/template"] = path
                out.append(doc)
    return out


def strip_test_annotations(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["annotations"].pop("test/template", None)
    if not obj["metadata"]["annotations"]:
        del obj["metadata"]["annotations"]
    return obj


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, (kind, [o["metadata"]["name"] for o in found])
    return found[0]


def container_env(deploy: dict[str, Any]) -> dict[str, str]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in c["env"] if "value" in e}


# ----------------------------------------------------------------- lint, schemas


@pytest.mark.parametrize("case", VALUES)
def test_lint_strict(case: str) -> None:
    report = helm.lint(CHART, VALUES[case], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSIONS[-1]}")
    assert report["errors"] == []
    # only the "icon is recommended" info remains
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", VALUES)
def test_rendered_objects_validate_against_kubernetes(chart, case: str) -> None:
    objs = render(chart, VALUES[case])
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "ServiceAccount", "Service"} <= kinds or case == "everything"
    checked = 0
    for obj in objs:
        if obj["apiVersion"] == MONITORING:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(strip_test_annotations(obj), version, strict=True)
            checked += 1
    assert checked >= 2 * 5


def test_lint_rejects_values_outside_the_schema() -> None:
    report = helm.lint(CHART, {"converter": {"maxConcurrent": 0}}, strict=True)
    assert any("maxConcurrent" in e for e in report["errors"])


@pytest.mark.parametrize("values, needle", [
    ({"watchNamespaces": ["team-*"]}, "/watchNamespaces/0"),  # globs would need cluster-wide RBAC
    ({"watchNamespaces": ["ml", "ml"]}, "/watchNamespaces"),
    ({"converter": {"maxConcurrent": 0}}, "/converter/maxConcurrent"),
    ({"converter": {"image": ""}}, "/converter/image"),
    ({"jobDefaults": {"mlflow": {"trackingUri": "mlflow:5000"}}}, "/jobDefaults/mlflow/trackingUri"),
    ({"jobDefaults": {"resources": {"limits": {"nvidia.com/gpu": "one"}}}}, "/jobDefaults/resources"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"metrics": {"prometheusRule": {"noSuccessFor": "6 hours"}}}, "/metrics/prometheusRule/noSuccessFor"),
    ({"securityContext": {"privileged": True}}, "/securityContext/privileged"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"operator": {"extraEnv": [{"name": "REPARAM_IMAGE", "value": "x"}]}}, "/operator/extraEnv/0/name"),
    ({"replicas": 2}, "additional properties 'replicas'"),
])
def test_values_schema_rejects(chart, values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert needle in str(err.value)
    with pytest.raises(helm.HelmValuesError):  # an install would refuse them too
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_values_schema_accepts_every_values_file(chart) -> None:
    for values in VALUES.values():
        chart.validate_schema(values)
    assert chart.schema is not None and chart.schema["additionalProperties"] is False


# ------------------------------------------------------------------------ CRD


def test_crd_comes_from_crds_dir_through_a_symlink(chart, tmp_path: Path) -> None:
    files = {"crds/modelconversion.yaml": CRD_FILE, "crds/modelconversionpolicy.yaml": POLICY_CRD_FILE}
    for name, target in files.items():
        link = CHART / name
        assert link.is_symlink() and link.resolve() == target.resolve()
    assert {c["name"]: c["data"] for c in chart.crds} == {n: t.read_text() for n, t in files.items()}
    # `helm package` stores the resolved file, so a packaged chart is self-contained
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        for name, target in files.items():
            member = tar.getmember(f"reparam-operator/{name}")
            assert member.isfile()
            assert tar.extractfile(member).read().decode() == target.read_text()
    with helm.Chart.load(archive) as packaged:
        assert sorted(c["data"] for c in packaged.crds) == sorted(t.read_text() for t in files.values())


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_validates_against_kubernetes(chart, version: str) -> None:
    crds = {c["name"]: yaml.safe_load(c["data"]) for c in chart.crds}
    for crd in crds.values():
        kubernetes_validate.validate(crd, version, strict=True)
    assert crds["crds/modelconversion.yaml"]["metadata"]["name"] == f"{jobs.PLURAL}.{jobs.GROUP}"
    assert crds["crds/modelconversionpolicy.yaml"]["metadata"]["name"] == f"modelconversionpolicies.{jobs.GROUP}"


CRD = yaml.safe_load(CRD_FILE.read_text())
CRD_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
#: OpenAPI v3.0 (boolean exclusiveMinimum) is closest to JSON Schema draft 4.
CRD_VALIDATOR = jsonschema.Draft4Validator(CRD_SCHEMA)
CONVERSIONS = sorted(EXAMPLES.glob("conversion-*.yaml"))


@pytest.mark.parametrize("path", CONVERSIONS, ids=lambda p: p.name)
def test_example_conversions_match_the_crd(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert (obj["apiVersion"], obj["kind"]) == (jobs.API_VERSION, jobs.KIND)
    assert [e.message for e in CRD_VALIDATOR.iter_errors(obj)] == []
    jobs.validate_spec(obj["spec"])


def test_examples_cover_every_source_kind() -> None:
    uris = [yaml.safe_load(p.read_text())["spec"]["source"]["uri"] for p in CONVERSIONS]
    kinds = sorted("models@" if u.startswith("models:/") and "@" in u else u.split(":")[0] for u in uris)
    assert kinds == ["models", "models@", "runs", "s3"]


@pytest.mark.parametrize("mutate, path", [
    (lambda s: s["source"].update(uri="https://example.com/best.pt"), ["spec", "source", "uri"]),
    (lambda s: s["source"].update(sha256="ABC"), ["spec", "source", "sha256"]),
    (lambda s: s["conversion"].update(formats=["tflite"]), ["spec", "conversion", "formats", 0]),
    (lambda s: s["conversion"].update(atol=0), ["spec", "conversion", "atol"]),
    (lambda s: s["registry"].update(trackingUri="mlflow.mlops:5000"), ["spec", "registry", "trackingUri"]),
    (lambda s: s["registry"].pop("modelName"), ["spec", "registry"]),
    (lambda s: s["job"].update(backoffLimit=-1), ["spec", "job", "backoffLimit"]),
    (lambda s: s["job"].update(activeDeadlineSeconds=5), ["spec", "job", "activeDeadlineSeconds"]),
    (lambda s: s["job"]["resources"]["limits"].update(memory="lots"), ["spec", "job", "resources", "limits", "memory"]),
    (lambda s: s.pop("source"), ["spec"]),
])
def test_crd_schema_rejects_broken_conversions(mutate, path: list) -> None:
    obj = yaml.safe_load((EXAMPLES / "conversion-models-version.yaml").read_text())
    mutate(obj["spec"])
    errs = list(CRD_VALIDATOR.iter_errors(obj))
    assert errs, "accepted a broken spec"
    assert [list(e.absolute_path) for e in errs] == [path]


def test_mlflow_secret_example_is_a_valid_secret() -> None:
    secrets = list(yaml.safe_load_all((EXAMPLES / "mlflow-secret.yaml").read_text()))
    for s in secrets:
        kubernetes_validate.validate(s, KUBE_VERSIONS[-1], strict=True)
    secret = next(s for s in secrets if s["metadata"]["name"] == "mlflow-creds")
    referenced = set()
    for path in CONVERSIONS:
        job = yaml.safe_load(path.read_text())["spec"].get("job") or {}
        referenced |= {e["secretRef"]["name"] for e in job.get("envFrom") or [] if "secretRef" in e}
        referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for e in job.get("env") or []
                       if "secretKeyRef" in e.get("valueFrom", {})}
    assert referenced == {s["metadata"]["name"] for s in secrets}  # every Secret the examples use is defined
    # the keys the runs: example reads exist
    assert "token" in secret["stringData"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(secret["stringData"])


# --------------------------------------------------------------- Deployment


@pytest.mark.parametrize("case", VALUES)
def test_deployment_runs_one_operator_safely(chart, case: str) -> None:
    values = VALUES[case]
    objs = render(chart, values)
    deploy = one(objs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    # restricted Pod Security Standard
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]} and csc["privileged"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # liveness: kopf's /healthz on the port the operator is told to serve it on
    env = container_env(deploy)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe = c["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert ports["healthz"] == int(env["REPARAM_LIVENESS_PORT"])
    assert ports["metrics"] == int(env["REPARAM_METRICS_PORT"]) == values.get("metrics", {}).get("port", 9090)
    assert probe["periodSeconds"] >= 10 and probe["failureThreshold"] >= 3
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert c["command"] == ["python", "-m", "reparam.operator"]
    assert pod["serviceAccountName"] == (values.get("serviceAccount", {}).get("name")
                                         or f"{RELEASE}-reparam-operator")
    if case == "everything":
        assert c["image"] == "ghcr.io/reparam/reparam-operator@sha256:" + "a" * 64
        assert c["args"] == ["--verbose"]
        assert {"name": "TZ", "value": "UTC"} in c["env"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert not by_kind(objs, "ServiceAccount")
    else:
        assert c["image"] == f"ghcr.io/reparam/reparam-operator:{chart.metadata['appVersion']}"


@pytest.mark.parametrize("case", VALUES)
def test_operator_settings_from_the_rendered_environment(chart, case: str) -> None:
    """The Deployment's environment, read by the operator's own settings parser."""
    values = chart.merge_values(VALUES[case])
    env = container_env(one(render(chart, VALUES[case]), "Deployment"))
    if "REPARAM_WEBHOOK_PORT" in env:  # the kubelet fills it from the Secret (test_webhook_port_secret_...)
        env["REPARAM_WEBHOOK_SECRET"] = "from-the-secret"
    cfg = settings_mod.from_env(env)
    assert cfg.namespaces == tuple(values["watchNamespaces"])
    assert cfg.clusterwide is (not values["watchNamespaces"])
    assert cfg.image == values["converter"]["image"]
    assert cfg.max_concurrent == values["converter"]["maxConcurrent"]
    assert (cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", values["metrics"]["port"])
    assert cfg.liveness_port == values["operator"]["livenessPort"]
    assert cfg.scanning is False  # no cluster-wide CRD/namespace reads
    assert cfg.peering == (values["operator"]["peering"] or None)
    assert cfg.retry_delay == values["operator"]["retryDelay"]
    assert cfg.schedule_timeout == values["operator"]["scheduleTimeoutSeconds"]


def test_kueue_queue_and_priority_reach_the_jobs(chart) -> None:
    """jobDefaults.queueName / priorityClassName become the operator's defaults for spec.job, and the Job it
    builds for a resource naming neither goes to that Kueue queue, suspended, with that priority."""
    values = {"jobDefaults": {"queueName": "gpu-team-a", "priorityClassName": "batch-low"},
              "operator": {"scheduleTimeoutSeconds": 120}}
    env = container_env(one(render(chart, values), "Deployment"))
    cfg = settings_mod.from_env(env)
    assert cfg.schedule_timeout == 120
    assert cfg.job_defaults["job"]["queueName"] == "gpu-team-a"
    body = {"metadata": {"name": "m", "namespace": "ml", "uid": "u", "generation": 1},
            "spec": {"source": {"uri": "models:/m/1"}}}
    job = jobs.build_job(body, cfg.image, dict(cfg.job_defaults))
    assert job["metadata"]["labels"][jobs.LABEL_KUEUE_QUEUE] == "gpu-team-a" and job["spec"]["suspend"] is True
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
    with pytest.raises(Exception, match="queueName"):
        render(chart, {"jobDefaults": {"queueName": "Not A Queue"}})


def test_job_defaults_are_a_valid_partial_spec(chart) -> None:
    """REPARAM_JOB_DEFAULTS holds spec fields in the CRD's own shape."""
    env = container_env(one(render(chart, VALUES["gpu-cluster"]), "Deployment"))
    defaults = json.loads(env["REPARAM_JOB_DEFAULTS"])
    assert defaults == {
        "job": {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "24Gi"},
                              "requests": {"cpu": "2", "memory": "8Gi"}},
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "envFrom": [{"secretRef": {"name": "mlflow-creds"}}]},
        "registry": {"trackingUri": "http://mlflow.mlops:5000"},
    }
    obj = {"apiVersion": jobs.API_VERSION, "kind": jobs.KIND, "metadata": {"name": "x"},
           "spec": {"source": {"uri": "models:/m/1"}, "job": defaults["job"],
                    "registry": dict(defaults["registry"], modelName="m-deploy")}}
    assert [e.message for e in CRD_VALIDATOR.iter_errors(obj)] == []
    jobs.validate_spec(obj["spec"])
    default_env = container_env(one(render(chart, {}), "Deployment"))
    assert json.loads(default_env["REPARAM_JOB_DEFAULTS"]) == {"job": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}


# ---------------------------------------------------------------------- RBAC

EXPECTED_RULES = {
    # a ModelConversionPolicy creates conversions and deletes finished ones beyond its historyLimit
    ("reparam.dev", "modelconversions"): {"get", "list", "watch", "patch", "create", "delete"},
    ("reparam.dev", "modelconversions/status"): {"get", "patch"},
    ("reparam.dev", "modelconversionpolicies"): {"get", "list", "watch", "patch"},
    ("reparam.dev", "modelconversionpolicies/status"): {"get", "patch"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create"},
}


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def test_rbac_namespaced_when_namespaces_are_given(chart) -> None:
    objs = render(chart, VALUES["everything"])
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b", "team-c"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b", "team-c"]
    for role in roles:
        assert rules_of(role) == EXPECTED_RULES
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                "name": f"{RELEASE}-reparam-operator"}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "existing-sa", "namespace": NAMESPACE}]
    env = container_env(one(objs, "Deployment"))
    assert env["REPARAM_NAMESPACES"] == "team-a,team-b,team-c" and "REPARAM_CLUSTERWIDE" not in env


def test_rbac_clusterwide_only_without_namespaces(chart) -> None:
    objs = render(chart, {})
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    role, binding = one(objs, "ClusterRole"), one(objs, "ClusterRoleBinding")
    assert rules_of(role) == EXPECTED_RULES
    sa = one(objs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert container_env(one(objs, "Deployment"))["REPARAM_CLUSTERWIDE"] == "true"


def test_webhook_port_secret_service_and_ingress(chart) -> None:
    """webhook.enabled: the operator serves POST /webhooks/mlflow on its own port with the signing secret from
    the Secret; a Service and (optional) Ingress route only that path to it."""
    assert not [o for o in render(chart, {}) if o["metadata"]["name"].endswith("-webhook")]
    objs = render(chart, VALUES["everything"])
    deploy = one(objs, "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = container_env(deploy)
    secret_env = next(e for e in c["env"] if e["name"] == "REPARAM_WEBHOOK_SECRET")
    assert "value" not in secret_env
    assert secret_env["valueFrom"] == {"secretKeyRef": {"name": "mlflow-webhook", "key": "secret"}}
    cfg = settings_mod.from_env({**env, "REPARAM_WEBHOOK_SECRET": "from-the-secret"})
    assert cfg.webhook_port == ports["webhook"] == 9443 and cfg.webhook_port != cfg.metrics_port
    assert cfg.webhook_tolerance == 120 and cfg.webhook_host == "0.0.0.0"
    svc = next(o for o in by_kind(objs, "Service") if o["metadata"]["name"] == f"{RELEASE}-reparam-operator-webhook")
    assert svc["spec"]["ports"] == [{"name": "webhook", "port": 9443, "targetPort": "webhook", "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    ing = one(objs, "Ingress")
    (rule,) = ing["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "hooks.example.com" and ing["spec"]["ingressClassName"] == "nginx"
    assert (path["path"], path["pathType"]) == ("/webhooks/mlflow", "Exact")
    assert path["backend"]["service"] == {"name": svc["metadata"]["name"], "port": {"name": "webhook"}}
    # the operator refuses a webhook port without a secret (one line, exit 2), so does helm without a Secret name
    with pytest.raises(settings_mod.InvalidInputError, match="REPARAM_WEBHOOK_SECRET"):
        settings_mod.from_env(env)
    with pytest.raises(Exception, match="webhook.secretName"):
        render(chart, {"webhook": {"enabled": True}})


# ---------------------------------------------------------------- monitoring


def test_metrics_service_and_service_monitor_select_the_operator(chart) -> None:
    objs = render(chart, VALUES["everything"])
    deploy, sm = one(objs, "Deployment"), one(objs, "ServiceMonitor")
    svc = next(o for o in by_kind(objs, "Service") if o["metadata"]["name"].endswith("-metrics"))
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port == {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics" and ep["interval"] == "30s"
    gpu = render(chart, VALUES["gpu-cluster"])
    assert one(gpu, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(gpu, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not by_kind(render(chart, {}), "ServiceMonitor") and not by_kind(render(chart, {}), "PrometheusRule")


def exposed_metric_names() -> set[str]:
    """Every sample name the operator's metrics registry exposes."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.reconcile_total.labels(handler="reconcile", result="ok").inc()
    m.reconcile_errors_total.labels(handler="reconcile", result="error").inc()
    m.reconcile_seconds.labels(handler="reconcile").observe(0.01)
    m.duration.labels(outcome="succeeded").observe(100)
    m.queue_seconds.observe(2)
    return {s.name for fam in registry.collect() for s in fam.samples}


PROMQL_NAMES = re.compile(r"\b(reparam_[a-z_]+)\b")


def dashboard(chart, values=None) -> dict[str, Any]:
    objs = render(chart, values or {"metrics": {"dashboard": {"enabled": True}}})
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert len(cms) == 1
    return json.loads(cms[0]["data"]["reparam-operator.json"])


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def rule_groups(chart, values=None) -> dict[str, Any]:
    objs = render(chart, values or {"metrics": {"prometheusRule": {"enabled": True}}})
    return one(objs, "PrometheusRule")["spec"]


def test_dashboard_panels_use_exposed_metrics(chart) -> None:
    dash = dashboard(chart)
    titles = [p["title"] for p in dash["panels"]]
    for needed in ("Conversions by outcome", "In progress / queued", "Conversion duration (Job created to end)",
                   "Queue time (Job created to pod running)"):
        assert needed in titles
    exprs = dashboard_exprs(dash)
    names = {n for e in exprs for n in PROMQL_NAMES.findall(e)}
    assert names and names <= exposed_metric_names(), names - exposed_metric_names()
    assert {"reparam_conversions_total", "reparam_conversions_in_progress", "reparam_conversions_queued",
            "reparam_conversion_duration_seconds_bucket", "reparam_job_queue_duration_seconds_bucket"} <= names
    quantiles = {q for e in exprs for q in re.findall(r"histogram_quantile\((0\.\d+)", e)}
    assert quantiles == {"0.5", "0.9", "0.99"}
    cm_ns = [o for o in render(chart, VALUES["gpu-cluster"]) if o["kind"] == "ConfigMap"][0]["metadata"]
    assert cm_ns["namespace"] == "monitoring" and cm_ns["labels"]["grafana_dashboard"] == "1"


def test_alert_rules_use_exposed_metrics(chart) -> None:
    groups = rule_groups(chart)
    alerts = {r["alert"]: r for g in groups["groups"] for r in g["rules"]}
    assert set(alerts) == {"ReparamConversionFailures", "ReparamNoRecentSuccess", "ReparamReconcileErrors"}
    names = {n for r in alerts.values() for n in PROMQL_NAMES.findall(r["expr"])}
    assert names <= exposed_metric_names(), names - exposed_metric_names()
    assert "21600" in alerts["ReparamNoRecentSuccess"]["expr"]  # noSuccessFor 6h in seconds
    gpu = rule_groups(chart, VALUES["gpu-cluster"])
    (rule,) = [r for g in gpu["groups"] for r in g["rules"] if r["alert"] == "ReparamNoRecentSuccess"]
    assert "43200" in rule["expr"]


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60)


@needs_promtool
def test_promtool_checks_the_rules(chart, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups(chart)))
    res = promtool("check", "rules", str(rules))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 3 rules found" in res.stdout


ALERT_TESTS = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'reparam_conversions_total{job="op", outcome="succeeded"}'
        values: '0 1 2 3 4 5 6 7 8 9 10'
      - series: 'reparam_conversions_total{job="op", outcome="failed"}'
        values: '0 0 0 0 0 1 1 1 1 1 1'
      - series: 'reparam_conversions_total{job="op", outcome="validation_failed"}'
        values: '0x10'
      - series: 'reparam_operator_reconcile_errors_total{job="op", handler="job_event", result="error"}'
        values: '0 0 0 0 0 0 0 2 2 2 2'
      - series: 'reparam_operator_reconcile_errors_total{job="op", handler="reconcile", result="temporary_error"}'
        values: '0+5x10'
    alert_rule_test:
      - {eval_time: 4m, alertname: ReparamConversionFailures, exp_alerts: []}
      - eval_time: 8m
        alertname: ReparamConversionFailures
        exp_alerts:
          - exp_labels: {severity: warning, outcome: failed}
            exp_annotations:
              summary: ModelConversions failed in the last 1h
              description: >-
                1 conversions ended with outcome failed. `kubectl get mconv -A` lists them;
                status.lastFailure holds the converter's message.
      - {eval_time: 6m, alertname: ReparamReconcileErrors, exp_alerts: []}
      - eval_time: 10m
        alertname: ReparamReconcileErrors
        exp_alerts:
          - exp_labels: {severity: warning, handler: job_event}
            exp_annotations:
              summary: reparam operator handler job_event raised unexpected errors
              description: 2 unexpected errors in the last 15m; see the operator's log.
  # pending work, no success ever, operator up since time 0: fires once 6h have passed and 15m held
  - interval: 5m
    input_series:
      - {series: 'reparam_last_success_timestamp_seconds{job="op"}', values: '0x120'}
      - {series: 'reparam_operator_start_time_seconds{job="op"}', values: '0x120'}
      - {series: 'reparam_conversions_in_progress{job="op"}', values: '1x120'}
      - {series: 'reparam_conversions_queued{job="op"}', values: '0x120'}
    alert_rule_test:
      - {eval_time: 5h, alertname: ReparamNoRecentSuccess, exp_alerts: []}
      - eval_time: 7h
        alertname: ReparamNoRecentSuccess
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: No ModelConversion succeeded for 6h while conversions are pending
              description: >-
                Conversions are running or queued but none succeeded for 6h:
                Jobs may be stuck (no GPU node, image pull errors) or failing.
  # pending work, no success ever, but the operator only started at 6h30m: no alert at 7h (nor at 12h)
  - interval: 5m
    input_series:
      - {series: 'reparam_last_success_timestamp_seconds{job="op"}', values: '0x160'}
      - {series: 'reparam_operator_start_time_seconds{job="op"}', values: '23400x160'}
      - {series: 'reparam_conversions_in_progress{job="op"}', values: '1x160'}
      - {series: 'reparam_conversions_queued{job="op"}', values: '0x160'}
    alert_rule_test:
      - {eval_time: 7h, alertname: ReparamNoRecentSuccess, exp_alerts: []}
      - {eval_time: 12h, alertname: ReparamNoRecentSuccess, exp_alerts: []}
  # nothing pending: no alert however old the last success
  - interval: 5m
    input_series:
      - {series: 'reparam_last_success_timestamp_seconds{job="op"}', values: '0x120'}
      - {series: 'reparam_conversions_in_progress{job="op"}', values: '0x120'}
      - {series: 'reparam_conversions_queued{job="op"}', values: '0x120'}
    alert_rule_test:
      - {eval_time: 9h, alertname: ReparamNoRecentSuccess, exp_alerts: []}
  # pending work but a success 1h ago (sample 84 = 7h): no alert at 8h
  - interval: 5m
    input_series:
      - {series: 'reparam_last_success_timestamp_seconds{job="op"}', values: '0x83 25200x40'}
      - {series: 'reparam_conversions_queued{job="op"}', values: '3x120'}
      - {series: 'reparam_conversions_in_progress{job="op"}', values: '0x120'}
    alert_rule_test:
      - {eval_time: 8h, alertname: ReparamNoRecentSuccess, exp_alerts: []}
"""


@needs_promtool
def test_promtool_unit_tests_the_alerts(chart, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(chart)))
    (tmp_path / "alerts_test.yaml").write_text(ALERT_TESTS)
    res = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def populated_exposition() -> str:
    """The text exposition of an operator registry after a few conversions (as in the e2e tests)."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    for handler in ("reconcile", "job_event", "resource_deleted"):
        m.reconcile_total.labels(handler=handler, result="ok").inc(3)
        m.reconcile_seconds.labels(handler=handler).observe(0.02)
    m.reconcile_total.labels(handler="reconcile", result="permanent_error").inc()
    m.reconcile_errors_total.labels(handler="reconcile", result="permanent_error").inc()
    m.conversions_total.labels(outcome="succeeded").inc(2)
    m.conversions_total.labels(outcome="validation_failed").inc()
    m.duration.labels(outcome="succeeded").observe(95)
    m.duration.labels(outcome="validation_failed").observe(40)
    m.queue_seconds.observe(4)
    m.registry_ops.labels(operation="register", result="success").inc(2)
    m.registry_ops.labels(operation="promote", result="success").inc(2)
    m.last_success.set(1.7e9)
    m.set_slots(1, 2)
    return generate_latest(registry).decode()


@needs_promtool
def test_promtool_lints_the_metric_exposition() -> None:
    text = populated_exposition()
    assert "reparam_conversions_total{outcome=\"succeeded\"} 2.0" in text
    res = promtool("check", "metrics", stdin=text)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""
    # the lint really checks names: a counter without _total is reported
    bad = "# HELP reparam_bad Bad.\n# TYPE reparam_bad counter\nreparam_bad 1\n"
    res = promtool("check", "metrics", stdin=bad)
    assert res.returncode != 0 and "_total" in res.stdout + res.stderr


def test_chart_version_matches_the_package() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', project, re.M).group(1)
    assert meta["appVersion"] == version
    assert settings_mod.DEFAULT_IMAGE.endswith(":" + version)
    assert yaml.safe_load((CHART / "values.yaml").read_text())["converter"]["image"] == settings_mod.DEFAULT_IMAGE


def test_dockerfiles_match_the_extras() -> None:
    op = (ROOT / "docker" / "operator.Dockerfile").read_text()
    conv = (ROOT / "docker" / "converter.Dockerfile").read_text()
    assert re.findall(r"pip install (\S+)", op) == ['".[operator]"']  # kopf & co, no torch
    assert '".[converter]"' in conv and re.search(r"^FROM \$\{BASE\}", conv, re.M)
    assert re.search(r"^ARG BASE=pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-runtime$", conv, re.M)
    for text in (op, conv):
        user = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
        assert user == [(str(jobs.RUN_AS_USER), str(jobs.RUN_AS_USER))]
    assert re.search(r'^ENTRYPOINT \["reparam"\]$', conv, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "reparam.operator"\]$', op, re.M)
    assert "reparam" in (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n")[1]

