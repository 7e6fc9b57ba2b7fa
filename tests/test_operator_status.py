"""Status transitions over plain dicts: conditions, phase, result, failures, generations."""

from __future__ import annotations

import datetime
import json

from reparam import summary
from reparam.operator import jobs, status as st

T0 = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
T1 = T0 + datetime.timedelta(minutes=5)
SPEC = {"source": {"uri": "models:/traffic-dual/7"},
        "registry": {"trackingUri": "http://m:5000", "modelName": "traffic-deploy", "aliases": ["champion"]}}


def job(gen: int = 1, **status) -> dict:
    return {"metadata": {"name": f"traffic-v7-g{gen}-abcdef", "uid": "job-uid",
                         "labels": {jobs.LABEL_GENERATION: str(gen), jobs.LABEL_UID: "mc-uid"}},
            "status": status}


def pod(exit_code: int, message: str | None, created: str = "2025-03-01T12:00:01Z") -> dict:
    term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
    if message is not None:
        term["message"] = message
    return {"metadata": {"creationTimestamp": created, "ownerReferences": [{"uid": "job-uid"}]},
            "status": {"containerStatuses": [{"name": "convert", "state": {"terminated": term}}]}}


COMPLETE = {"succeeded": 1, "startTime": "2025-03-01T12:00:00Z", "completionTime": "2025-03-01T12:04:00Z",
            "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}
FAILED_PFP = {"failed": 1, "conditions": [{"type": "FailureTarget", "status": "True"},
                                          {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                           "message": "Container convert exited with code 3"}]}
OK_SUMMARY = {"outcome": "succeeded", "exitCode": 0, "modelName": "traffic-deploy", "version": 4,
              "modelUri": "models:/traffic-deploy/4", "aliases": ["champion"], "deploySha256": "c" * 64,
              "paramsBefore": 2_128_720, "paramsAfter": 1_970_000, "maxAbsDiff": 6.1e-5,
              "bytesBefore": 6_142_019, "bytesAfter": 4_000_000}


def cond(s: dict, t: str) -> tuple[str, str]:
    c = st.get_condition(s, t)
    return (c["status"], c["reason"]) if c else ("-", "-")


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    c1 = st.set_condition(None, "Succeeded", "Unknown", "Pending", "m", T0, 1)
    c2 = st.set_condition(c1, "Succeeded", "Unknown", "Running", "m2", T1, 1)
    assert c2[0]["lastTransitionTime"] == "2025-03-01T12:00:00Z" and c2[0]["reason"] == "Running"
    c3 = st.set_condition(c2, "Succeeded", "True", "Succeeded", "ok", T1, 2)
    assert c3[0]["lastTransitionTime"] == "2025-03-01T12:05:00Z" and c3[0]["observedGeneration"] == 2
    c4 = st.set_condition(c3, "JobCreated", "True", "Created", "j", T1, 2)
    assert [c["type"] for c in c4] == ["JobCreated", "Succeeded"]  # fixed order, selected by type


def test_read_job_only_complete_and_failed_are_terminal() -> None:
    assert st.read_job(job()).state == "pending"
    assert st.read_job(job(active=1, ready=0)).state == "pending"
    assert st.read_job(job(active=1, ready=1)).state == "running"
    assert st.read_job(job(conditions=[{"type": "FailureTarget", "status": "True"}], active=1, ready=1)
                       ).state == "running"
    assert st.read_job(job(**COMPLETE)).state == "complete"
    v = st.read_job(job(**FAILED_PFP))
    assert (v.state, v.reason, v.attempts) == ("failed", "PodFailurePolicy", 1)


def test_queued_then_created_then_running() -> None:
    s = st.queued({}, 1, position=2, running=4, limit=4, now=T0)
    assert s["phase"] == "Queued" and cond(s, "JobCreated") == ("False", "ConcurrencyLimit")
    assert "position 2" in st.get_condition(s, "Succeeded")["message"]
    s = st.job_created(s, 1, "traffic-v7-g1-abcdef", T0)
    assert s["phase"] == "Pending" and s["job"]["name"] == "traffic-v7-g1-abcdef"
    assert cond(s, "JobCreated") == ("True", "Created")
    s = st.observe(s, SPEC, 1, job(active=1, ready=1), [], T1)
    assert s["phase"] == "Running" and cond(s, "Succeeded") == ("Unknown", "Running")


def test_success_fills_result_and_all_conditions() -> None:
    s = st.observe({}, SPEC, 1, job(**COMPLETE), [pod(0, summary.dumps(OK_SUMMARY))], T1)
    assert s["phase"] == "Succeeded" and s["observedGeneration"] == 1
    assert s["result"]["version"] == "4" and s["result"]["maxAbsDiff"] == 6.1e-5
    assert s["result"]["aliases"] == ["champion"] and s["result"]["paramsAfter"] == 1_970_000
    assert s["job"] == {"name": "traffic-v7-g1-abcdef", "attempts": 1, "startTime": "2025-03-01T12:00:00Z",
                        "completionTime": "2025-03-01T12:04:00Z"}
    for t, want in [("JobCreated", "True"), ("Converted", "True"), ("Validated", "True"),
                    ("Registered", "True"), ("Promoted", "True"), ("Succeeded", "True")]:
        assert cond(s, t)[0] == want, t
    assert st.outcome(s) == "succeeded" and "lastFailure" not in s


def test_success_without_requested_alias_is_not_promoted() -> None:
    res = dict(OK_SUMMARY, aliases=[])
    s = st.observe({}, SPEC, 1, job(**COMPLETE), [pod(0, json.dumps(res))], T1)
    assert cond(s, "Promoted") == ("False", "AliasesMissing")


def test_validation_failure() -> None:
    summ = {"outcome": "validation_failed", "exitCode": 3, "reason": "ValidationFailed",
            "message": "max |diff| 0.31 > atol 1e-12", "maxAbsDiff": 0.31, "paramsBefore": 10, "paramsAfter": 8}
    s = st.observe({}, SPEC, 1, job(**FAILED_PFP), [pod(3, summary.dumps(summ))], T1)
    assert s["phase"] == "Failed" and st.outcome(s) == "validation_failed"
    assert cond(s, "Converted") == ("True", "Converted")
    assert cond(s, "Validated") == ("False", "ValidationFailed")
    assert cond(s, "Registered") == ("False", "NotAttempted") and cond(s, "Promoted")[0] == "False"
    assert s["lastFailure"]["exitCode"] == 3 and "0.31" in s["lastFailure"]["message"]
    assert s["result"]["maxAbsDiff"] == 0.31 and "version" not in s["result"]


def test_failure_without_summary_uses_job_and_pod() -> None:
    failed = {"failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                           "message": "Job has reached the specified backoff limit"}]}
    # FallbackToLogsOnError: the message is a log tail, not a summary.
    s = st.observe({}, SPEC, 1, job(**failed), [pod(137, "Killed\n", "2025-03-01T12:00:01Z"),
                                                 pod(1, "Traceback ...", "2025-03-01T12:02:00Z")], T1)
    assert s["phase"] == "Failed" and st.outcome(s) == "failed"
    assert s["lastFailure"]["exitCode"] == 1 and s["lastFailure"]["reason"] == "InternalError"  # newest pod
    assert cond(s, "Converted") == ("False", "InternalError")
    s2 = st.observe({}, SPEC, 1, job(**failed), [], T1)
    assert s2["lastFailure"]["reason"] == "BackoffLimitExceeded" and "exitCode" not in s2["lastFailure"]


def test_registry_error_keeps_conversion_conditions() -> None:
    summ = {"outcome": "failed", "exitCode": 5, "reason": "RegistryError", "message": "mlflow unreachable"}
    s = st.observe({}, SPEC, 1, job(failed=1, conditions=[{"type": "Failed", "status": "True"}]),
                   [pod(5, summary.dumps(summ))], T1)
    assert cond(s, "Validated") == ("True", "WithinTolerance")
    assert cond(s, "Registered") == ("False", "RegistryError")


def test_terminal_is_final_for_its_generation_and_older_jobs_ignored() -> None:
    done = st.observe({}, SPEC, 1, job(**COMPLETE), [pod(0, summary.dumps(OK_SUMMARY))], T1)
    assert st.observe(done, SPEC, 1, job(active=1, ready=1), [], T1) is done
    assert st.queued(done, 1, 1, 1, 1, T1) is done
    # generation 2: the old Job's events change nothing, a new Job starts clean
    assert st.observe(done, SPEC, 2, job(gen=1, **COMPLETE), [], T1) is done
    s2 = st.job_created(done, 2, "traffic-v7-g2-abcdef", T1)
    assert s2["phase"] == "Pending" and s2["observedGeneration"] == 2
    # issue #12.7: the version in force (generation 1's result, Registered, Promoted) stays until generation 2 ends
    assert s2["result"]["version"] == "4" and s2["result"]["generation"] == 1
    assert cond(s2, "Converted") == ("-", "-") and cond(s2, "Registered") == ("True", "Registered")
    assert st.get_condition(s2, "Registered")["observedGeneration"] == 1


def test_invalid_spec() -> None:
    s = st.invalid({}, 3, "spec.source.uri 'x' is not ...", T0)
    assert s["phase"] == "Failed" and cond(s, "Succeeded") == ("False", "InvalidSpec")
    assert s["lastFailure"]["reason"] == "InvalidSpec" and s["observedGeneration"] == 3


def killed_pod(exit_code: int, reason: str, memory: str | None) -> dict:
    p = pod(exit_code, None)
    p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = reason
    limits = {"memory": memory} if memory else {}
    p["spec"] = {"containers": [{"name": "convert", "resources": {"limits": limits}}]}
    return p


def test_sigkill_without_oomkilled_reason_names_the_memory_limit() -> None:
    # the kubelet does not always say OOMKilled: exit 137 with reason Error is a SIGKILL, most often the memory limit
    s = st.observe({}, SPEC, 1, job(**FAILED_PFP), [killed_pod(137, "Error", "6Gi")], T1)
    assert s["lastFailure"]["reason"] == "Killed" and s["lastFailure"]["exitCode"] == 137
    assert s["lastFailure"]["message"].startswith(
        "the converter was killed by SIGKILL (exit 137), most often the memory limit (6Gi)")
    assert cond(s, "Succeeded") == ("False", "Killed") and cond(s, "Converted") == ("False", "Killed")


def test_termination_table() -> None:
    from reparam.operator import termination as tm
    oom = tm.explain(137, "OOMKilled", "8Gi")
    assert oom is not None and oom.reason == "OutOfMemory" and "(8Gi)" in oom.message
    unset = tm.explain(137, "Error", None)
    assert unset is not None and "none set on the container" in unset.message
    term = tm.explain(143, "Error", "1Gi")
    assert term is not None and term.reason == "Terminated"
    segv = tm.explain(139, "Error", None)
    assert segv is not None and segv.reason == "Crashed" and "SIGSEGV" in segv.message
    assert tm.explain(1, "Error", "1Gi") is None and tm.explain(3, "Error", None) is None  # the converter's own codes


def test_summary_wins_over_the_kill_table() -> None:
    # a converter that wrote its summary explained itself; its reason stays
    p = killed_pod(3, "Error", "6Gi")
    p["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(
        {"outcome": "validation_failed", "exitCode": 3, "reason": "ValidationFailed", "message": "diff 0.3"})
    s = st.observe({}, SPEC, 1, job(**FAILED_PFP), [p], T1)
    assert s["lastFailure"]["reason"] == "ValidationFailed"
