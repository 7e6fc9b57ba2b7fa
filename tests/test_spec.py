"""One grammar, four places: every example gives the same answer in the CRD (its ``openAPIV3Schema`` patterns
and enums evaluated with RE2, Kubernetes' regex engine, and its ``x-kubernetes-validations`` rules evaluated by a
real CEL implementation), the operator's validation, the CLI's parser and the promotion rule; and the committed
CRD says exactly what :mod:`reparam.spec` says."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cel
import jsonschema
import pytest
import re2
import yaml

from reparam import cli, spec
from reparam.errors import InvalidInputError, ReparamError
from reparam.operator import jobs
from reparam.store import promotion, sources
from reparam.store.uris import parse_source

ROOT = Path(__file__).resolve().parents[1]
CRD = yaml.safe_load((ROOT / "crds" / "modelconversion.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "conversion-models-version.yaml").read_text())
PROPS = SCHEMA["properties"]["spec"]["properties"]


def _re2_pattern(validator, pattern, instance, schema):
    """JSON-schema ``pattern`` with Kubernetes' semantics: Go's RE2, unanchored search."""
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# OpenAPI v3.0 (boolean exclusiveMinimum) is closest to JSON Schema draft 4; patterns as the API server runs them
K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


def _cel_errors(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    """Evaluate every ``x-kubernetes-validations`` rule of ``schema`` on ``value`` (``self``), recursively."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        if cel.evaluate(rule["rule"], {"self": value}) is not True:
            out.append(f"{where or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key) or (
                schema["additionalProperties"] if isinstance(schema.get("additionalProperties"), dict) else None)
            if sub:
                out += _cel_errors(sub, item, f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += _cel_errors(schema["items"], item, f"{where}[{i}]")
    return out


def crd_errors(obj: dict[str, Any]) -> list[str]:
    return [e.message for e in K8sValidator(SCHEMA).iter_errors(obj)] + _cel_errors(SCHEMA, obj)


# field -> how a value is put into a ModelConversion spec / onto the command line
def _put(field: str, value: str, s: dict[str, Any]) -> None:
    if field == "uri":
        s["source"]["uri"] = value
    elif field == "sha256":
        s["source"]["sha256"] = value
    elif field == "alias":
        s["registry"]["aliases"] = [value]
    elif field == "model_name":
        s["registry"]["modelName"] = value
    elif field == "tag_key":
        s["registry"]["tags"] = {value: "x"}
    elif field == "format":
        s["conversion"]["formats"] = [value]
    elif field == "precision":
        s["conversion"]["precision"] = value
    elif field == "device":
        s["conversion"]["device"] = value
    elif field == "head":
        s["conversion"]["head"] = value


def _argv(field: str, value: str) -> list[str]:
    base = ["convert", "models:/traffic-dual/7", "--register", "traffic-deploy"]
    if field == "uri":
        base[1] = value
    extra = {"sha256": ["--sha256", value], "alias": ["--alias", value], "model_name": ["--register", value],
             "tag_key": ["--tag", f"{value}=x"], "format": ["--format", value],
             "device": ["--device", value], "head": ["--head", value],
             # the Job passes the CRD's formats as --only: the CLI sees the example's formats too
             "precision": ["--precision", value,
                           *[a for f in EXAMPLE["spec"]["conversion"]["formats"] for a in ("--only", f)]],
             }.get(field, [])
    return base + extra


LONG = "a" * 255
# (field, value, accepted): the same answer is expected from the CRD, the operator, the CLI (and, for aliases,
# the promotion rule). MLflow's own answer is in the comment where ours is stricter.
CASES = [
    ("alias", "champion", True),
    ("alias", "prod-2", True),
    ("alias", "1prod", True),  # the old CRD refused a leading digit; MLflow accepts it
    ("alias", "_staging", True),
    ("alias", LONG, True),
    ("alias", LONG + "a", False),
    ("alias", "latest", False),
    ("alias", "Latest", False),  # the old CRD and operator let it through, MLflow refuses it
    ("alias", "LATEST", False),
    ("alias", "v3", False),
    ("alias", "V12", False),
    ("alias", "v", True),
    ("alias", "v3a", True),
    ("alias", "version3", True),
    ("alias", "latest2", True),
    ("alias", "has space", False),
    ("alias", "a/b", False),
    ("alias", "a.b", False),
    ("alias", "", False),
    ("alias", "champión", False),  # MLflow's \w is Unicode; ours is ASCII (spec module docstring)
    ("alias", "prod\n", False),  # Python's $ would match before the newline; RE2's does not
    ("model_name", "traffic-deploy", True),
    ("model_name", "Traffic Deploy (v2)", True),
    ("model_name", "team.model_v1", True),
    ("model_name", ".hidden", True),
    ("model_name", "a" * 256, True),
    ("model_name", "a" * 257, False),
    ("model_name", "a/b", False),
    ("model_name", "a:b", False),
    ("model_name", "a@b", False),
    ("model_name", ".", False),
    ("model_name", "..", False),
    ("model_name", "..x", False),
    ("model_name", " padded", False),
    ("model_name", "padded ", False),
    ("model_name", "", False),
    ("model_name", "modèle", False),
    ("model_name", "tab\tname", False),
    ("uri", "models:/traffic-dual/7", True),
    ("uri", "models:/traffic-dual/7/best.pt", True),  # documented for the CLI, refused by the old CRD
    ("uri", "models:/traffic-dual/7/weights/best.pt", True),
    ("uri", "models:/traffic-dual@champion", True),
    ("uri", "models:/traffic-dual@1prod/weights/best.pt", True),
    ("uri", "models:/Traffic Dual (v2)/3", True),
    ("uri", "models:/traffic-dual@latest", False),
    ("uri", "models:/traffic-dual@Latest/best.pt", False),
    ("uri", "models:/traffic-dual@v3", False),
    ("uri", "models:/traffic-dual/latest", False),
    ("uri", "models:/traffic-dual", False),
    ("uri", "models:/traffic-dual/7/", False),
    ("uri", "models:/traffic-dual/7//best.pt", False),
    ("uri", "models:/a:b/7", False),
    ("uri", "models:/..x/7", False),
    ("uri", "runs:/0123abcd/weights/best.pt", True),
    ("uri", "runs:/0123abcd/weights", True),
    ("uri", "runs:/0123abcd", False),
    ("uri", "runs:/0123abcd/", False),
    ("uri", "runs://weights/best.pt", False),
    ("uri", "runs:/0123abcd/weights/best.pt\n", False),
    ("uri", "s3://ml-ckpts/traffic/best.pt", True),
    ("uri", "S3://ml-ckpts/traffic/best.pt", True),
    ("uri", "s3://ml-ckpts/traffic/my best.pt", True),
    ("uri", "s3://bucket-only", False),
    ("uri", "s3://b/dir/", False),
    ("uri", "s3://key:secret@b/best.pt", False),
    ("uri", "gs://b/k.pt", False),
    ("uri", "", False),
    ("sha256", "ab" * 32, True),
    ("sha256", "AB" * 32, True),
    ("sha256", "ab" * 31, False),
    ("sha256", "zz" * 32, False),
    ("format", "pt", True),
    ("format", "safetensors", True),
    ("format", "onnx", True),
    ("format", "torchscript", True),
    ("format", "tflite", False),
    ("format", "PT", False),
    ("precision", "fp16", True),
    ("precision", "fp32", True),
    ("precision", "int8", False),
    ("precision", "FP16", False),
    ("precision", "weights=fp32", True),
    ("precision", "export=fp16", True),
    ("precision", "weights=fp32,export=fp16", True),
    ("precision", "export=fp16,weights=fp16", True),
    ("precision", "weights=fp16,weights=fp32", False),
    ("precision", "onnx=fp16", False),
    ("precision", "weights=fp16,", False),
    ("precision", "", False),
    ("device", "auto", True),
    ("device", "cpu", True),
    ("device", "cuda", True),  # accepted by the grammar; whether it exists is decided where torch runs
    ("device", "cuda:0", True),
    ("device", "cuda:15", True),
    ("device", "cuda:", False),
    ("device", "gpu", False),
    ("device", "CUDA", False),
    ("device", "mps", False),
    ("device", "cuda:0,1", False),
    ("device", "", False),
    ("head", "fine", True),
    ("head", "coarse", True),
    ("head", "main", False),  # DualDDetect's branch name: not a choice
    ("head", "Fine", False),
    ("head", "aux", False),
    ("head", "", False),
]

# Tag keys: the CRD leaves map keys to the operator (a CEL rule on keys of unbounded length would exceed the API
# server's cost budget), so these are checked in the operator and the CLI only.
TAG_CASES = [
    ("tag_key", "team", True),
    ("tag_key", "team/vision", True),
    ("tag_key", "a.b-c_d e:f", True),
    ("tag_key", ".hidden", True),
    ("tag_key", "t" * 250, True),
    ("tag_key", "t" * 251, False),
    ("tag_key", "", False),
    ("tag_key", "/abs", False),
    ("tag_key", "a//b", False),
    ("tag_key", "a/", False),
    ("tag_key", "a/./b", False),
    ("tag_key", "../up", False),
    ("tag_key", "a@b", False),
    ("tag_key", "équipe", False),
]

# Sources the CLI fetches but a Job in a cluster cannot: refused by the CRD and the operator, parsed by the CLI.
CLI_ONLY_URIS = ["./best.pt", "/data/best.pt", "file:///data/best.pt", "https://mlflow.example/get-artifact?path=x"]


class _Reached(ReparamError):
    exit_code = 99


@pytest.fixture
def cli_answer(monkeypatch):
    """Whether the real ``reparam convert`` accepts an argv: everything runs up to the download, which is
    replaced by a sentinel error (exit 99); a refusal is exit 2 with one line."""
    def reached(*_a, **_k):
        raise _Reached("reached the download")

    # _local_path: the existence check of a local source, which the CLI runs before importing torch
    for name in ("_local_path", "_fetch_local", "_fetch_s3", "_fetch_http", "_fetch_run", "_fetch_model"):
        monkeypatch.setattr(sources, name, reached)

    def answer(argv: list[str], capsys) -> bool:
        try:
            code = cli.main(argv)
        except SystemExit as done:  # argparse's own refusals (choices, unknown flags)
            code = done.code
        err = capsys.readouterr().err
        assert code in (99, 2), (code, err)
        if code == 2:
            assert err.startswith("reparam: error: ") and err.count("\n") == 1, err
        return code == 99

    return answer


def _operator_accepts(field: str, value: str) -> bool:
    s = copy.deepcopy(EXAMPLE["spec"])
    _put(field, value, s)
    try:
        jobs.validate_spec(s)
    except jobs.InvalidSpec:
        return False
    return True


def _crd_accepts(field: str, value: str) -> bool:
    obj = copy.deepcopy(EXAMPLE)
    _put(field, value, obj["spec"])
    return not crd_errors(obj)


@pytest.mark.parametrize("field, value, accepted", CASES, ids=[f"{f}={v[:24]!r}" for f, v, _ in CASES])
def test_same_answer_everywhere(field: str, value: str, accepted: bool, cli_answer, capsys) -> None:
    answers = {"crd": _crd_accepts(field, value), "operator": _operator_accepts(field, value),
               "cli": cli_answer(_argv(field, value), capsys)}
    if field == "alias":
        try:
            promotion.check_aliases([value])
            answers["promotion"] = True
        except InvalidInputError:
            answers["promotion"] = False
    assert answers == {k: accepted for k in answers}


@pytest.mark.parametrize("field, value, accepted", TAG_CASES, ids=[f"tag={v[:24]!r}" for _, v, _ in TAG_CASES])
def test_tag_keys_same_answer_in_operator_and_cli(field, value, accepted, cli_answer, capsys) -> None:
    assert {"operator": _operator_accepts(field, value), "cli": cli_answer(_argv(field, value), capsys),
            "spec": spec.tag_key_problem(value) is None} == {"operator": accepted, "cli": accepted, "spec": accepted}


@pytest.mark.parametrize("uri", CLI_ONLY_URIS)
def test_cluster_refuses_what_only_the_cli_can_fetch(uri: str, cli_answer, capsys) -> None:
    assert (_crd_accepts("uri", uri), _operator_accepts("uri", uri)) == (False, False)
    assert cli_answer(_argv("uri", uri), capsys) is True
    assert parse_source(uri).kind in ("local", "http")


def test_parsed_parts() -> None:
    ref = spec.parse_source_uri("models:/Traffic Dual (v2)@prod-2/weights/best.pt")
    assert (ref.model_name, ref.version, ref.alias, ref.path) == ("Traffic Dual (v2)", None, "prod-2",
                                                                  "weights/best.pt")
    ref = spec.parse_source_uri("S3://ml-ckpts/a b/best.pt#1")
    assert (ref.kind, ref.bucket, ref.key) == ("s3", "ml-ckpts", "a b/best.pt#1")


def test_reserved_alias_message_names_the_rule() -> None:
    with pytest.raises(InvalidInputError, match="reserved by MLflow"):
        promotion.check_aliases(["champion", "Latest"])
    assert promotion.check_aliases(["b", "a", "b"]) == ["b", "a"]


def test_crd_says_what_spec_says() -> None:
    """The committed CRD's patterns, enums, defaults and rules are the spec module's strings, field by field."""
    source, conv = PROPS["source"]["properties"], PROPS["conversion"]["properties"]
    reg = PROPS["registry"]["properties"]
    assert source["uri"]["pattern"] == spec.CLUSTER_SOURCE_URI_PATTERN
    assert [r["rule"] for r in source["uri"]["x-kubernetes-validations"]] == [spec.CLUSTER_SOURCE_URI_RULE]
    assert source["sha256"]["pattern"] == "^(?:" + spec.SHA256_PATTERN[1:-1] + ")?$"
    assert conv["precision"]["pattern"] == spec.PRECISION_PATTERN
    assert conv["precision"]["default"] == spec.DEFAULT_PRECISION
    assert (conv["device"]["pattern"], conv["device"]["default"]) == (spec.DEVICE_PATTERN, spec.DEFAULT_DEVICE)
    # --head: the same choices, and no default (a default would pass --head for every checkpoint, refused by all
    # heads but TripleDDetect)
    assert conv["head"]["enum"] == list(spec.TRIPLE_HEAD_BRANCHES) and "default" not in conv["head"]
    assert conv["formats"]["items"]["enum"] == list(spec.FORMATS)
    assert conv["formats"]["default"] == list(spec.OPERATOR_DEFAULT_FORMATS)
    assert conv["formats"]["maxItems"] == len(spec.FORMATS)
    assert reg["trackingUri"]["pattern"] == spec.TRACKING_URI_PATTERN
    assert reg["modelName"]["pattern"] == spec.MODEL_NAME_PATTERN
    assert reg["modelName"]["maxLength"] == spec.MODEL_NAME_MAX
    items = reg["aliases"]["items"]
    assert (items["pattern"], items["maxLength"]) == (spec.ALIAS_PATTERN, spec.ALIAS_MAX)
    assert [r["rule"] for r in items["x-kubernetes-validations"]] == [
        f"!self.matches('{spec.ALIAS_RESERVED_PATTERN}')"]
    assert reg["tags"]["additionalProperties"]["maxLength"] == spec.TAG_VALUE_MAX
    promo = PROPS["promotion"]["properties"]
    for field in ("alias", "holdAlias"):  # the gated aliases follow the alias grammar too
        assert (promo[field]["pattern"], promo[field]["maxLength"]) == (spec.ALIAS_PATTERN, spec.ALIAS_MAX)
        assert [r["rule"] for r in promo[field]["x-kubernetes-validations"]] == [
            f"!self.matches('{spec.ALIAS_RESERVED_PATTERN}')"]


def test_every_pattern_is_re2() -> None:
    """Kubernetes compiles CRD patterns and CEL regexes with RE2: no lookaround, and RE2 agrees with Python's re
    (fullmatch) on every table example."""
    patterns = [spec.ALIAS_PATTERN, spec.ALIAS_RESERVED_PATTERN, spec.MODEL_NAME_PATTERN, spec.TAG_KEY_PATTERN,
                spec.SHA256_PATTERN, spec.TRACKING_URI_PATTERN, spec.CLUSTER_SOURCE_URI_PATTERN,
                spec.PRECISION_PATTERN, spec.DEVICE_PATTERN]
    for p in patterns:
        re2.compile(p)  # raises on syntax RE2 lacks
    import re

    for _, value, _ in CASES + TAG_CASES:
        for p in patterns:
            assert (re2.search(p, value) is not None) == (re.fullmatch(p, value) is not None), (p, value)
