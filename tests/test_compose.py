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

from cli.coordinator import build_parser as coordinator_parser
from cli.volunteer import build_parser as volunteer_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"redis", "aggregator", "flower", "volunteer", "volunteer-gpu"}
STORE_SERVICES = {"objects", "objects-bucket"}  # the optional object store: profile "s3"
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
STORE_ENV = {
    **FAKE_ENV,
    "S3_ACCESS_KEY": "s3-access-key",
    "S3_SECRET_KEY": "s3-secret-key",
    "AWS_ENDPOINT_URL": "http://objects:8333",
    "CROWDTRAIN_BLOB_STORE": "s3://crowdtrain/runs",
    "CROWDTRAIN_BLOB_PUBLIC_URL": "http://coord.example.org:8333",
}


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
                # required, optional with an empty default (the s3 profile's keys), or withheld
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*|:-)\}|", str(value)), (
                    f"{name}: {key} must be a ${{VAR:?}} or an empty ${{VAR:-}}, never a default"
                )
    raw = COMPOSE.read_text()
    for secret in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "FLOWER_USER"):
        assert not re.search(r"\$\{" + secret + r":?-", raw), f"{secret} must not have a default"
    for secret in ("S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert not re.search(r"\$\{" + secret + r":?-[^}]", raw), f"{secret} must not have a default"
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


def test_the_file_interpolates_with_only_the_required_secrets():
    # Compose interpolates every service, in a profile or not, before it picks services:
    # a ${VAR:?} in the s3 profile would stop a plain `docker compose up`.
    for name, service in _compose()["services"].items():
        for text in _strings(service):
            try:
                substitute(text, FAKE_ENV)
            except AssertionError as e:
                pytest.fail(f"{name}: {e}: a plain `docker compose up` would stop here")


def test_the_object_store_runs_only_under_the_s3_profile():
    compose = _compose()
    services = compose["services"]
    assert set(services) >= STORE_SERVICES
    for name in STORE_SERVICES:
        assert services[name]["profiles"] == ["s3"], name
    for name, service in services.items():
        if name not in STORE_SERVICES:  # without the profile, nothing may need the store
            assert "s3" not in service.get("profiles", []), name
            assert not STORE_SERVICES & set(service.get("depends_on") or []), name
    objects = services["objects"]
    assert re.fullmatch(r"chrislusf/seaweedfs:\d+\.\d+", objects["image"])  # a pinned tag
    assert "objects-data:/data" in objects["volumes"] and "objects-data" in compose["volumes"]
    assert substitute(objects["ports"][0], {}) == "127.0.0.1:8333:8333"  # published on purpose only
    assert substitute(objects["ports"][0], {"S3_PUBLISH": "0.0.0.0:8333"}) == "0.0.0.0:8333:8333"
    argv = substitute(" ".join(_strings(objects["entrypoint"]) + _strings(objects["command"])), {})
    assert argv.startswith("/bin/sh -c ")
    assert "exec weed server " in argv and "-s3.port=8333" in argv and "-dir=/data" in argv
    assert "-s3.config=/etc/seaweedfs/s3.json" in argv and "> /etc/seaweedfs/s3.json" in argv
    assert "-s3.autoCreateBucket=false" in argv  # as on AWS: the bucket must exist
    bucket = services["objects-bucket"]
    assert bucket["restart"] == "no" and bucket["depends_on"] == ["objects"]
    assert bucket["image"] == services["aggregator"]["image"]  # crowdtrain's Python and boto3
    assert bucket["command"][:2] == ["python", "-c"]
    compile(substitute(bucket["command"][2], STORE_ENV), "objects-bucket", "exec")
    environment = {k: substitute(v, STORE_ENV) for k, v in bucket["environment"].items()}
    assert environment["AWS_ENDPOINT_URL"] == "http://objects:8333"
    assert environment["AWS_ACCESS_KEY_ID"] == "s3-access-key"
    assert environment["AWS_SECRET_ACCESS_KEY"] == "s3-secret-key"
    assert environment["S3_BUCKET"] == "crowdtrain"


def test_the_object_stores_keys_come_from_the_environment_never_from_the_file():
    services = _compose()["services"]
    objects = services["objects"]
    assert objects["environment"] == {
        "S3_ACCESS_KEY": "${S3_ACCESS_KEY:-}",
        "S3_SECRET_KEY": "${S3_SECRET_KEY:-}",
    }
    script = objects["command"][0]
    # The container's shell refuses to start without them ($$: for the shell, not compose) ...
    assert '"$${S3_ACCESS_KEY:?' in script and '"$${S3_SECRET_KEY:?' in script
    assert '"$$S3_ACCESS_KEY" "$$S3_SECRET_KEY" > /etc/seaweedfs/s3.json' in script
    # ... and compose never writes them onto a command line, where `docker inspect` shows it.
    for name in STORE_SERVICES:
        for text in _strings(services[name].get("command")):
            resolved = substitute(text, STORE_ENV)
            assert "s3-access-key" not in resolved and "s3-secret-key" not in resolved, name
    script = substitute(services["objects-bucket"]["command"][2], STORE_ENV)
    assert 'os.environ.get("AWS_SECRET_ACCESS_KEY")' in script  # refused without, at start


def test_the_aggregator_reaches_the_object_store_with_the_admin_environment():
    aggregator = _compose()["services"]["aggregator"]["environment"]
    environment = {k: substitute(v, STORE_ENV) for k, v in aggregator.items()}
    assert environment["AWS_ACCESS_KEY_ID"] == "s3-access-key"
    assert environment["AWS_SECRET_ACCESS_KEY"] == "s3-secret-key"
    assert environment["AWS_ENDPOINT_URL"] == "http://objects:8333"
    assert environment["AWS_DEFAULT_REGION"] == "us-east-1"
    assert environment["CROWDTRAIN_BLOB_STORE"] == "s3://crowdtrain/runs"
    assert environment["CROWDTRAIN_BLOB_PUBLIC_URL"] == "http://coord.example.org:8333"
    # Without the profile every store setting is empty, which crowdtrain and boto3 read as unset.
    environment = {k: substitute(v, FAKE_ENV) for k, v in aggregator.items()}
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert environment[key] == "", key
    assert environment["CROWDTRAIN_BLOB_STORE"] == environment["CROWDTRAIN_BLOB_PUBLIC_URL"] == ""


def test_no_object_store_keys_reach_volunteers_or_flower():
    # Volunteers read models and write uploads through presigned URLs; Flower never reads the store.
    services = _compose()["services"]
    untrusted = [*sorted(name for name in services if name.startswith("volunteer")), "flower"]
    assert {"volunteer", "volunteer-gpu", "flower"} <= set(untrusted)
    for name in untrusted:
        environment = services[name]["environment"]
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in environment and substitute(environment[key], STORE_ENV) == "", (name, key)
        texts = " ".join(substitute(text, STORE_ENV) for text in _strings(services[name]))
        assert "s3-access-key" not in texts and "s3-secret-key" not in texts, name


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


def test_the_image_holds_every_package_crowdtrain_installs():
    """pip installs what setuptools finds in the build context: a package not copied is missing."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert found is not None
    packages = [name.strip().strip('"').rstrip("*") for name in found.group(1).split(",")]
    assert len(packages) >= 6
    for package in packages:
        assert re.search(rf"^COPY {package} \./{package}$", dockerfile, re.M), f"the image lacks {package}/"


FAILOVER_SERVICES = {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}


def _script(service: dict[str, Any], env: dict[str, str]) -> str:
    """The shell script of a `sh -c` service command, as compose hands it to the container's shell."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"]
    return substitute(command[2], env)


def test_the_failover_profile_runs_one_replica_and_three_sentinels():
    services = _compose()["services"]
    assert set(services) >= FAILOVER_SERVICES
    for name in FAILOVER_SERVICES:
        assert services[name]["profiles"] == ["failover"], name
        assert services[name]["image"] == services["redis"]["image"], name  # Redis 7 everywhere
    for name, service in services.items():  # without the profile, nothing may need them
        if name not in FAILOVER_SERVICES:
            assert "failover" not in service.get("profiles", []), name
            assert not FAILOVER_SERVICES & set(service.get("depends_on") or []), name
    # each node and sentinel keeps its state in a volume of its own
    mounts = [v for name in ("redis", *sorted(FAILOVER_SERVICES)) for v in services[name]["volumes"]]
    assert len({m.split(":")[0] for m in mounts}) == len(mounts) == 5


def test_the_replica_runs_the_primarys_script_and_follows_it():
    services = _compose()["services"]
    primary, replica = services["redis"], services["redis-replica"]
    assert replica["command"] == primary["command"]  # the same ACL file handling and settings
    assert substitute(replica["environment"]["REDIS_REPLICA_OF"], FAKE_ENV) == "redis"
    assert substitute(primary["environment"]["REDIS_REPLICA_OF"], FAKE_ENV) == ""
    script = _script(primary, FAKE_ENV)
    # masterauth (each node may become a replica) goes into a config file, never onto a command line
    assert "printf 'masterauth %s\\nreplica-announce-ip %s\\n' \"$REDIS_PASSWORD\"" in script
    assert "exec redis-server /data/redis.conf " in script and "--aclfile /data/users.acl" in script
    assert 'echo "replicaof $REDIS_REPLICA_OF 6379"' in script
    assert "r-pw" not in script


def test_the_sentinels_watch_the_primary_with_a_quorum_of_two_and_log_in_as_the_admin():
    services = _compose()["services"]
    scripts = {name: _script(services[name], FAKE_ENV) for name in ("sentinel-1", "sentinel-2", "sentinel-3")}
    assert len(set(scripts.values())) == 1
    script = scripts["sentinel-1"]
    assert '"sentinel monitor $SENTINEL_MASTER redis 6379 2"' in script
    assert '"sentinel auth-pass $SENTINEL_MASTER $REDIS_PASSWORD"' in script
    assert "'sentinel resolve-hostnames yes'" in script  # `redis` is a service name, not an address
    assert "exec redis-server /data/sentinel.conf --sentinel" in script
    assert "r-pw" not in script  # the password reaches the config file from the environment
    environment = {k: substitute(v, FAKE_ENV) for k, v in services["sentinel-1"]["environment"].items()}
    assert environment == {"REDIS_PASSWORD": "r-pw", "SENTINEL_MASTER": "mymaster"}


def test_the_admin_url_can_name_the_sentinels_and_crowdtrain_reads_it():
    from broker.settings import Settings

    aggregator = _compose()["services"]["aggregator"]["environment"]
    sentinels = ";".join(f"sentinel://:r-pw@sentinel-{n}:26379/0" for n in (1, 2, 3))
    env = {**FAKE_ENV, "ADMIN_BROKER_URL": sentinels}
    url = substitute(aggregator["CROWDTRAIN_BROKER_URL"], env)
    master = substitute(aggregator["CROWDTRAIN_SENTINEL_MASTER"], env)
    address = Settings(broker_url=url, sentinel_master=master).sentinel
    assert address is not None and address.master == "mymaster" and address.password == "r-pw"
    assert address.sentinels == tuple((f"sentinel-{n}", 26379) for n in (1, 2, 3))
    # without ADMIN_BROKER_URL: the primary itself, as before
    assert substitute(aggregator["CROWDTRAIN_BROKER_URL"], FAKE_ENV) == "redis://:r-pw@redis:6379/0"


@pytest.mark.parametrize("service", ["redis", "sentinel-1"])
def test_the_shell_scripts_parse(service, tmp_path):
    import shutil
    import subprocess

    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no sh")
    script = tmp_path / "script.sh"
    script.write_text(_script(_compose()["services"][service], FAKE_ENV))
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
