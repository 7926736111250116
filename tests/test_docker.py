"""docker/: the images and the compose file of the distributed deployment, checked without a Docker engine (none
runs on these machines): hadolint on every Dockerfile, the compose file against the Compose specification
(check-jsonschema's vendored compose-spec schema), each service's command against its image, the images'
requirements against the locks, the compose settings against what `pruneflow airflow up --executor celery`
writes, the legacy NCS2 worker's Python 3.10 code, and the OpenVINO 2022.3 adapter.

The 2022.3 adapter is tested through its pure mapping functions and a small fake ``Core`` of the 2022.3 API
only: OpenVINO 2022.3 (the last release with the MYRIAD plugin) has no build for Python 3.11, so it cannot
be installed here; the fake's property lists are those the real 2022.3.2 CPU plugin reports. The current
(2026) path is the real OpenVINO of this environment, never a mock.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pruneflow import airflow_cli, services
from pruneflow.bench import ov_api
from pruneflow.bench.backends import _build_config
from pruneflow.bench.settings import BenchmarkOptions, device_names
from pruneflow.bench_targets import bench_targets, route

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
NCS2_LOCK = DOCKER / "requirements-ncs2.lock"
#: each image and the lock it installs
IMAGE_LOCKS = {"Dockerfile": "requirements.lock", "Dockerfile.bench": "requirements-bench.lock",
               "Dockerfile.ncs2": "docker/requirements-ncs2.lock"}
#: pruneflow.services.SECRET_KEYS -> the .env variable that carries each in the compose deployment
SECRET_ENV = {"redis_password": "REDIS_PASSWORD", "postgres_password": "POSTGRES_PASSWORD",
              "jwt_secret": "AIRFLOW_JWT_SECRET", "fernet_key": "AIRFLOW_FERNET_KEY", "secret_key": "AIRFLOW_SECRET_KEY"}
#: airflow.cfg keys that differ on purpose between `pruneflow airflow init --executor celery` and compose, and why
DIFFERENT = {
    ("core", "dags_folder"): "the image's copy of the repository",
    ("core", "plugins_folder"): "the image's copy of the repository",
    ("core", "simple_auth_manager_passwords_file"): "the airflow-auth volume",
    ("core", "execution_api_server_url"): "the api-server service by name",
    ("core", "fernet_key"): "a secret: from docker/.env",
    ("api", "host"): "listens on the container's network, published on the host port",
    ("api", "base_url"): "the published host port",
    ("api", "secret_key"): "a secret: from docker/.env",
    ("api_auth", "jwt_secret"): "a secret: from docker/.env",
    ("api_auth", "jwt_issuer"): "generated per install by init; one fixed name per compose install",
    ("logging", "base_log_folder"): "the airflow-logs volume",
    ("pruneflow", "dataset_cache"): "a folder of the container",
    ("pruneflow", "devices"): "every device a profile can add (a pool each); superset checked below",
    ("pruneflow", "bench_python"): "each image has its one interpreter",
    ("database", "sql_alchemy_conn"): "the postgres service; same URL form, checked below",
    ("celery", "broker_url"): "the redis service; same URL form, checked below",
    ("celery", "result_backend"): "the postgres service; same URL form, checked below",
}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _rendered_celery_cfg(tmp_path) -> dict[tuple[str, str], str]:
    """What `pruneflow airflow init --executor celery` writes into airflow.cfg (dummy secrets and ports)."""
    (tmp_path / services.SECRETS_FILE).write_text(json.dumps({k: f"secret-{k}" for k in services.SECRET_KEYS}))
    (tmp_path / "services.json").write_text(json.dumps({"redis": 6379, "postgres": 5432}))
    text = airflow_cli.render_config(airflow_cli.Home(tmp_path), 8080, "127.0.0.1", "celery")
    import configparser

    parser = configparser.RawConfigParser(strict=False)
    parser.read_string(text)
    return {(s, k): v for s in parser.sections() for k, v in parser.items(s)}


def _compose_cfg(env: dict) -> dict[tuple[str, str], str]:
    out = {}
    for key, value in env.items():
        m = re.fullmatch(r"AIRFLOW__([A-Z_]+?)__([A-Z_]+)", key)
        if m:
            out[(m.group(1).lower(), m.group(2).lower())] = str(value)
    return out


# ------------------------------------------------------------------------------------------- hadolint

def test_every_dockerfile_passes_hadolint_and_each_ignore_is_explained_and_needed():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.bench", "Dockerfile.ncs2"]
    hadolint = BIN / "hadolint"
    proc = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        ignored = set()
        for i, line in enumerate(lines):
            m = re.match(r"#\s*hadolint ignore=(\S+)", line)
            if m:
                rules = m.group(1).split(",")
                ignored |= set(rules)
                above = "\n".join(lines[max(0, i - 3):i])
                for rule in rules:
                    assert f"# {rule}:" in above, f"{path.name}:{i + 1}: ignore of {rule} without a '# {rule}: why' above"
        # every ignore is needed: without the pragmas hadolint reports exactly the ignored rules
        raw = subprocess.run([str(hadolint), "--disable-ignore-pragma", "--no-fail", "-f", "json", str(path)],
                             capture_output=True, text=True)
        assert {f["code"] for f in json.loads(raw.stdout or "[]")} == ignored, path.name


# ------------------------------------------------------------------------------------------- compose spec

def test_compose_file_validates_against_the_compose_specification(tmp_path):
    check = [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    ok = subprocess.run([*check, str(COMPOSE)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the check can fail: an unknown service key is refused
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    command: [\"airflow\", \"scheduler\"]",
                                               "    comand: [\"airflow\", \"scheduler\"]"))
    assert bad.read_text() != COMPOSE.read_text()
    assert subprocess.run([*check, str(bad)], capture_output=True, text=True).returncode != 0


def test_compose_services_volumes_profiles_and_health():
    c = _compose()
    svc = c["services"]
    assert {"postgres", "redis", "s3", "init", "api-server", "scheduler", "dag-processor", "triggerer",
            "training-worker", "bench-cpu0", "bench-gpu0", "bench-npu0", "bench-ncs2"} == set(svc)
    assert {n: s.get("profiles") for n, s in svc.items() if s.get("profiles")} == {
        "bench-gpu0": ["gpu"], "bench-npu0": ["npu"], "bench-ncs2": ["ncs2"]}
    for name, s in svc.items():
        if name != "init":
            assert s.get("restart") == "unless-stopped", name
            assert s.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for vol in s.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith(("/", "./")) or source in c["volumes"], f"{name}: volume {source} is not declared"
        for dep in s.get("depends_on", {}):
            assert dep in svc, f"{name} depends on unknown {dep}"
    assert svc["init"]["restart"] == "no"
    assert svc["scheduler"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    ncs2 = svc["bench-ncs2"]
    assert ncs2["devices"] == ["/dev/bus/usb:/dev/bus/usb"] and ncs2["device_cgroup_rules"] == ["c 189:* rmw"]
    assert svc["bench-gpu0"]["devices"] == ["/dev/dri:/dev/dri"]
    assert svc["bench-npu0"]["devices"] == ["/dev/accel:/dev/accel"]
    assert "container_name" not in svc["training-worker"] and "ports" not in svc["training-worker"]  # --scale works


def test_every_secret_comes_from_the_env_file_and_the_example_holds_no_value():
    text = COMPOSE.read_text()
    example = _env_example()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text.replace("$${", "")))
    assert used <= set(example), f"variables missing from docker/.env.example: {sorted(used - set(example))}"
    assert set(SECRET_ENV) == set(services.SECRET_KEYS)
    secrets_ = set(SECRET_ENV.values()) | {"AIRFLOW_ADMIN_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in secrets_:
        assert example.get(name) == "", f"docker/.env.example must leave {name} empty"
        refs = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert refs and all(r.startswith(":?") for r in refs), f"{name} must be required (${{{name}:?...}})"
    # no literal secret: nothing that looks like a key sits in the compose file
    assert not re.search(r"\b[A-Z_]*(PASSWORD|SECRET|_KEY|_AUTH): (?!\$\{)\S", text)
    assert re.search(r"\b[A-Z_]*(PASSWORD|SECRET|_KEY|_AUTH): (?!\$\{)\S", "  REDISCLI_AUTH: hunter2")
    assert "docker/.env" in (REPO / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------------------ same settings as airflow up

def test_compose_settings_agree_with_pruneflow_airflow_up_celery(tmp_path):
    rendered = _rendered_celery_cfg(tmp_path)
    env = _compose()["x-airflow-env"]
    ours = _compose_cfg(env)
    missing = sorted(set(rendered) - set(ours) - set(DIFFERENT))
    assert not missing, f"settings of `pruneflow airflow up --executor celery` not in compose: {missing}"
    extra = sorted(set(ours) - set(rendered))
    assert not extra, f"compose sets what airflow up does not: {extra}"
    for key, value in rendered.items():
        if key not in DIFFERENT:
            assert ours[key] == value, f"[{key[0]}] {key[1]}: compose {ours[key]!r}, airflow up {value!r}"
    assert ours[("core", "executor")] == airflow_cli.EXECUTORS["celery"]
    assert ours[("pruneflow", "bench_preload")] == airflow_cli.BENCH_PRELOAD
    # URL forms: the same scheme, user, database and no password in the database URLs
    def shape(url: str) -> str:
        return re.sub(r"@[^/]+/", "@HOST/", re.sub(r"://:[^@]*@", "://:PW@", url))
    for key in (("database", "sql_alchemy_conn"), ("celery", "result_backend"), ("celery", "broker_url")):
        assert shape(ours[key].replace("${REDIS_PASSWORD:?set REDIS_PASSWORD in docker/.env}", "x")) == shape(rendered[key])
    assert shape(env["PRUNEFLOW_DB"]) == shape(services.Services(tmp_path).pg_url(services.RESULTS_DB))
    devices = ours[("pruneflow", "devices")].split(",")
    assert set(rendered[("pruneflow", "devices")].split(",")) <= set(devices)
    assert f"bench_{devices[0]}" == ours[("pruneflow", "benchmark_queue")] == rendered[("pruneflow", "benchmark_queue")]


def test_compose_workers_run_what_airflow_up_runs(tmp_path):
    _rendered_celery_cfg(tmp_path)
    home = airflow_cli.Home(tmp_path)
    home.cfg.write_text(airflow_cli.render_config(home, 8080, "127.0.0.1", "celery").replace(
        "devices = cpu0", "devices = cpu0,gpu0,npu0,ncs2"))
    svc = _compose()["services"]
    compose_devices = _compose()["x-airflow-env"]["AIRFLOW__PRUNEFLOW__DEVICES"].split(",")
    assert airflow_cli.devices(home) == compose_devices
    workers = airflow_cli.workers(home)
    by_queue = {s["environment"]["QUEUE"]: (n, s) for n, s in svc.items() if "QUEUE" in s.get("environment", {})}
    assert set(by_queue) == {w.queue for w in workers}
    for w in workers:
        name, s = by_queue[w.queue]
        expected = airflow_cli._worker_args(home, w)
        assert expected[1:3] == ["-m", "airflow"]
        expected = expected[3:]  # `<python> -m airflow` -> the subcommand and its options
        i = expected.index("--pid")
        expected = expected[:i] + expected[i + 2:]  # a container needs no pid file
        got = s["command"]
        got = got[3:] if got[:3] == ["python", "-m", "airflow"] else got[1:] if got[0] == "airflow" else got
        assert got == expected, (name, got, expected)
        if w.serve_logs:
            assert s["environment"]["AIRFLOW__PRUNEFLOW__PRELOAD"] == _compose()["x-airflow-env"]["AIRFLOW__PRUNEFLOW__PRELOAD"]
        else:
            assert s["environment"]["AIRFLOW__PRUNEFLOW__PRELOAD"] == airflow_cli._worker_env(home, w)["AIRFLOW__PRUNEFLOW__PRELOAD"]
    # every device gets its pool from the init service, as `init` creates bench_<device>
    init = (DOCKER / "init.sh").read_text()
    assert 'airflow pools set "bench_${device}" 1' in init and "AIRFLOW__PRUNEFLOW__DEVICES" in init


# ------------------------------------------------------------------------------------ commands in images

def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _image_of(service: dict) -> str:
    return Path(service["build"]["dockerfile"]).name if "build" in service else service["image"]


#: third-party images and the executables their commands and health checks use (from each image's docs)
THIRD_PARTY = {"postgres:15-bookworm": {"pg_isready"}, "redis:7.0-bookworm": {"sh", "redis-server", "redis-cli"},
               "chrislusf/seaweedfs:4.48": {"sh", "weed", "wget"}}


def _executables(cmd: list[str]) -> set[str]:
    """The programs a command runs: its first word, and in `sh -c SCRIPT` each command of the script."""
    if cmd[:2] != ["sh", "-c"]:
        return {cmd[0]}
    found = {"sh"}
    for part in re.split(r"&&|\|\||;|\|", cmd[2]):
        words = [w for w in shlex.split(part) if w != "exec"]
        if words and words[0] not in ("printf", "echo"):  # shell builtins
            found.add(words[0])
    return found


def test_every_command_exists_in_its_image():
    from airflow.cli.cli_parser import get_parser

    parser = get_parser()
    c = _compose()
    for name, s in c["services"].items():
        image = _image_of(s)
        commands = [s.get("command")] if isinstance(s.get("command"), list) else []
        test = s.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            commands.append(test[1:])
        elif test[:1] == ["CMD-SHELL"]:
            commands.append(shlex.split(test[1]))
        if image in THIRD_PARTY:
            entry = s.get("entrypoint", [])
            if entry:
                commands[0] = entry + commands[0]
            for cmd in commands:
                assert _executables(cmd) <= THIRD_PARTY[image], (name, cmd)
            continue
        assert image in IMAGE_LOCKS, (name, image)
        lock = _lock(REPO / IMAGE_LOCKS[image])
        dockerfile = _dockerfile(image)
        for cmd in commands:
            if cmd[0] == "pruneflow-init":
                assert "COPY docker/init.sh /usr/local/bin/pruneflow-init" in dockerfile
                assert (DOCKER / "init.sh").stat().st_mode & 0o111
            elif cmd[0] == "celery":
                assert "celery" in lock, (name, image)
                assert cmd[1:3] == ["--app", "airflow.providers.celery.executors.celery_executor.app"]
            elif cmd[:2] == ["python", "-c"]:
                ast.parse(cmd[2])  # the image's interpreter, valid code
            else:
                argv = cmd[3:] if cmd[:3] == ["python", "-m", "airflow"] else cmd[1:]
                assert cmd[0] == "airflow" or cmd[:3] == ["python", "-m", "airflow"], (name, cmd)
                assert "apache-airflow-core" in lock
                if argv[:2] == ["celery", "worker"]:
                    assert "apache-airflow-providers-celery" in lock
                try:
                    parser.parse_args(argv)
                except SystemExit as exc:  # argparse refuses an unknown command or option
                    pytest.fail(f"{name}: `airflow {' '.join(argv)}` is not an Airflow command ({exc.code})")
        # the image's default command is a worker of the right queue too
        m = re.search(r'^CMD (\[.*\])$', dockerfile, re.M)
        assert m, image
    with pytest.raises(SystemExit):
        parser.parse_args(["celery", "worker", "--no-such-option"])


# ---------------------------------------------------------------------------------- requirements vs locks

def test_each_image_installs_its_lock_and_the_ncs2_lock_differs_only_where_declared():
    for image, lock in IMAGE_LOCKS.items():
        text = _dockerfile(image)
        assert f"COPY {lock} ./" in text, image
        assert f"pip install --no-deps -r {Path(lock).name}" in text and "pip check" in text, image
    assert "torch==${TORCH_VERSION}+cpu" in _dockerfile("Dockerfile")
    assert re.search(r"ARG TORCH_VERSION=(\S+)", _dockerfile("Dockerfile")).group(1) == _lock(REPO / "requirements.lock")["torch"]
    bench, ncs2 = _lock(REPO / "requirements-bench.lock"), _lock(NCS2_LOCK)
    main = _lock(REPO / "requirements.lock")
    assert all(main.get(k) == v for k, v in bench.items()), "requirements-bench.lock disagrees with requirements.lock"
    assert "torch" not in ncs2 and "openvino" not in ncs2
    declared = {}
    for line in NCS2_LOCK.read_text().splitlines():
        m = re.match(r"# py310-(pins|adds|drops): (.*)", line)
        if m:
            declared[m.group(1)] = {re.sub(r"[-_.]+", "-", n.strip()).lower() for n in m.group(2).split(",")}
    assert {k for k in ncs2 if k in bench and ncs2[k] != bench[k]} == declared["pins"]
    assert set(ncs2) - set(bench) == declared["adds"]
    assert set(bench) - set(ncs2) == declared["drops"]
    assert ncs2["numpy"].startswith("1.24.")  # OpenVINO 2022.3: numpy < 1.25
    assert re.search(r"ARG OPENVINO_VERSION=(\S+)", _dockerfile("Dockerfile.ncs2")).group(1).startswith("2022.3.")
    assert "FROM python:3.10-" in _dockerfile("Dockerfile.ncs2")
    assert "FROM python:3.11-" in _dockerfile("Dockerfile") and "FROM python:3.11-" in _dockerfile("Dockerfile.bench")


# ------------------------------------------------------------------------------------ Python 3.10 (NCS2)

#: names of the standard library that Python 3.10 lacks
PY311_ONLY = {("datetime", "UTC"), ("enum", "StrEnum"), ("typing", "Self"), ("typing", "LiteralString"),
              ("typing", "Never"), ("typing", "assert_type"), ("typing", "reveal_type"), ("hashlib", "file_digest"),
              ("asyncio", "TaskGroup"), ("asyncio", "timeout"), ("typing", "NotRequired"), ("typing", "Required")}
PY311_MODULES = {"tomllib", "wsgiref.types"}


def _worker_modules() -> list[Path]:
    """The repository's modules that the benchmark task of prune_trial imports (on the benchmark worker)."""
    code = ("import json, sys, pruneflow_airflow.operators, pruneflow_airflow.params, pruneflow.bench, pruneflow.stages, "
            "pruneflow.store, pruneflow.workspace, pruneflow.artifacts, pruneflow_airflow.celery_config, "
            "pruneflow_airflow.preload\n"
            "print(json.dumps(sorted({m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] in ('pruneflow', 'pruneflow_airflow') and getattr(m, '__file__', None)})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [Path(p) for p in json.loads(proc.stdout.splitlines()[-1])]


def _py311_names(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names if (node.module, a.name) in PY311_ONLY]
            if node.module in PY311_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in PY311_MODULES]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in PY311_ONLY:
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_benchmark_package_parses_for_python_310():
    ruff = BIN / "ruff"
    proc = subprocess.run([str(ruff), "check", "--target-version", "py310", "pruneflow/bench", "pruneflow/store.py"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ruff checks syntax, not names: the modules the benchmark task loads use no 3.11-only standard library
    modules = _worker_modules()
    assert REPO / "pruneflow" / "bench" / "ov_api.py" in modules and REPO / "pruneflow" / "store.py" in modules
    bad = {str(p.relative_to(REPO)): names for p in modules if (names := _py311_names(p))}
    assert not bad, f"Python 3.11-only names in what the NCS2 worker (Python 3.10) imports: {bad}"
    assert _py311_names(REPO / "pruneflow" / "airflow_cli.py") == ["datetime.UTC"]  # the check finds them


# -------------------------------------------------------------------- the OpenVINO 2022.3 adapter, MYRIAD

# What the real OpenVINO 2022.3.2 CPU plugin reports (Core.get_property("CPU", "SUPPORTED_PROPERTIES")).
CPU_2022_3 = {"SUPPORTED_PROPERTIES": "RO", "AVAILABLE_DEVICES": "RO", "RANGE_FOR_ASYNC_INFER_REQUESTS": "RO",
              "RANGE_FOR_STREAMS": "RO", "FULL_DEVICE_NAME": "RO", "OPTIMIZATION_CAPABILITIES": "RO",
              "CACHING_PROPERTIES": "RO", "CACHE_DIR": "RO", "NUM_STREAMS": "RW", "AFFINITY": "RW",
              "INFERENCE_NUM_THREADS": "RW", "PERF_COUNT": "RW", "INFERENCE_PRECISION_HINT": "RW",
              "PERFORMANCE_HINT": "RW", "PERFORMANCE_HINT_NUM_REQUESTS": "RW"}
AUTO_2022_3 = {"SUPPORTED_PROPERTIES": "RO", "MULTI_DEVICE_PRIORITIES": "RW", "PERFORMANCE_HINT": "RW",
               "PERFORMANCE_HINT_NUM_REQUESTS": "RW", "CACHE_DIR": "RW"}
# The MYRIAD plugin computes in f16 and has no thread or precision setting (a sketch of its writable keys).
MYRIAD_2022_3 = {"SUPPORTED_PROPERTIES": "RO", "FULL_DEVICE_NAME": "RO", "PERFORMANCE_HINT": "RW",
                 "PERFORMANCE_HINT_NUM_REQUESTS": "RW"}


class Fake2022Core:
    """The part of OpenVINO 2022.3's ``openvino.runtime.Core`` the benchmark uses. Like the real one it refuses an
    unknown device with RuntimeError, and it refuses a nested property value (the real one kills the process)."""

    def __init__(self, devices=("CPU",)):
        self.available_devices = list(devices)
        self.set_calls: list[tuple[str, dict]] = []
        self.compiled: list[tuple[str, dict]] = []

    def get_property(self, device, name):
        table = {"CPU": CPU_2022_3, "AUTO": AUTO_2022_3, "MYRIAD": MYRIAD_2022_3}
        base = device.split(".", 1)[0]
        if name != "SUPPORTED_PROPERTIES" or base not in table or (
                base not in ("AUTO",) and base not in self.available_devices):
            raise RuntimeError(f'Device with "{device}" name is not registered in the OpenVINO Runtime')
        return dict(table[base])

    def set_property(self, device, props):
        assert all(not isinstance(v, dict) for v in props.values())
        self.set_calls.append((device, dict(props)))

    def compile_model(self, model, device, config):
        if any(isinstance(v, (dict, list)) for v in config.values()):
            raise TypeError("nested property values kill OpenVINO 2022.3")
        self.compiled.append((device, dict(config)))
        return object()


LEGACY = ov_api.OpenVINOApi("legacy", "2022.3.2", module=None)


def test_api_is_chosen_by_the_installed_version():
    assert ov_api.api_kind("2022.3.2-9279-e2c7e4d7b4d-releases/2022/3") == "legacy"
    assert ov_api.api_kind("2022.3.0") == "legacy"
    assert ov_api.api_kind("2023.0.0") == "current" and ov_api.api_kind("2026.4.1") == "current"
    for old in ("2022.2.0", "2022.1.0", "2021.4.2"):
        with pytest.raises(ov_api.OpenVINOVersionError, match="not supported.*2022.3 LTS"):
            ov_api.api_kind(old)
    with pytest.raises(ov_api.OpenVINOVersionError, match="cannot read"):
        ov_api.release("nightly")
    # this environment's real OpenVINO (2026) gets the current API
    api = ov_api.load_api()
    assert api.kind == "current" and api.version.startswith("2026.") and api.module.__name__ == "openvino"
    assert api.translate({"ENABLE_CPU_PINNING": True}) == {"ENABLE_CPU_PINNING": True}


def test_legacy_property_mapping():
    wanted = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32",
              "ENABLE_CPU_PINNING": True}
    assert ov_api.legacy_properties(wanted) == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1,
                                                "INFERENCE_PRECISION_HINT": "f32", "AFFINITY": "CORE"}
    assert ov_api.legacy_properties({"ENABLE_CPU_PINNING": False}) == {"AFFINITY": "NONE"}
    assert ov_api.legacy_properties({"PERF_COUNT": True}) == {"PERF_COUNT": "YES"}
    with pytest.raises(ValueError, match="scalar"):
        ov_api.legacy_properties({"DEVICE_PROPERTIES": {"CPU": {}}})
    with pytest.raises(ValueError, match="True or False"):
        ov_api.legacy_properties({"ENABLE_CPU_PINNING": "yes"})
    rest, per = ov_api.split_device_properties(
        {"PERFORMANCE_HINT": "LATENCY", "DEVICE_PROPERTIES": {"CPU": {"ENABLE_CPU_PINNING": True, "INFERENCE_NUM_THREADS": 2}}})
    assert rest == {"PERFORMANCE_HINT": "LATENCY"} and per == {"CPU": {"AFFINITY": "CORE", "INFERENCE_NUM_THREADS": 2}}
    with pytest.raises(ValueError, match="DEVICE_PROPERTIES"):
        ov_api.split_device_properties({"DEVICE_PROPERTIES": {"CPU": 1}})


