"""The pure Job builder: names, labels, owner, security, failure policy, command."""

from __future__ import annotations

import copy

import pytest

from reparam import exitcodes
from reparam.operator import jobs


def body(**spec_over) -> dict:
    spec = {
        "source": {"uri": "models:/traffic-dual/7", "sha256": "a" * 64},
        "conversion": {"fuse": True, "precision": "fp16", "formats": ["pt", "onnx"], "atol": 1e-4},
        "registry": {"trackingUri": "http://mlflow.mlops:5000", "modelName": "traffic-deploy",
                     "aliases": ["champion"], "tags": {"team": "vision"}},
        "job": {"resources": {"limits": {"memory": "16Gi"}}, "envFrom": [{"secretRef": {"name": "s3-creds"}}],
                "activeDeadlineSeconds": 1800, "backoffLimit": 1, "ttlSecondsAfterFinished": 60,
                "nodeSelector": {"gpu": "h100"}, "serviceAccountName": "conv"},
    }
    spec.update(spec_over)
    return {"metadata": {"name": "traffic-v7", "namespace": "vision", "uid": "1234-abcd", "generation": 3},
            "spec": spec}


def test_job_name_is_deterministic_and_short() -> None:
    assert jobs.job_name("traffic-v7", "u1", 3) == jobs.job_name("traffic-v7", "u1", 3)
    assert jobs.job_name("traffic-v7", "u1", 3) != jobs.job_name("traffic-v7", "u1", 4)
    assert jobs.job_name("traffic-v7", "u1", 3) != jobs.job_name("traffic-v7", "u2", 3)
    assert jobs.job_name("traffic-v7", "u1", 3).startswith("traffic-v7-g3-")
    long = jobs.job_name("a" * 250 + ".b", "u1", 123456)
    assert len(long) <= 63 and long.endswith(jobs.job_name("x", "u1", 123456)[1:])
    assert jobs.job_name("Weird.Name", "u", 1).startswith("weird-name-g1-")


def test_build_job_links_owner_and_labels() -> None:
    b = body()
    job = jobs.build_job(b, "default:img")
    meta = job["metadata"]
    assert meta["name"] == jobs.job_name("traffic-v7", "1234-abcd", 3)
    assert meta["namespace"] == "vision"
    assert meta["ownerReferences"] == [{"apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
                                        "name": "traffic-v7", "uid": "1234-abcd", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["labels"][jobs.LABEL_UID] == "1234-abcd"
    assert meta["labels"][jobs.LABEL_GENERATION] == "3"
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]
    assert jobs.generation_of(job) == 3 and jobs.owned_by(job, "1234-abcd") and not jobs.owned_by(job, "x")


def test_build_job_settings_security_and_failure_policy() -> None:
    job = jobs.build_job(body(), "default:img")
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (1, 1800, 60)
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "convert", "operator": "In",
                                                             "values": sorted(exitcodes.PERMANENT)}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["serviceAccountName"] == "conv"
    (c,) = pod["containers"]
    assert c["image"] == "default:img"
    assert c["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 1}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in vols[mounts["/work"]] and "emptyDir" in vols[mounts["/tmp"]]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_command_from_spec() -> None:
    cmd = jobs.build_job(body(), "img")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:5] == ["reparam", "convert", "models:/traffic-dual/7", "-o", "/work/out"]
    joined = " ".join(cmd)
    for part in ("--sha256 " + "a" * 64, "--fuse", "--precision fp16", "--device auto", "--only pt --only onnx",
                 "--atol 0.0001",
                 "--register traffic-deploy", "--tracking-uri http://mlflow.mlops:5000", "--alias champion",
                 "--tag team=vision", "--termination-log /dev/termination-log", "--json"):
        assert part in joined
    plain = body(conversion={"fuse": False, "precision": "fp32"}, registry=None)
    plain["spec"].pop("registry")
    cmd2 = jobs.command(plain["spec"])
    assert "--fuse" not in cmd2 and "--register" not in cmd2
    assert cmd2[cmd2.index("--precision") + 1] == "fp32"
    assert cmd2[cmd2.index("--only") + 1] == "pt" and cmd2.count("--only") == 1 and "--format" not in cmd2


@pytest.mark.parametrize("conversion, weights, export, formats, device, head", [
    ({}, "fp16", "fp16", ("pt",), "auto", None),  # the CRD's defaults: fp16 everywhere, exactly the .pt, no --head
    ({"precision": "fp32", "formats": ["onnx"], "head": "coarse"}, "fp32", "fp32", ("onnx",), "auto", "coarse"),
    ({"precision": "export=fp16", "formats": ["pt", "onnx"], "device": "cuda:1", "head": "fine"}, "fp16", "fp16",
     ("pt", "onnx"), "cuda:1", "fine"),
    ({"precision": "weights=fp32,export=fp16", "formats": ["torchscript", "safetensors"], "device": "cpu"},
     "fp32", "fp16", ("safetensors", "torchscript"), "cpu", None),
])
def test_job_command_means_the_same_to_the_converter(conversion, weights, export, formats, device, head) -> None:
    """The Job's command, parsed by the converter's own parser, gives what the spec says (one to one)."""
    from reparam import cli, spec

    b = body(conversion=conversion)
    cmd = jobs.build_job(b, "img")["spec"]["template"]["spec"]["containers"][0]["command"]
    args = cli.build_parser().parse_args(cmd[1:])
    assert cli._precision(args) == spec.Precision(weights, export)
    assert spec.resolve_formats(args.formats, args.only) == formats
    assert args.device == device
    assert args.head == head and ("--head" in cmd) == (head is not None)  # left out: the converter decides


