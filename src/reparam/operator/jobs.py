"""The Job that runs one conversion: a pure builder over plain dicts.

:func:`build_job` turns a ``ModelConversion`` (its ``metadata`` and ``spec``) into a
``batch/v1`` Job manifest; nothing here talks to a server. The rules come from the
Kubernetes Job and Pod APIs:

* one Job per resource *generation*, with a deterministic name (:func:`job_name`):
  a re-run of the same generation finds the same Job (create returns 409), a new
  generation gets a new Job; the name is at most 63 characters because the Job
  controller copies it into the pods' ``batch.kubernetes.io/job-name`` label;
* ``podFailurePolicy`` (Job API, needs ``restartPolicy: Never``): the converter's
  permanent exit codes (:data:`reparam.exitcodes.PERMANENT`) fail the Job at once,
  a pod evicted by node disruption (``DisruptionTarget``) does not count;
* the container writes its summary to ``/dev/termination-log`` with
  ``FallbackToLogsOnError`` (Pod API ``terminationMessagePath``/``Policy``);
* restricted pod security (non-root, read-only root file system, no privilege
  escalation, all capabilities dropped, RuntimeDefault seccomp); the converter
  writes only to ``emptyDir`` volumes at :data:`WORK_DIR` and ``/tmp``;
* credentials reach the container only through Secret references (``envFrom``,
  ``env[].valueFrom``) copied from the spec; the resource never holds a secret.
"""

from __future__ import annotations

import copy

import hashlib
import math
import re
from typing import Any

from .. import exitcodes
from .. import spec as grammar

GROUP = "reparam.dev"
VERSION = "v1alpha1"
PLURAL = "modelconversions"
KIND = "ModelConversion"
API_VERSION = f"{GROUP}/{VERSION}"

#: Name of the converter container (the podFailurePolicy refers to it).
CONTAINER = "convert"
#: Where the converter writes its outputs (an emptyDir).
WORK_DIR = "/work"
#: The Pod API's default termination message path.
TERMINATION_LOG = "/dev/termination-log"
#: The GPU resource name requested when the spec names none.
GPU_RESOURCE = "nvidia.com/gpu"

# Labels linking a Job (and its pods) to the resource.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_CONVERSION = f"{GROUP}/conversion"
LABEL_UID = f"{GROUP}/conversion-uid"
LABEL_GENERATION = f"{GROUP}/generation"
MANAGER = "reparam-operator"

#: Non-root user of the converter image.
RUN_AS_USER = 65532



class InvalidSpec(ValueError):
    """The resource's spec cannot be converted; ``str(err)`` names the field and the fix."""