def test_legacy_config_through_a_2022_core():
    core = Fake2022Core()
    config, skipped = _build_config(core, BenchmarkOptions(device="CPU"), LEGACY)
    assert config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32",
                      "AFFINITY": "CORE"} and skipped == []
    # the current API's name would have been skipped by 2022.3's CPU: the mapping is what pins the threads
    _, skipped_unmapped = _build_config(core, BenchmarkOptions(device="CPU"))
    assert skipped_unmapped == ["ENABLE_CPU_PINNING"]
    # a virtual device: per-device settings go on the Core, never as a nested DEVICE_PROPERTIES
    config, skipped = _build_config(core, BenchmarkOptions(device="AUTO:CPU"), LEGACY)
    assert "DEVICE_PROPERTIES" in config
    LEGACY.compile(core, "model", "AUTO:CPU", config)
    assert core.set_calls == [("CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1,
                                       "INFERENCE_PRECISION_HINT": "f32", "AFFINITY": "CORE"})]
    assert core.compiled == [("AUTO:CPU", {"PERFORMANCE_HINT": "LATENCY"})]
    with pytest.raises(TypeError):  # what the adapter prevents
        core.compile_model("model", "AUTO:CPU", config)
    # MYRIAD: only the hint is writable; threads and precision are recorded as skipped
    stick = Fake2022Core(devices=("CPU", "MYRIAD"))
    config, skipped = _build_config(stick, BenchmarkOptions(device="MYRIAD", precision="f16"), LEGACY)
    assert config == {"PERFORMANCE_HINT": "LATENCY"}
    assert skipped == ["INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT"]


