"""TEMPORARY stand-in for ``reparam convert`` in the operator's end-to-end tests.

Used only while ``reparam.cli`` (the lead's converter) is not on this branch; see
``jobrunner.reparam_entrypoint``. After the merge the lead switches those tests to
the real CLI and the real MLflow fixture, and deletes this file.

It parses the same flags as the real command and writes a summary in the
:mod:`reparam.summary` contract to ``--termination-log``, exiting with the same
codes. Its "registry" is a JSON file named by ``$REPARAM_FAKE_REGISTRY``
(versions and aliases), so tests can check that a failed validation moves no
alias. Outcome: ``--atol`` below 1e-9 fails validation (exit 3, with the 6.1e-5
fused-model difference of the fixtures' README); a source URI containing
"missing" is a source error (exit 4); anything else succeeds.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reparam import exitcodes, summary  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="reparam")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("source")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--sha256")
    c.add_argument("--fuse", action="store_true")
    c.add_argument("--half", action="store_true")
    c.add_argument("--fp32", action="store_true")
    c.add_argument("--format", action="append", default=[])
    c.add_argument("--atol", type=float, default=1e-3)
    c.add_argument("--register")
    c.add_argument("--alias", action="append", default=[])
    c.add_argument("--tag", action="append", default=[])
    c.add_argument("--tracking-uri")
    c.add_argument("--termination-log")
    c.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    base = {"paramsBefore": 2_128_720, "paramsAfter": 1_970_000, "bytesBefore": 6_142_019}
    if "missing" in a.source:
        res = {"outcome": "failed", "exitCode": exitcodes.SOURCE_ERROR, "reason": "SourceError",
               "message": f"{a.source} does not exist"}
    elif a.atol < 1e-9:
        res = {"outcome": "validation_failed", "exitCode": exitcodes.VALIDATION_FAILED,
               "reason": "ValidationFailed", "maxAbsDiff": 6.1e-5,
               "message": f"max |diff| 6.1e-05 exceeds atol {a.atol:g}", **base}
    else:
        for fmt in a.format or ["pt"]:
            (out / f"model.{fmt}").write_bytes(b"deploy model placeholder\n")
        res = {"outcome": "succeeded", "exitCode": 0, "maxAbsDiff": 6.1e-5, "bytesAfter": 3_990_112,
               "deploySha256": "5" * 64, **base}
        if a.register:
            res.update(_register(a.register, a.alias, a.source))
    text = summary.dumps(res)
    if a.termination_log:
        Path(a.termination_log).write_text(text)
    if a.json:
        print(text)
    return int(res["exitCode"])


def _register(name: str, aliases: list[str], source: str) -> dict:
    path = Path(os.environ["REPARAM_FAKE_REGISTRY"])
    path.touch()
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        reg = json.loads(f.read() or "{}")
        model = reg.setdefault(name, {"versions": [], "aliases": {}})
        version = str(len(model["versions"]) + 1)
        model["versions"].append({"version": version, "source": source})
        for alias in aliases:
            model["aliases"][alias] = version
        f.seek(0)
        f.truncate()
        f.write(json.dumps(reg))
    return {"modelName": name, "version": version, "modelUri": f"models:/{name}/{version}", "aliases": aliases}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
