"""Scale bench of ModelConversionPolicy: P policies x V versions against the kmock emulator and a real MLflow.

Starts the emulator (tests/kube_env.py), an ``mlflow server`` (sqlite, webhooks allowed to loopback), the real
operator process, P policies (``select: {newest: true}``, one source model each) and then registers V versions of
every model with MlflowClient, as training scripts would. Reports, per path:

* ``webhook``: webhooks on, polling every hour: seconds from ``create_model_version`` returning to the
  ``ModelConversion`` existing (p50/p95/max);
* ``poll``: webhooks off, polling every ``--interval``: the same latency (about half the interval plus jitter);

then, idle, registry reads per minute (from the operator's ``reparam_policy_registry_reads_total``; each read is
two MLflow requests) and the operator's peak RSS (VmHWM).

    python bench/policy_scale.py [--policies 50] [--versions 20] [--interval 10s] [--idle 60] [--mode both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from kube_env import MC_RESOURCE, POLICY_PLURAL, KubeEnv  # noqa: E402
from operator_env import OperatorProcess, free_port, metric  # noqa: E402

SECRET = "bench-secret"


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_CACHE_TTL": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = open(root / "mlflow.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1):
                return proc, uri
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("mlflow server did not start")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_path(env: KubeEnv, client, uri: str, ns: str, policies: int, versions: int, interval: str,
             tag: str) -> list[float]:
    """Create the policies, register the versions, return the creation-to-ModelConversion latencies."""
    models = [f"{tag}-m{i:03d}" for i in range(policies)]
    for i, m in enumerate(models):
        client.create_registered_model(m)
        status, data = env.request("POST", f"/apis/reparam.dev/v1alpha1/namespaces/{ns}/{POLICY_PLURAL}", {
            "apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversionPolicy",
            "metadata": {"name": f"{tag}-p{i:03d}", "namespace": ns},
            "spec": {"source": {"registeredModel": m, "select": {"newest": True}, "trackingUri": uri},
                     "interval": interval, "historyLimit": versions + 1,
                     "template": {"registry": {"trackingUri": uri, "modelName": f"{m}-deploy"}}}})
        assert status in (200, 201), data
    time.sleep(3)  # every policy made its first (empty) read
    born: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = time.monotonic()
            for obj in env.objects(MC_RESOURCE, ns):
                seen.setdefault(obj["metadata"]["name"], now)
            time.sleep(0.05)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    for v in range(1, versions + 1):
        for i, m in enumerate(models):
            client.create_model_version(m, source=f"s3://bench/{m}/{v}/best.pt")
            born[f"{tag}-p{i:03d}-v{v}"] = time.monotonic()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not set(born) <= set(seen):
        time.sleep(0.2)
    stop.set()
    t.join()
    missing = set(born) - set(seen)
    if missing:
        print(f"  {tag}: {len(missing)} conversions never appeared, e.g. {sorted(missing)[:3]}")
    return [seen[n] - born[n] for n in born if n in seen]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", type=int, default=50)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--interval", default="10s", help="polling interval of the poll path")
    ap.add_argument("--idle", type=float, default=60, help="seconds of the idle measurement")
    ap.add_argument("--mode", choices=("webhook", "poll", "both"), default="both")
    args = ap.parse_args()

    from mlflow import MlflowClient

    from reparam.store.webhooks import register_webhook

    tmp = Path(tempfile.mkdtemp(prefix="reparam-policy-bench-"))
    env = KubeEnv().start()
    mlflow_proc, uri = start_mlflow(tmp)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    hook_port = free_port()
    ns = "bench"
    op = OperatorProcess(env.write_kubeconfig(tmp / "kubeconfig"), ns, tmp / "operator.log",
                         "--webhook-host", "127.0.0.1", "--webhook-port", str(hook_port),
                         env={"REPARAM_WEBHOOK_SECRET": SECRET}).start()
    try:
        print(f"{args.policies} policies x {args.versions} versions")
        results = {}
        if args.mode in ("webhook", "both"):
            register_webhook(f"http://127.0.0.1:{hook_port}/webhooks/mlflow", SECRET, "bench", uri)
            results["webhook"] = run_path(env, client, uri, ns, args.policies, args.versions, "1h", "wh")
        if args.mode in ("poll", "both"):
            for hook in client.list_webhooks():
                client.delete_webhook(hook.webhook_id)
            time.sleep(2)  # MLflow's webhook cache (TTL 1 s)
            results["poll"] = run_path(env, client, uri, ns, args.policies, args.versions, args.interval, "pl")
        for path, lat in results.items():
            if lat:
                print(f"  {path:8s} n={len(lat):5d}  p50 {pct(lat, 50):6.2f} s  p95 {pct(lat, 95):6.2f} s  "
                      f"max {max(lat):6.2f} s")
        before = metric(op.metrics(), "reparam_policy_registry_reads_total")
        time.sleep(args.idle)
        reads = metric(op.metrics(), "reparam_policy_registry_reads_total") - before
        print(f"  idle: {reads * 60 / args.idle:.1f} registry reads/min ({2 * reads * 60 / args.idle:.1f} MLflow "
              f"requests/min) for {len(results) * args.policies} policies")
        m = op.metrics()
        print(f"  deliveries: accepted {metric(m, 'reparam_webhook_deliveries_total', result='accepted'):.0f}, "
              f"ignored {metric(m, 'reparam_webhook_deliveries_total', result='ignored'):.0f}; poll errors "
              f"{metric(m, 'reparam_policy_poll_errors_total'):.0f}")
        print(f"  operator peak RSS {op.rss_bytes() / 2**20:.0f} MiB")
    finally:
        op.stop()
        mlflow_proc.terminate()
        mlflow_proc.wait(10)
        env.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