def test_legacy_infer_call_and_missing_stick_errors():
    calls = []

    class Request:
        def infer(self, inputs, **kwargs):
            calls.append(kwargs)

    LEGACY.infer_shared(Request(), {0: None})
    ov_api.OpenVINOApi("current", "2026.4.1", None).infer_shared(Request(), {0: None})
    assert calls == [{}, {"share_inputs": True, "share_outputs": True}]
    with pytest.raises(RuntimeError, match="not available.*udev rules"):
        _build_config(Fake2022Core(devices=("CPU",)), BenchmarkOptions(device="MYRIAD", precision="f16"), LEGACY)
    # the current OpenVINO has no MYRIAD plugin: the real 2026 Core says so, naming the legacy worker
    import openvino as ov

    with pytest.raises(RuntimeError, match="no MYRIAD plugin.*bench_ncs2"):
        _build_config(ov.Core(), BenchmarkOptions(device="MYRIAD", precision="f16"), ov_api.load_api())


def test_myriad_is_a_spec_device_routed_to_the_ncs2_queue():
    assert BenchmarkOptions(device="MYRIAD", precision="f16").device == "MYRIAD"
    with pytest.raises(ValueError, match="f16 only"):
        BenchmarkOptions(device="MYRIAD")
    with pytest.raises(ValueError, match="f16 only"):
        BenchmarkOptions(device="HETERO:MYRIAD,CPU", precision="bf16")
    with pytest.raises(ValueError, match="onnxruntime"):
        BenchmarkOptions(device="MYRIAD", precision="f16", backend="onnxruntime")
    assert device_names("AUTO:MYRIAD,CPU") == ["MYRIAD", "CPU"] and device_names("GPU.1") == ["GPU"]
    assert device_names("AUTO:-CPU") == []
    compose_targets = bench_targets(_compose()["x-airflow-env"]["AIRFLOW__PRUNEFLOW__DEVICES"], "bench_cpu0", "")
    assert route("MYRIAD", None, compose_targets).queue == "bench_ncs2"
    assert route("HETERO:MYRIAD,CPU", None, compose_targets).queue == "bench_ncs2"
    assert route("CPU", None, compose_targets).queue == "bench_cpu0"
    assert route("GPU.0", "gpu0", compose_targets).queue == "bench_gpu0"
    # the queue exists in the deployment: the compose NCS2 worker serves it
    ncs2 = _compose()["services"]["bench-ncs2"]
    assert ncs2["environment"]["QUEUE"] == "bench_ncs2" and "bench_ncs2" in ncs2["command"]


def test_the_training_image_declines_openvino_telemetry_as_the_user_that_runs_tasks():
    # as `make install` does (tests/test_openvino_telemetry.py): left on, every convert_model forks the task
    text = (DOCKER / "Dockerfile").read_text()
    user = re.search(r"^USER 50000$", text, re.M)
    opt_out = re.search(r"^RUN opt_in_out --opt_out$", text, re.M)
    assert user and opt_out and opt_out.start() > user.start()