def validate_spec(spec: dict[str, Any]) -> None:
    """Check what the admission schema cannot (or what a schema-less apply let through).

    Every grammar is :mod:`reparam.spec`'s, the one the converter's CLI uses, so a resource accepted here is a
    command the converter accepts. Raises :class:`InvalidSpec` with one message per problem, joined by ``"; "``.
    """
    problems: list[str] = []
    source = spec.get("source") or {}
    uri = source.get("uri") or ""
    try:
        kind = grammar.parse_source_uri(uri).kind
    except grammar.SpecError as err:
        problems.append(f"spec.source.uri: {err}")
    else:
        if kind not in grammar.CLUSTER_SOURCE_KINDS:
            problems.append(f"spec.source.uri {uri!r} is not a models:/NAME/VERSION, models:/NAME@ALIAS, "
                            "runs:/RUN_ID/PATH or s3://BUCKET/KEY URI (a Job cannot read a local path or URL)")
    sha = source.get("sha256") or ""
    if sha and grammar.sha256_problem(sha):
        problems.append("spec.source.sha256 must be 64 hex digits (or empty to skip the check)")
    conv = spec.get("conversion") or {}
    try:
        grammar.parse_precision(conv.get("precision", grammar.DEFAULT_PRECISION))
    except grammar.SpecError as err:
        problems.append(f"spec.conversion.precision: {err}")
    problem = grammar.device_problem(conv.get("device", grammar.DEFAULT_DEVICE))
    if problem:
        problems.append(f"spec.conversion.device: {problem}")
    problem = grammar.head_problem(conv["head"]) if "head" in conv else None
    if problem:
        problems.append(f"spec.conversion.head: {problem}")
    formats = conv.get("formats") or list(grammar.OPERATOR_DEFAULT_FORMATS)
    bad = [f for f in formats if f not in grammar.FORMATS]
    if bad:
        problems.append(f"spec.conversion.formats has unknown {bad}; use {', '.join(grammar.FORMATS)}")
    atol = conv.get("atol")
    if atol is not None and (not isinstance(atol, (int, float)) or isinstance(atol, bool) or atol <= 0):
        problems.append(f"spec.conversion.atol must be a positive number, got {atol!r}")
    reg = spec.get("registry")
    if reg is not None:
        if not re.fullmatch(grammar.TRACKING_URI_PATTERN, reg.get("trackingUri") or ""):
            problems.append("spec.registry.trackingUri must be an http(s):// MLflow tracking URI")
        problem = grammar.model_name_problem(reg.get("modelName") or "")
        if problem:
            problems.append(f"spec.registry.modelName: {problem}")
        for alias in reg.get("aliases") or []:
            problem = grammar.alias_problem(alias)
            if problem:
                problems.append(f"spec.registry.aliases: {problem}")
        for key in (reg.get("tags") or {}):
            problem = grammar.tag_key_problem(key)
            if problem:
                problems.append(f"spec.registry.tags: {problem}")
    problems += _evaluation_problems(spec)
    job = spec.get("job") or {}
    for field in ("activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished"):
        value = job.get(field)
        if value is not None and (not isinstance(value, int) or value < 0):
            problems.append(f"spec.job.{field} must be a non-negative integer")
    problems += _cluster_problems(job) + cross_field_problems(spec)
    for env in job.get("env") or []:
        if "value" in env and _looks_secret(env.get("name", "")):
            problems.append(
                f"spec.job.env {env.get('name')!r} holds a literal value; pass credentials with "
                "valueFrom.secretKeyRef or envFrom.secretRef instead"
            )
    if problems:
        raise InvalidSpec("; ".join(problems))


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY"))


def _dns_part(text: str) -> str:
    part = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return part or "mc"


def job_name(name: str, uid: str, generation: int) -> str:
    """Deterministic Job name of a resource generation, at most 63 characters.

    ``<name>-g<generation>-<6 hex of sha256(uid)>``; the name part is shortened
    (never the suffix), so a resource re-created under the same name gets
    another Job name. Shapes: ``("traffic-v7", "4f1c...", 3) -> "traffic-v7-g3-a1b2c3"``.
    """
    suffix = f"-g{int(generation)}-{hashlib.sha256(uid.encode()).hexdigest()[:6]}"
    base = _dns_part(name)[: 63 - len(suffix)].rstrip("-") or "mc"
    return base + suffix


