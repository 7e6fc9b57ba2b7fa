"""Operator settings from the environment and flags."""

import pytest

from reparam.errors import InvalidInputError
from reparam.operator import settings


def test_env_then_flags() -> None:
    env = {"REPARAM_NAMESPACES": "vision, ml", "REPARAM_MAX_CONCURRENT": "3", "REPARAM_IMAGE": "img:1",
           "REPARAM_METRICS_PORT": "9999", "REPARAM_SCANNING": "false"}
    s = settings.parse([], env)
    assert s.namespaces == ("vision", "ml") and s.max_concurrent == 3 and s.image == "img:1"
    assert s.metrics_port == 9999 and s.scanning is False and s.clusterwide is False
    s2 = settings.parse(["-n", "other", "--max-concurrent", "7", "-A", "--liveness-port", "0"], env)
    assert s2.namespaces == ("other",) and s2.max_concurrent == 7 and s2.clusterwide and s2.liveness_port == 0
    assert s2.image == "img:1"


@pytest.mark.parametrize("env, needle", [
    ({"REPARAM_MAX_CONCURRENT": "zero"}, "REPARAM_MAX_CONCURRENT"),
    ({"REPARAM_MAX_CONCURRENT": "0"}, "at least 1"),
    ({"REPARAM_CLUSTERWIDE": "maybe"}, "REPARAM_CLUSTERWIDE"),
    ({"REPARAM_METRICS_PORT": "70000"}, "port"),
    ({"REPARAM_WEBHOOK_PORT": "9443"}, "REPARAM_WEBHOOK_SECRET is empty"),
    ({"REPARAM_WEBHOOK_PORT": "9443", "REPARAM_WEBHOOK_SECRET": "s", "REPARAM_WEBHOOK_TOLERANCE": "-1"},
     "tolerance must be positive"),
])
def test_bad_env_is_a_clear_error(env: dict, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        settings.from_env(env)


def test_webhook_settings_secret_only_from_the_environment() -> None:
    env = {"REPARAM_WEBHOOK_PORT": "9443", "REPARAM_WEBHOOK_SECRET": "s3cret"}
    s = settings.parse(["--webhook-port", "9000", "--webhook-tolerance", "60"], env)
    assert (s.webhook_port, s.webhook_secret, s.webhook_tolerance) == (9000, "s3cret", 60.0)
    assert "s3cret" not in repr(s)
    assert settings.from_env({}).webhook_port == 0  # off unless asked for
    with pytest.raises(SystemExit):
        settings.parse(["--webhook-secret", "x"], env)
