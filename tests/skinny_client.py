"""Run ``reparam`` as it runs with only ``mlflow-skinny`` installed: ``python skinny_client.py [--local-store] ARGS``.

The full ``mlflow`` package (installed for the test servers) adds, over ``mlflow-skinny``, the distributions in
:data:`FULL_ONLY` (their import names here; ``mlflow.server`` too, which needs them). A meta-path finder makes
all of them unimportable before reparam starts, so any code path that needs them fails as it would with the
skinny client. ``--local-store`` keeps ``sqlalchemy``/``alembic`` importable: the default local sqlite store
(``./mlruns/mlflow.db``) needs them, and the ``[converter]`` extra installs them next to ``mlflow-skinny``.

On exit it prints one line ``skinny-client: blocked=<n> loaded=<names>`` on stderr, naming any blocked module found
loaded anyway (there must be none).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.abc import MetaPathFinder

#: distribution -> import name of what ``mlflow`` requires beyond ``mlflow-skinny`` (numpy, cryptography and
#: mlflow-tracing excepted: the converter needs numpy itself, and the other two come with skinny's own deps)
FULL_ONLY = {
    "aiohttp": "aiohttp", "alembic": "alembic", "docker": "docker", "flask": "flask", "flask-cors": "flask_cors",
    "graphene": "graphene", "gunicorn": "gunicorn", "huey": "huey", "matplotlib": "matplotlib", "pandas": "pandas",
    "pyarrow": "pyarrow", "scikit-learn": "sklearn", "scipy": "scipy", "skops": "skops", "sqlalchemy": "sqlalchemy",
    "waitress": "waitress",
}
LOCAL_STORE = {"sqlalchemy", "alembic"}


class Blocker(MetaPathFinder):
    """Makes ``names`` (and their submodules) behave as not installed: ``import`` raises ModuleNotFoundError and
    ``importlib.util.find_spec`` returns ``None`` (how mlflow probes for optional packages such as sqlalchemy)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def blocked(self, name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in self.names)

    def find_spec(self, name, path=None, target=None):
        if self.blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed with mlflow-skinny; blocked by "
                                      "tests/skinny_client.py)", name=name)
        return None

    def install(self) -> None:
        sys.meta_path.insert(0, self)
        real = importlib.util.find_spec

        def find_spec(name, package=None):
            return None if self.blocked(name) else real(name, package)

        importlib.util.find_spec = find_spec


def main(argv: list[str]) -> int:
    local = argv[:1] == ["--local-store"]
    args = argv[1:] if local else argv
    blocked = (set(FULL_ONLY.values()) - (LOCAL_STORE if local else set())) | {"mlflow.server"}
    Blocker(blocked).install()
    try:
        importlib.import_module("pandas")  # proves the blocker works
    except ImportError:
        pass
    else:
        raise SystemExit("skinny-client: the blocker did not block pandas")
    from reparam.cli import main as reparam_main

    try:
        return reparam_main(args)
    finally:
        loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in blocked))
        print(f"skinny-client: blocked={len(blocked)} loaded={','.join(loaded) or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
