"""Scale bench of the operator: N ModelConversions against the kmock emulator.

Starts the emulator (tests/kube_env.py) and the test Job runner with an executor
that exits 0 at once, runs the real operator process (``python -m reparam.operator``),
creates N resources and reports: seconds until all are Succeeded, reconciles per
second (all handler invocations from the operator's own /metrics), and the
operator's peak RSS (VmHWM).

    python bench/operator_scale.py [-n 1000] [--max-concurrent 100] [--timeout 900]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from jobrunner import JobRunner, instant_success  # noqa: E402
from kube_env import MC_RESOURCE, KubeEnv, mc_path  # noqa: E402
from operator_env import OperatorProcess  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--max-concurrent", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--namespace", default="bench")
    ap.add_argument("--backlog", action="store_true",
                    help="create all resources before the operator starts (measures its catch-up rate)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="reparam-bench-"))
    env = KubeEnv().start()
    runner = JobRunner(env, instant_success, namespace=args.namespace, poll=0.1).start()
    op = OperatorProcess(env.write_kubeconfig(tmp / "kubeconfig"), args.namespace, tmp / "operator.log",
                         "--max-concurrent", str(args.max_concurrent))
    if not args.backlog:
        op.start()
    ns = args.namespace
    try:
        t0 = time.monotonic()
        for i in range(args.n):
            status, data = env.request("POST", mc_path(ns), {
                "apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
                "metadata": {"name": f"conv-{i:05d}", "namespace": ns},
                "spec": {"source": {"uri": f"models:/bench-dual/{i + 1}"},
                         "registry": {"trackingUri": "http://mlflow:5000", "modelName": "bench-deploy"}}})
            assert status in (200, 201), data
        t_created = time.monotonic() - t0
        if args.backlog:
            t0 = time.monotonic()
            op.start()

        def count() -> tuple[int, int]:
            objs = env.objects(MC_RESOURCE, ns)
            done = sum(1 for o in objs if (o.get("status") or {}).get("phase") == "Succeeded")
            failed = sum(1 for o in objs if (o.get("status") or {}).get("phase") == "Failed")
            return done, failed

        done = failed = 0
        last_report = 0.0
        while time.monotonic() - t0 < args.timeout:
            done, failed = count()
            if done + failed >= args.n:
                break
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                print(f"  t={time.monotonic() - t0:6.1f}s succeeded={done} failed={failed}", flush=True)
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        m = op.metrics()
        reconciles = sum(v for (name, _), v in m.items() if name == "reparam_operator_reconcile_total")
        by_handler: dict[str, float] = {}
        for (name, labels), v in m.items():
            if name == "reparam_operator_reconcile_total":
                h = dict(labels)["handler"]
                by_handler[h] = by_handler.get(h, 0) + v
        rss = op.rss_bytes()
        print(f"resources: {args.n} (max concurrent {args.max_concurrent}); created in {t_created:.1f}s"
              + (", before the operator started (times from its start)" if args.backlog else ""))
        print(f"succeeded: {done}, failed: {failed}, in {elapsed:.1f}s "
              f"({done / elapsed:.1f} conversions/s)")
        print(f"handler invocations: {int(reconciles)} ({reconciles / elapsed:.1f}/s) by handler "
              + ", ".join(f"{k}={int(v)}" for k, v in sorted(by_handler.items())))
        print(f"operator peak RSS: {rss / 2**20:.1f} MiB; job runner pods: {runner.pods_created}; "
              f"runner errors: {len(runner.errors)}")
        return 0 if done == args.n else 1
    finally:
        if op.proc is not None:
            op.stop()
        runner.stop()
        env.stop()


if __name__ == "__main__":
    sys.exit(main())