def test_cpu_conversion_requests_no_gpu() -> None:
    b = body(conversion={"device": "cpu"})
    b["spec"]["job"].pop("resources", None)
    c = jobs.build_job(b, "img")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    b = body(conversion={"device": "auto"})
    b["spec"]["job"].pop("resources", None)
    assert jobs.build_job(b, "img")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "nvidia.com/gpu": 1}


def test_spec_image_and_gpu_override() -> None:
    b = body()
    b["spec"]["job"]["image"] = "mine:1"
    b["spec"]["job"]["resources"] = {"limits": {"nvidia.com/gpu": 2}}
    c = jobs.build_job(b, "img")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "mine:1" and c["resources"]["limits"]["nvidia.com/gpu"] == 2


@pytest.mark.parametrize("change, needle", [
    ({"source": {"uri": "file:///x.pt"}}, "spec.source.uri"),
    ({"source": {"uri": "models:/a/1", "sha256": "XYZ"}}, "sha256"),
    ({"conversion": {"precision": "int8"}}, "precision"),
    ({"conversion": {"device": "gpu"}}, "spec.conversion.device"),
    ({"conversion": {"head": "main"}}, "spec.conversion.head: head 'main' is not a TripleDDetect"),
    ({"conversion": {"formats": ["tflite"]}}, "formats"),
    ({"conversion": {"atol": -1}}, "atol"),
    ({"registry": {"trackingUri": "mlflow", "modelName": "m"}}, "trackingUri"),
    ({"registry": {"trackingUri": "http://m", "modelName": "m", "aliases": ["latest"]}}, "alias"),
    ({"job": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "plain"}]}}, "secretKeyRef"),
])
def test_validate_spec_rejects_with_clear_message(change: dict, needle: str) -> None:
    b = copy.deepcopy(body())
    b["spec"].update(change)
    with pytest.raises(jobs.InvalidSpec, match=needle):
        jobs.build_job(b, "img")


def test_label_value_bounded() -> None:
    assert jobs.label_value("short") == "short"
    v = jobs.label_value("x" * 100)
    assert len(v) <= 63 and v != jobs.label_value("x" * 99 + "y")


def test_operator_defaults_fill_only_empty_fields() -> None:
    defaults = {"job": {"resources": {"limits": {"nvidia.com/gpu": 2}}, "nodeSelector": {"gpu": "h100"},
                        "envFrom": [{"secretRef": {"name": "mlflow-creds"}}]},
                "registry": {"trackingUri": "http://mlflow.mlops:5000"}}
    spec = {"source": {"uri": "models:/m/1"}, "registry": {"modelName": "deploy"},
            "job": {"nodeSelector": {"pool": "mine"}}}
    out = jobs.with_defaults(spec, defaults)
    assert out["job"]["nodeSelector"] == {"pool": "mine"}  # the resource wins
    assert out["job"]["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert out["job"]["envFrom"] == [{"secretRef": {"name": "mlflow-creds"}}]
    assert out["registry"]["trackingUri"] == "http://mlflow.mlops:5000"
    assert spec["registry"] == {"modelName": "deploy"}  # pure
    # no registry asked for: the default URI does not create one
    assert "registry" not in jobs.with_defaults({"source": {"uri": "models:/m/1"}}, defaults)
    body = {"metadata": {"name": "x", "namespace": "ns", "uid": "u-1", "generation": 1}, "spec": spec}
    job = jobs.build_job(body, "img:1", defaults)
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["command"][c["command"].index("--tracking-uri") + 1] == "http://mlflow.mlops:5000"
    with pytest.raises(jobs.InvalidSpec, match="trackingUri"):
        jobs.build_job(body, "img:1", None)  # no URI anywhere: invalid


def test_job_defaults_setting_is_checked() -> None:
    from reparam.errors import InvalidInputError
    from reparam.operator import settings

    ok = settings.from_env({"REPARAM_JOB_DEFAULTS": '{"job": {"tolerations": [{"key": "gpu"}]}}'})
    assert ok.job_defaults == {"job": {"tolerations": [{"key": "gpu"}]}}
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        settings.from_env({"REPARAM_JOB_DEFAULTS": "{nope"})
    with pytest.raises(InvalidInputError, match="cannot be defaulted"):
        settings.from_env({"REPARAM_JOB_DEFAULTS": '{"job": {"image": "x"}}'})