def label_value(text: str) -> str:
    """A label value (at most 63 characters) naming ``text``; long names get a hash tail."""
    if len(text) <= 63:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return text[:54].rstrip("-_.") + "-" + digest


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    """The controller owner reference to the resource; ``blockOwnerDeletion`` so that a
    foreground delete waits for the Job, and the garbage collector removes the Job
    when the resource goes (no finalizer needed)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(meta: dict[str, Any]) -> dict[str, str]:
    """Labels put on the Job and its pods, linking both to the resource and generation."""
    return {
        LABEL_NAME: "reparam",
        LABEL_COMPONENT: "conversion",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_CONVERSION: label_value(meta["name"]),
        LABEL_UID: meta["uid"],
        LABEL_GENERATION: str(int(meta.get("generation") or 1)),
    }


def _evaluation_problems(spec: dict[str, Any]) -> list[str]:
    """``spec.evaluation`` / ``spec.promotion`` checks (the CLI's ``--eval-*`` / ``--promote`` rules)."""
    problems: list[str] = []
    ev, promo = spec.get("evaluation"), spec.get("promotion")
    if ev is not None and not (ev.get("data") or ""):
        problems.append("spec.evaluation.data must name the validation set (s3://, runs:/ or models:/ URI)")
    if promo is None:
        return problems
    if ev is None or spec.get("registry") is None:
        problems.append("spec.promotion needs spec.evaluation (the gates compare mAP) and spec.registry")
    for field in ("alias", "holdAlias"):
        if promo.get(field) is not None:
            problem = grammar.alias_problem(promo[field])
            if problem:
                problems.append(f"spec.promotion.{field}: {problem}")
    if promo.get("alias") and promo.get("alias") in ((spec.get("registry") or {}).get("aliases") or []):
        problems.append("spec.promotion.alias is also in spec.registry.aliases (gated and ungated at once)")
    if promo.get("holdAlias") and promo.get("holdAlias") == promo.get("alias"):
        problems.append("spec.promotion.holdAlias must differ from spec.promotion.alias")
    return problems


def command(spec: dict[str, Any]) -> list[str]:
    """The ``reparam convert`` command line of the container, from the spec.

    The converter reads credentials from its environment (Secret references),
    never from the command line.
    """
    source = spec["source"]
    conv = spec.get("conversion") or {}
    cmd = ["reparam", "convert", source["uri"], "-o", f"{WORK_DIR}/out"]
    if source.get("sha256"):
        cmd += ["--sha256", source["sha256"]]
    if conv.get("fuse", True):
        cmd.append("--fuse")
    cmd += ["--precision", conv.get("precision", grammar.DEFAULT_PRECISION)]
    cmd += ["--device", conv.get("device", grammar.DEFAULT_DEVICE)]
    if "head" in conv:  # only when set: every head but TripleDDetect refuses --head
        cmd += ["--head", conv["head"]]
    for fmt in conv.get("formats") or grammar.OPERATOR_DEFAULT_FORMATS:  # exactly these: --only
        cmd += ["--only", fmt]
    if conv.get("atol") is not None:
        cmd += ["--atol", repr(float(conv["atol"]))]
    reg = spec.get("registry")
    if reg:
        cmd += ["--register", reg["modelName"], "--tracking-uri", reg["trackingUri"]]
        for alias in reg.get("aliases") or []:
            cmd += ["--alias", alias]
        for key, value in sorted((reg.get("tags") or {}).items()):
            cmd += ["--tag", f"{key}={value}"]
    ev = spec.get("evaluation")
    if ev:
        cmd += ["--eval-data", ev["data"]]
        if ev.get("imgsz") is not None:
            cmd += ["--eval-imgsz", str(int(ev["imgsz"]))]
        if ev.get("atol") is not None:
            cmd += ["--eval-atol", repr(float(ev["atol"]))]
    promo = spec.get("promotion")
    if promo:
        cmd += ["--promote", promo["alias"]]
        if promo.get("minMap") is not None:
            cmd += ["--min-map", repr(float(promo["minMap"]))]
        if promo.get("maxRegression") is not None:
            cmd += ["--max-regression", repr(float(promo["maxRegression"]))]
        if promo.get("holdAlias"):
            cmd += ["--hold-alias", promo["holdAlias"]]
    cmd += ["--termination-log", TERMINATION_LOG, "--json"]
    return cmd


def _limits(job_spec: dict[str, Any], device: str = grammar.DEFAULT_DEVICE) -> dict[str, Any]:
    """The container's resources: ``spec.job.resources`` plus one :data:`GPU_RESOURCE` when it names none, except
    for ``spec.conversion.device: cpu`` (a CPU conversion has no use for a GPU; resources given, by the resource
    or the chart's ``jobDefaults``, are kept as they are)."""
    resources = dict(job_spec.get("resources") or {})
    limits = dict(resources.get("limits") or {})
    if device != "cpu":
        limits.setdefault(GPU_RESOURCE, 1)
    resources["limits"] = limits
    return resources


#: ``spec.job`` fields the operator-wide defaults may fill (Helm value ``jobDefaults``).
DEFAULTABLE_JOB_FIELDS = ("resources", "nodeSelector", "tolerations", "envFrom", "serviceAccountName",
                          "imagePullSecrets", *("queueName", "priorityClassName", "scheduleTimeoutSeconds"))


def with_defaults(spec: dict[str, Any], defaults: dict[str, Any] | None) -> dict[str, Any]:
    """``spec`` with the operator's defaults filled in where the resource leaves a field empty.

    ``defaults`` has the CRD's own shape: ``{"job": {<DEFAULTABLE_JOB_FIELDS>}, "registry": {"trackingUri": ...}}``.
    The resource always wins; a registry default applies only to a resource that asks for registration
    (has ``spec.registry``). Pure: returns a new dict.
    """
    out = copy.deepcopy(spec)
    if not defaults:
        return out
    job = dict(out.get("job") or {})
    for field, value in (defaults.get("job") or {}).items():
        if field in DEFAULTABLE_JOB_FIELDS and not job.get(field) and value:
            job[field] = copy.deepcopy(value)
    if job:
        out["job"] = job
    reg_default = (defaults.get("registry") or {}).get("trackingUri")
    if out.get("registry") is not None and not out["registry"].get("trackingUri") and reg_default:
        out["registry"] = {**out["registry"], "trackingUri": reg_default}
    return out


def build_job(body: dict[str, Any], default_image: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``batch/v1`` Job manifest for the resource's current generation.

    ``body`` is the ModelConversion (``metadata.name/namespace/uid/generation`` and
    ``spec``); ``default_image`` is used when ``spec.job.image`` is empty and
    ``defaults`` (:func:`with_defaults`) fill the other fields the resource leaves empty.
    Raises :class:`InvalidSpec` (via :func:`validate_spec`) for an unusable spec.
    """
    meta = body["metadata"]
    spec = with_defaults(body.get("spec") or {}, defaults)
    validate_spec(spec)
    job_spec = spec.get("job") or {}
    generation = int(meta.get("generation") or 1)
    name = job_name(meta["name"], meta["uid"], generation)
    lbl = labels(meta)

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job_spec.get("image") or default_image,
        "imagePullPolicy": job_spec.get("imagePullPolicy") or "IfNotPresent",
        "command": command(spec),
        "workingDir": WORK_DIR,
        "env": [
            {"name": "HOME", "value": WORK_DIR},
            {"name": "TMPDIR", "value": "/tmp"},
            {"name": "XDG_CACHE_HOME", "value": f"{WORK_DIR}/.cache"},
            {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *[dict(e) for e in job_spec.get("env") or []],
        ],
        "resources": _limits(job_spec, (spec.get("conversion") or {}).get("device", grammar.DEFAULT_DEVICE)),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if job_spec.get("envFrom"):
        container["envFrom"] = [dict(e) for e in job_spec["envFrom"]]

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "work", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
    }
    if job_spec.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(job_spec["nodeSelector"])
    if job_spec.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in job_spec["tolerations"]]
    if job_spec.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = job_spec["serviceAccountName"]
    if job_spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [dict(s) for s in job_spec["imagePullSecrets"]]

    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": dict(lbl),
            "annotations": {f"{GROUP}/source-uri": spec["source"]["uri"]},
            "ownerReferences": [owner_reference(meta)],
        },
        "spec": {
            "backoffLimit": int(job_spec.get("backoffLimit", 2)),
            "activeDeadlineSeconds": int(job_spec.get("activeDeadlineSeconds", 3600)),
            "ttlSecondsAfterFinished": int(job_spec.get("ttlSecondsAfterFinished", 86400)),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": sorted(exitcodes.PERMANENT),
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {"metadata": {"labels": dict(lbl)}, "spec": pod_spec},
        },
    }
    return _cluster_fields(manifest, job_spec)


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether ``obj`` carries an owner reference to the object with ``uid``."""
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def generation_of(job: dict[str, Any]) -> int | None:
    """The resource generation a Job was built for (from its label), or ``None``."""
    value = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_GENERATION)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------------------
# Real-cluster fields (issue #12): Kueue, priority, scheduling time-out, thread counts, clean-up. Kept in one block.

#: The label Kueue reads to put a Job in a LocalQueue (Kueue docs, "Run a Job": ``kueue.x-k8s.io/queue-name``).
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
#: Seconds a pod may stay unschedulable when neither the spec nor the operator says (15 minutes).
DEFAULT_SCHEDULE_TIMEOUT = 900
#: Thread-count variables set from the container's CPUs: OpenMP's (torch's intra-op pool reads it at start) and
#: the BLAS libraries' (MKL, OpenBLAS); the converter also lowers torch's threads to its cgroup quota.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_QUEUE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1123 label: Kueue LocalQueue names
_CPU = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(m?)$")


def queue_name(job_spec: dict[str, Any]) -> str:
    """The Kueue LocalQueue of ``spec.job`` (after :func:`with_defaults`), ``""`` for the operator's own slots."""
    return str(job_spec.get("queueName") or "")


def kueue_managed(job: dict[str, Any]) -> bool:
    """Whether a Job goes through Kueue (it carries :data:`LABEL_KUEUE_QUEUE`): Kueue's quota limits it, the
    operator neither counts it in its slots nor ever un-suspends it."""
    return bool(((job.get("metadata") or {}).get("labels") or {}).get(LABEL_KUEUE_QUEUE))


def schedule_timeout(job_spec: dict[str, Any], default: float) -> float:
    """Seconds a pod may stay unschedulable: ``spec.job.scheduleTimeoutSeconds`` or the operator's ``default``."""
    value = job_spec.get("scheduleTimeoutSeconds")
    return float(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else float(default)


def cpu_threads(quantity: Any) -> int | None:
    """Threads for a CPU quantity (``2``, ``"1500m"``, ``"0.5"``): rounded up, at least 1, as the converter's
    own cgroup rule (``reparam.converter.cpus``); ``None`` for what is not a plain CPU quantity."""
    match = _CPU.match(str(quantity).strip())
    if not match:
        return None
    cpus = float(match.group(1)) / (1000 if match.group(2) else 1)
    return max(1, math.ceil(cpus - 1e-9)) if cpus > 0 else None


def cross_field_problems(spec: dict[str, Any]) -> list[str]:
    """The CRD's cross-field CEL rules (:mod:`reparam.spec`), checked again here for API servers without CEL
    (before Kubernetes 1.25) and for resources applied before the CRD had them."""
    problems: list[str] = []
    source = spec.get("source") or {}
    problem = grammar.sha256_pin_problem(source.get("uri"), source.get("sha256"))
    if problem:
        problems.append(problem)
    conversion = spec.get("conversion") or {}
    problem = grammar.precision_family_problem(
        conversion.get("precision"), conversion.get("formats") or grammar.OPERATOR_DEFAULT_FORMATS)
    if problem:
        problems.append(f"spec.conversion.{problem}")
    return problems


def _cluster_problems(job: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    name = job.get("queueName")
    if name is not None and (not isinstance(name, str) or (name and (len(name) > 63 or not _QUEUE_NAME.match(name)))):
        problems.append("spec.job.queueName must be a Kueue LocalQueue name (lowercase DNS label, at most 63)")
    value = job.get("scheduleTimeoutSeconds")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        problems.append("spec.job.scheduleTimeoutSeconds must be a positive integer")
    return problems


def _cluster_fields(manifest: dict[str, Any], job_spec: dict[str, Any]) -> dict[str, Any]:
    """Add the real-cluster fields to a Job manifest built by :func:`build_job` (returns it).

    * ``spec.job.queueName``: the Kueue label on the Job and ``spec.suspend: true`` (Kueue admits a Job by
      un-suspending it; a Job created running would bypass its quota);
    * ``spec.job.priorityClassName`` on the pod (Kueue and the scheduler read it there);
    * thread counts (:data:`THREAD_ENV`) from the container's CPU limit, else its request, unless ``spec.job.env``
      sets them: torch sizes its pools from the node's cores, not the pod's limit.
    """
    spec = manifest["spec"]
    pod = spec["template"]["spec"]
    queue = queue_name(job_spec)
    if queue:
        manifest["metadata"]["labels"][LABEL_KUEUE_QUEUE] = queue
        spec["suspend"] = True
    if job_spec.get("priorityClassName"):
        pod["priorityClassName"] = str(job_spec["priorityClassName"])
    container = pod["containers"][0]
    resources = container.get("resources") or {}
    cpu = ((resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu"))
    threads = cpu_threads(cpu) if cpu is not None else None
    if threads is not None:
        given = {e.get("name") for e in container["env"]}
        container["env"] += [{"name": var, "value": str(threads)} for var in THREAD_ENV if var not in given]
    return manifest
