"""ModelConversionPolicy (issue #13): the pure rules (grammar, selection, names, webhook signatures, CRD) here;
the operator end to end against kmock + a real MLflow server in test_policy_e2e.py."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import yaml

import policy_crd
from reparam import spec as grammar
from reparam.operator import jobs, policy as pol, webhooks

MODEL = "traffic-dual"


def body(**spec_over) -> dict:
    spec = {"source": {"registeredModel": MODEL, "select": {"alias": "candidate"}}, "interval": "5m",
            "template": {"registry": {"trackingUri": "http://mlflow:5000", "modelName": "traffic-deploy"},
                         "promotion": {"alias": "champion", "maxRegression": 0.002},
                         "evaluation": {"data": "s3://ml-data/traffic-val/"}},
            "historyLimit": 3}
    spec.update(spec_over)
    return {"metadata": {"name": "traffic", "namespace": "vision", "uid": "u-1", "generation": 1}, "spec": spec}


def test_interval_and_selector_grammar() -> None:
    assert grammar.parse_interval("5m") == 300 and grammar.parse_interval("1h30m") == 5400
    assert grammar.parse_interval("1500ms") == 1.5
    for bad in ("5", "5 m", "-5m", "1d", "", "500ms", None):
        with pytest.raises(grammar.SpecError):
            grammar.parse_interval(bad)
    assert grammar.selector_problem({"alias": "candidate"}) is None
    assert grammar.selector_problem({"tag": {"stage": "trained"}}) is None
    assert grammar.selector_problem({"newest": True}) is None
    assert "exactly one" in grammar.selector_problem({"alias": "a", "newest": True})
    assert "exactly one" in grammar.selector_problem({"label": "x"})
    assert "reserved" in grammar.selector_problem({"alias": "latest"})
    assert "at least one" in grammar.selector_problem({"tag": {}})
    assert grammar.selector_problem({"newest": False}) == "select.newest must be true"


def test_parse_policy_reasons() -> None:
    p = pol.parse_policy(body())
    assert (p.model, p.selector.alias, p.interval_s, p.history_limit, p.min_version) == (MODEL, "candidate", 300, 3, 1)
    assert p.tracking_uri == "http://mlflow:5000"
    cases = {
        "InvalidSelector": body(source={"registeredModel": MODEL, "select": {"label": "x"}}),
        "InvalidInterval": body(interval="often"),
        "InvalidTemplate": body(template={"registry": {"trackingUri": "http://m", "modelName": "d"},
                                          "promotion": {"alias": "champion"}}),  # promotion without evaluation
        "InvalidSource": body(source={"registeredModel": "a/b", "select": {"newest": True}}),
        "InvalidHistoryLimit": body(historyLimit=-1),
    }
    for reason, b in cases.items():
        with pytest.raises(pol.InvalidPolicy) as exc:
            pol.parse_policy(b)
        assert exc.value.reason == reason, (reason, str(exc.value))
    with pytest.raises(pol.InvalidPolicy, match="spec.template: spec.promotion needs"):
        pol.parse_policy(cases["InvalidTemplate"])
    # no tracking URI anywhere: the operator's default is used, else refused
    t = body()["spec"]["template"]
    t["registry"].pop("trackingUri")
    assert pol.parse_policy(body(template=t), "https://mlflow.default").tracking_uri == "https://mlflow.default"
    with pytest.raises(pol.InvalidPolicy, match="trackingUri"):
        pol.parse_policy(body(template=t))


def versions() -> list[pol.SourceVersion]:
    return [pol.SourceVersion(1, "READY", (), {"stage": "trained"}),
            pol.SourceVersion(2, "READY", ("candidate",), {"stage": "trained"}),
            pol.SourceVersion(3, "PENDING_REGISTRATION", ("old",), {"stage": "trained"}),
            pol.SourceVersion(4, "READY", (), {"stage": "draft"}),
            pol.SourceVersion(5, "FAILED_REGISTRATION", (), {})]


def test_selection_ready_only_and_min_version() -> None:
    vs = versions()
    assert pol.select_versions(pol.parse_policy(body()), vs) == [2]
    newest = body(source={"registeredModel": MODEL, "select": {"newest": True}})
    assert pol.select_versions(pol.parse_policy(newest), vs) == [4, 2, 1]
    newest["spec"]["source"]["minVersion"] = 2
    assert pol.select_versions(pol.parse_policy(newest), vs) == [4, 2]
    tagged = body(source={"registeredModel": MODEL, "select": {"tag": {"stage": "trained"}}})
    assert pol.select_versions(pol.parse_policy(tagged), vs) == [2, 1]  # 3 is not READY
    # an alias on a version that is not READY selects nothing
    old = body(source={"registeredModel": MODEL, "select": {"alias": "old"}})
    assert pol.select_versions(pol.parse_policy(old), vs) == []


def test_conversion_names_labels_owner() -> None:
    assert pol.conversion_name("traffic", 7) == "traffic-v7"
    assert pol.conversion_name("traffic", 7) == pol.conversion_name("traffic", 7)
    long_a, long_b = "p" * 80 + "a", "p" * 80 + "b"
    na, nb = pol.conversion_name(long_a, 12345), pol.conversion_name(long_b, 12345)
    assert len(na) <= 63 and len(nb) <= 63 and na != nb and na.endswith("-v12345")
    p = pol.parse_policy(body())
    mc = pol.build_conversion(p, 7)
    assert mc["metadata"]["name"] == "traffic-v7" and mc["metadata"]["namespace"] == "vision"
    assert mc["metadata"]["labels"][pol.LABEL_SOURCE_MODEL] == MODEL
    assert mc["metadata"]["labels"][pol.LABEL_SOURCE_VERSION] == "7"
    assert mc["metadata"]["labels"][pol.LABEL_POLICY] == "traffic"
    (ref,) = mc["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("ModelConversionPolicy", "traffic", "u-1",
                                                                         True)
    assert mc["spec"]["source"] == {"uri": f"models:/{MODEL}/7"}
    assert mc["spec"]["promotion"] == {"alias": "champion", "maxRegression": 0.002}
    jobs.validate_spec(mc["spec"])
    # a registered-model name that is no label value is made one; the annotation keeps it whole
    spaced = pol.parse_policy(body(source={"registeredModel": "Traffic Dual (v2)", "select": {"newest": True}}))
    m2 = pol.build_conversion(spaced, 1)
    assert m2["metadata"]["labels"][pol.LABEL_SOURCE_MODEL] == "Traffic_Dual_v2"
    assert m2["metadata"]["annotations"][pol.ANNOTATION_SOURCE_MODEL] == "Traffic Dual (v2)"


def test_history_keeps_running_and_newest_finished() -> None:
    def obj(name: str, v: int, phase: str | None) -> dict:
        return {"metadata": {"name": name, "labels": {pol.LABEL_SOURCE_VERSION: str(v)}, "creationTimestamp": "t"},
                "status": {"phase": phase} if phase else {}}
    entries = pol.history([obj("p-v1", 1, "Succeeded"), obj("p-v3", 3, "Failed"), obj("p-v2", 2, "Succeeded"),
                           obj("p-v4", 4, "Running"), obj("p-v5", 5, None)])
    assert [e.version for e in entries] == [5, 4, 3, 2, 1]
    assert entries[0].phase == "Pending"
    assert [e.name for e in pol.expired(entries, 1)] == ["p-v2", "p-v1"]
    assert pol.expired(entries, 3) == [] and [e.name for e in pol.expired(entries, 0)] == ["p-v3", "p-v2", "p-v1"]


def test_webhook_signature_is_mlflows() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = '{"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}}'
    ours = webhooks.signature("s3cret", "d-1", "1700000000", payload.encode())
    assert ours == _generate_hmac_signature("s3cret", "d-1", "1700000000", payload)
    digest = hmac.new(b"s3cret", b"d-1.1700000000." + payload.encode(), hashlib.sha256).digest()
    assert ours == "v1," + base64.b64encode(digest).decode()


def test_webhook_verify_rules() -> None:
    seen = webhooks.SeenDeliveries(300)
    b = b'{"x": 1}'
    now = 1_700_000_000.0

    def headers(did: str, ts: int, secret: str = "k") -> dict:
        return {webhooks.HEADER_DELIVERY_ID: did, webhooks.HEADER_TIMESTAMP: str(ts),
                webhooks.HEADER_SIGNATURE: webhooks.signature(secret, did, str(ts), b)}
    assert webhooks.verify("k", headers("a", int(now)), b, now, 300, seen) is None
    assert webhooks.verify("k", headers("a", int(now)), b, now, 300, seen) == "replay"
    assert webhooks.verify("k", headers("b", int(now), secret="wrong"), b, now, 300, seen) == "bad_signature"
    assert webhooks.verify("k", {}, b, now, 300, seen) == "bad_signature"
    h = headers("c", int(now))
    assert webhooks.verify("k", h, b + b" ", now, 300, seen) == "bad_signature"  # body changed
    assert webhooks.verify("k", headers("d", int(now) - 301), b, now, 300, seen) == "stale"
    assert webhooks.verify("k", headers("e", int(now) + 301), b, now, 300, seen) == "stale"
    # a stale or forged delivery does not burn its id
    assert webhooks.verify("k", headers("d", int(now)), b, now, 300, seen) is None


def test_policy_crd_is_generated_from_the_conversion_crd() -> None:
    committed = policy_crd.POLICY_CRD.read_text()
    assert committed == policy_crd.render(), "run: python tests/policy_crd.py"
    crd = yaml.safe_load(committed)
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["mcpolicy"]
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols["LastSeen"] == ".status.lastSeenVersion" and cols["LastConversion"] == ".status.lastConversion"
    assert cols["Outcome"] == ".status.lastOutcome"
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    mc = yaml.safe_load(policy_crd.MC_CRD.read_text())
    mc_spec = mc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    template = props["template"]
    assert set(template["properties"]) == set(mc_spec["properties"]) - {"source"}
    for field in template["properties"]:
        assert template["properties"][field] == mc_spec["properties"][field], field
    assert template["x-kubernetes-validations"] == mc_spec["x-kubernetes-validations"]
    assert props["interval"]["pattern"] == grammar.INTERVAL_PATTERN
    assert props["source"]["properties"]["select"]["properties"]["alias"]["pattern"] == grammar.ALIAS_PATTERN


def test_crd_patterns_agree_with_the_grammar() -> None:
    import re2

    crd = yaml.safe_load(policy_crd.POLICY_CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    interval = re2.compile(spec["interval"]["pattern"])
    for text in ("5m", "1h30m", "30s", "1500ms", "5", "1d", "5 m", ""):
        ok = True
        try:
            grammar.parse_interval(text)
        except grammar.SpecError:
            ok = False
        # the CRD accepts every duration the operator does (it also lets 0s through: the operator refuses it)
        assert bool(interval.fullmatch(text)) == (ok or text in ("0s",)), text


def test_example_policy_matches_the_crd_and_the_operator() -> None:
    import jsonschema

    crd = yaml.safe_load(policy_crd.POLICY_CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    example = yaml.safe_load((policy_crd.ROOT / "examples" / "policy-traffic.yaml").read_text())
    jsonschema.Draft4Validator(schema).validate(example)
    p = pol.parse_policy({**example, "metadata": {**example["metadata"], "uid": "u"}})
    assert (p.model, p.selector.alias, p.interval_s) == ("traffic-dual", "candidate", 300)
    bad = yaml.safe_load((policy_crd.ROOT / "examples" / "policy-traffic.yaml").read_text())
    bad["spec"]["interval"] = "5 minutes"
    assert list(jsonschema.Draft4Validator(schema).iter_errors(bad))
