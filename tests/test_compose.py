"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

Every service command must be a real console script whose flags our own CLI
parsers accept, and no secret may be written into the files.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.cli import build_parser as coordinator_parser
from volunteer.cli import build_parser as volunteer_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"redis", "aggregator", "flower", "volunteer", "volunteer-gpu"}
PARSERS = {"coordinator": coordinator_parser, "volunteer": volunteer_parser}
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "PASS")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; innermost first
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^{}]*))?\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def substitute(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: unset variables take their default; ${VAR:?} must be set."""
    text = text.replace("$$", "\0")
    while True:
        match = _PLACEHOLDER.search(text)
        if match is None:
            return text.replace("\0", "$")
        name, op, arg = match.groups()
        value = env.get(name)
        if op in (":-", "-") and not value:
            value = arg
        elif op in (":?", "?") and not value:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        text = text[: match.start()] + (value or "") + text[match.end() :]


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


FAKE_ENV = {"REDIS_PASSWORD": "r-pw", "FLOWER_USER": "ops", "FLOWER_PASSWORD": "f-pw"}


def test_compose_has_the_five_services_of_the_design():
    assert set(_compose()["services"]) >= SERVICES


@pytest.mark.parametrize("service", sorted(SERVICES - {"redis"}))
def test_each_service_runs_a_real_entry_point_with_flags_its_parser_accepts(service):
    # arrange
    command = _compose()["services"][service]["command"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    argv = [substitute(part, FAKE_ENV) for part in command]
    # act
    assert argv[0] in scripts and argv[0] in PARSERS, f"{service}: {argv[0]} is not an entry point"
    try:
        args = PARSERS[argv[0]]().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{service}: `{' '.join(argv)}` is refused by the {argv[0]} CLI")
    # assert
    assert callable(args.handler)
    if service == "flower":  # inside a container: every interface, published on loopback
        assert args.command == "monitor" and args.address == "0.0.0.0"
    if service == "aggregator":
        assert args.metrics_port == 9100 and args.metrics_address == "0.0.0.0"
    if service.startswith("volunteer"):
        assert args.command == "start"
        assert args.device == ("cuda" if service == "volunteer-gpu" else "cpu")


def test_no_secret_is_written_into_the_compose_file():
    compose = _compose()
    for text in _strings(compose):
        for password in re.findall(r"://[^/@\s]*?:([^@/\s]+)@", text):
            assert password.startswith("${"), f"a password is written into a URL: {text!r}"
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if any(word in key.upper() for word in SECRET_WORDS) and not key.endswith("_URL"):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (
                    f"{name}: {key} must be a required ${{VAR:?}} with no default"
                )
    raw = COMPOSE.read_text()
    for secret in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "FLOWER_USER"):
        assert not re.search(r"\$\{" + secret + r":?-", raw), f"{secret} must not have a default"
    with pytest.raises(AssertionError, match="REDIS_PASSWORD"):
        substitute(compose["services"]["aggregator"]["environment"]["CROWDTRAIN_BROKER_URL"], {})


def test_redis_keeps_an_append_only_file_and_requires_the_admin_password():
    redis = _compose()["services"]["redis"]
    script = " ".join(redis["command"])
    assert "--appendonly yes" in script
    assert "user default on >$$REDIS_PASSWORD" in script  # the ACL file's admin password
    assert "nopass" not in script
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["image"].startswith("redis:7")  # volunteer ACLs need Redis 7
    assert substitute(redis["ports"][0], {}).startswith("127.0.0.1:")  # published on purpose only


def test_redis_refuses_writes_when_full_instead_of_evicting_model_versions():
    redis = _compose()["services"]["redis"]
    argv = substitute(" ".join(redis["command"]), {}).split()
    assert argv[argv.index("--maxmemory") + 1] == "4gb"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    argv = substitute(" ".join(redis["command"]), {"REDIS_MAXMEMORY": "16gb"}).split()
    assert argv[argv.index("--maxmemory") + 1] == "16gb"


def test_flowers_login_is_in_its_environment_never_on_a_command_line():
    compose = _compose()
    flower = compose["services"]["flower"]
    assert substitute(flower["environment"]["FLOWER_BASIC_AUTH"], FAKE_ENV) == "ops:f-pw"
    assert substitute(flower["environment"]["CROWDTRAIN_BROKER_URL"], FAKE_ENV).startswith("redis://")
    for name, service in compose["services"].items():
        command = " ".join(_strings(service.get("command")))
        assert "basic-auth" not in command and "FLOWER_PASSWORD" not in command, name
    with pytest.raises(AssertionError, match="FLOWER_PASSWORD"):
        substitute(flower["environment"]["FLOWER_BASIC_AUTH"], {"FLOWER_USER": "ops"})


def test_the_gpu_volunteer_reserves_an_nvidia_device():
    service = _compose()["services"]["volunteer-gpu"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_the_dockerfile_pins_versions_and_drops_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "-c constraints.txt" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), re.M)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".crowdtrain", ".env"} <= set(ignored)
