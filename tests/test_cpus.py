"""The converter's thread count follows the CPUs the process may use (affinity mask, cgroup v2/v1 quota)."""

from __future__ import annotations

import pytest
import torch

from reparam.converter import cpus


@pytest.mark.parametrize(
    "affinity, cpu_max, expected",
    [
        (8, None, 8),                   # no cgroup file: the affinity mask decides
        (8, "max 100000\n", 8),         # cgroup v2 without a quota
        (8, "200000 100000\n", 2),      # limits.cpu: 2
        (8, "150000 100000\n", 2),      # 1.5 CPUs: two threads share the quota
        (8, "50000 100000\n", 1),       # 500m: one thread, never zero
        (2, "400000 100000\n", 2),      # a quota above the affinity mask does not add CPUs
        (4, "garbage\n", 4),            # unreadable contents count as no quota
        (4, "abc 100000\n", 4),
        (0, None, 1),
    ],
)
def test_usable_cpus(affinity: int, cpu_max: str | None, expected: int) -> None:
    assert cpus.usable_cpus(affinity, cpu_max) == expected


def test_limit_threads_lowers_to_the_quota_and_never_raises(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    before = torch.get_num_threads()
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")
    monkeypatch.setattr(cpus, "CPU_MAX_FILES", (str(tmp_path / "absent"), str(quota)))
    try:
        assert cpus.available_cpus() == 1
        assert cpus.limit_threads() == 1 and torch.get_num_threads() == 1
        quota.write_text("max 100000\n")
        assert cpus.limit_threads() == 1  # a lower count already set (by the user or a quota) is kept
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("quota, period, expected", [
    ("150000\n", "100000\n", "150000 100000"),   # limits.cpu 1.5 on a cgroup v1 node
    ("-1\n", "100000\n", "max 100000"),           # v1 without a quota
])
def test_cgroup_v1_quota_is_read_when_there_is_no_cpu_max(monkeypatch: pytest.MonkeyPatch, tmp_path, quota: str,
                                                          period: str, expected: str) -> None:
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text(quota)
    (v1 / "cpu.cfs_period_us").write_text(period)
    monkeypatch.setattr(cpus, "CPU_MAX_FILES", (str(tmp_path / "absent-cpu.max"),))
    monkeypatch.setattr(cpus, "CFS_DIRS", (str(tmp_path / "cpu"), str(v1)))
    assert cpus._read_cpu_max() == expected
    assert cpus.usable_cpus(8, cpus._read_cpu_max()) == (2 if expected[0] != "m" else 8)
    monkeypatch.setattr(cpus, "CFS_DIRS", (str(tmp_path / "cpu"),))
    assert cpus._read_cpu_max() is None  # neither v2 nor v1: no quota


def test_onnx_check_sessions_use_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX export check's onnxruntime session runs as many threads as torch (limited to the usable CPUs), not
    onnxruntime's default of one per host core."""
    import onnx
    from onnx import TensorProto, helper

    from reparam.converter.export.onnx_graph import _session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        options = _session(model).get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    finally:
        torch.set_num_threads(old)
