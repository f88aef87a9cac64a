"""Static checks of ``docker/k8s/``, the Kubernetes manifests, with no cluster.

- Every manifest validates, offline, against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` wheel ships (strict: an unknown or misspelt field fails), for the oldest and
  the newest Kubernetes version this project states; a broken manifest is shown to fail.
- The wiring the service needs: Services select the daemon's pods and name ports they expose; the
  ports agree with the daemon's own config (the ConfigMap's daemon.yaml, loaded by augserve's config
  loader); workers and the trainer connect to the Service; the commands parse with augserve's and the
  trainer's own argument parsers; the images are the ones docker/ builds, DALI only in the GPU image,
  and a GPU is asked for exactly where a container uses CUDA.
- Keys: the Secrets referenced are the kustomization's generators, made from git-ignored files; the
  documented script and every pod's init container are run here, for real, to show that they give
  the daemon, the workers and the trainer keyrings that fit together and pass augserve's own checks.
- When ``kubectl`` is on PATH, ``kubectl kustomize`` renders the whole thing (Secrets and ConfigMap
  generated, names hashed) and the rendered objects are validated too.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_docker_files import (
    COMPOSE,
    _augserve_parser,
    _final_stage,
    _image_requirements,
    _one,
    _parse,
    _parse_dockerfile,
    _tcp_port,
    _trainer_parser,
    _user_of,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="offline Kubernetes schemas: pip install kubernetes-validate==1.37.0 (in the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
# The oldest Kubernetes release still maintained by a major cloud when this was written, and the newest
# the validator knows.
VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
WORKLOADS = ("Deployment", "Job")
SCRIPT_TIMEOUT_S = 120


# --- loading -------------------------------------------------------------------------------------------


def _kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))


def _resources() -> list[tuple[str, dict]]:
    """(file name, object) of every document of every file the kustomization lists."""
    found = []
    for name in _kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if document:
                found.append((name, document))
    return found


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    found = {}
    for name, document in _resources():
        key = (document["kind"], document["metadata"]["name"])
        assert key not in found, f"{name}: {key} defined twice"
        found[key] = document
    return found


def _workloads(objects) -> dict[str, dict]:
    return {name: o for (kind, name), o in objects.items() if kind in WORKLOADS}


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict, init: bool = False) -> list[dict]:
    return _pod(workload).get("initContainers" if init else "containers", [])


def _main(workload: dict) -> dict:
    containers = _containers(workload)
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _volume(workload: dict, container: dict, mount_path: str) -> dict:
    """The pod volume mounted at ``mount_path`` in ``container``."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"{workload['metadata']['name']}/{container['name']}: nothing (or several) mounted at {mount_path}"
    volume = next((v for v in _pod(workload)["volumes"] if v["name"] == mounts[0]["name"]), None)
    assert volume is not None, f"{workload['metadata']['name']}: volume {mounts[0]['name']} is not declared"
    return volume


def _built_images() -> dict[str, str]:
    """image tag -> Dockerfile, as docker/compose.yaml builds them (its `image:` beside `build:`)."""
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    return {s["image"]: Path(s["build"]["dockerfile"]).name for s in services.values() if s.get("build")}


def _args(container: dict, dockerfile: str):
    """The container's command line parsed by the parser of what its image runs (ENTRYPOINT + args)."""
    assert "command" not in container, f"{container['name']}: keep the image's ENTRYPOINT (set args only)"
    entrypoint = list(_one(_final_stage(_parse_dockerfile(dockerfile)), "ENTRYPOINT").value)
    parser = {("augserve",): _augserve_parser, ("python", "-m", "trainer"): _trainer_parser}[tuple(entrypoint)]
    return _parse(parser(), container["args"], f"{container['name']} args")


# --- schemas ---------------------------------------------------------------------------------------------


def _validate(document: dict, version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_every_manifest_is_in_the_kustomization():
    listed = set(_kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert listed == present, f"in the folder but not applied: {sorted(present - listed)}; listed but missing: {sorted(listed - present)}"


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    problems = []
    for name, document in _resources():
        try:
            _validate(document, version)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{name}: {document['kind']}/{document['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_schema_validation_is_live(objects):
    """The check above means something: misspelt fields and wrong types are refused."""
    worker = objects[("Deployment", "augserve-worker")]
    broken = copy.deepcopy(worker)
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        _validate(broken, VERSIONS[-1])
    service = copy.deepcopy(objects[("Service", "augserve-daemon")])
    service["spec"]["ports"][0]["port"] = "5555"
    with pytest.raises(kubernetes_validate.ValidationError, match="integer"):
        _validate(service, VERSIONS[-1])
    job = copy.deepcopy(objects[("Job", "augserve-trainer")])
    _pod(job)["containers"][0]["resources"]["limits"]["memory"] = ["4Gi"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job, VERSIONS[-1])


# --- wiring ----------------------------------------------------------------------------------------------


def _selected(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_pods_and_ports(objects):
    workloads = _workloads(objects)
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if workload["kind"] == "Deployment":
            assert _selected(workload["spec"]["selector"]["matchLabels"], labels), f"{name}: its selector does not match its own pods"
    for (kind, name), service in objects.items():
        if kind != "Service":
            continue
        targets = [w for w in workloads.values() if w["kind"] == "Deployment" and _selected(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"Service {name} selects {[t['metadata']['name'] for t in targets]}: exactly one Deployment expected"
        ports = {p.get("name"): p["containerPort"] for c in _containers(targets[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"Service {name}: targetPort {target} is no port of {targets[0]['metadata']['name']} ({ports})"


def _daemon_config(objects):
    """The daemon's DaemonConfig as the container would load it: its args, its environment and the
    ConfigMap file its --config names (resolved through the volume to the configMapGenerator's file)."""
    from augserve.config import load_config

    daemon = objects[("Deployment", "augserve-daemon")]
    container = _main(daemon)
    args = _args(container, _built_images()[container["image"]])
    assert args.command == "serve"
    folder, _, key = args.config.rpartition("/")
    volume = _volume(daemon, container, folder)
    generators = {g["name"]: g for g in _kustomization()["configMapGenerator"]}
    assert volume["configMap"]["name"] in generators, f"--config {args.config}: its ConfigMap is not generated by the kustomization"
    files = {Path(f).name: K8S / f for f in generators[volume["configMap"]["name"]]["files"]}
    assert key in files, f"--config {args.config}: the ConfigMap has no key {key} ({sorted(files)})"
    overrides = {"bind": args.bind, "workers": args.workers, "metrics_port": args.metrics_port, "metrics_host": args.metrics_host, "backend": args.backend}
    environment = {k: v for k, v in _env(container).items() if k != "AUGSERVE_KEYS_DIR"}  # that directory exists in the pod only
    return load_config(str(files[key]), overrides, environ=environment), container


def test_ports_agree_with_the_daemon_config(objects):
    config, container = _daemon_config(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = objects[("Service", "augserve-daemon")]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ipaddress.ip_address(config.bind[len("tcp://") :].rpartition(":")[0]).is_unspecified, f"the daemon binds {config.bind}: the Service cannot reach it"
    assert _tcp_port(config.bind) == ports["control"] == service_ports["control"]["port"]
    assert config.workers == 0, "the worker Deployments do the augmenting"

    assert config.metrics_port == ports["metrics"] == service_ports["metrics"]["port"], "metrics port: config, container and Service disagree"
    assert ipaddress.ip_address(config.metrics_host).is_unspecified, f"metrics on {config.metrics_host}: Prometheus in another pod cannot scrape them"
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(config.metrics_port)

    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["tcpSocket"]["port"] in ("control", ports["control"]), f"{probe}: the control port"
    liveness = container["livenessProbe"]
    command = liveness["exec"]["command"]
    status = _parse(_augserve_parser(), command[1:], "livenessProbe")
    assert command[0] == "augserve" and status.command == "status"
    assert status.address == f"tcp://127.0.0.1:{_tcp_port(config.bind)}"
    assert liveness["timeoutSeconds"] > status.timeout + 3, "the probe's timeout must leave time for start-up (~2 s) plus status --timeout"


def test_workers_and_trainer_connect_to_the_daemon_service(objects):
    service = objects[("Service", "augserve-daemon")]
    control = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "control")
    expected = f"tcp://{service['metadata']['name']}:{control}"
    images = _built_images()
    seen = set()
    for name, workload in _workloads(objects).items():
        container = _main(workload)
        args = _args(container, images[container["image"]])
        seen.add(args.command)
        if args.command == "serve":
            continue
        assert args.command in ("worker", "train"), f"{name}: runs {args.command}"
        assert args.connect == expected, f"{name}: connects to {args.connect}, the daemon's Service is {expected}"
        if args.command == "train" and args.out:
            assert _volume(workload, container, args.out), f"{name}: --out {args.out} is on no volume"
    assert seen == {"serve", "worker", "train"}


def test_images_are_the_ones_docker_builds(objects):
    images = _built_images()
    assert set(images.values()) == {"Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.trainer"}
    for name, workload in _workloads(objects).items():
        for container in _containers(workload) + _containers(workload, init=True):
            assert container["image"] in images, f"{name}/{container['name']}: {container['image']} is not an image docker/ builds ({sorted(images)})"
            assert container.get("imagePullPolicy") == "IfNotPresent", f"{name}/{container['name']}: IfNotPresent (local images, or pinned tags from a registry)"


def test_dali_and_gpus_where_they_belong(objects):
    images = _built_images()
    for name, workload in _workloads(objects).items():
        container = _main(workload)
        args = _args(container, images[container["image"]])
        limits = container["resources"].get("limits", {})
        device = getattr(args, "device", None) or "cpu"
        if getattr(args, "backend", None) == "dali":
            installed = {r.name for r in _image_requirements(images[container["image"]])}
            assert any(n.startswith("nvidia-dali") for n in installed), f"{name}: --backend dali on {container['image']}, which has no DALI"
        if device.startswith("cuda"):
            assert int(limits.get("nvidia.com/gpu", 0)) == 1 and device == "cuda:0", f"{name}: one GPU per container, which then is cuda:0"
            assert any(t.get("key") == "nvidia.com/gpu" for t in _pod(workload).get("tolerations", [])), f"{name}: tolerate the GPU nodes' taint"
        else:
            assert "nvidia.com/gpu" not in limits, f"{name}: asks for a GPU it does not use"


def test_pods_are_non_root_hardened_and_sized(objects):
    uid = int(_user_of(_final_stage(_parse_dockerfile("Dockerfile.cpu"))))
    for name, workload in _workloads(objects).items():
        pod = _pod(workload)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid and security["fsGroup"] == uid, f"{name}: run as the images' user {uid}"
        assert pod.get("automountServiceAccountToken") is False, f"{name}: augserve never talks to the Kubernetes API"
        for container in _containers(workload) + _containers(workload, init=True):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], where
            assert context["readOnlyRootFilesystem"] is True, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], f"{where}: requests (cpu, memory) and a memory limit"
        main = _main(workload)
        assert _volume(workload, main, "/tmp").get("emptyDir") is not None, f"{name}: a writable /tmp (the root filesystem is read-only)"
        args = _args(main, _built_images()[main["image"]])
        if args.command in ("worker", "train"):
            shm = _volume(workload, main, "/dev/shm")
            assert shm.get("emptyDir", {}).get("medium") == "Memory" and shm["emptyDir"].get("sizeLimit"), f"{name}: /dev/shm as a sized memory emptyDir"


# --- keys --------------------------------------------------------------------------------------------------


def _secret_generators() -> dict[str, list[str]]:
    return {g["name"]: g["files"] for g in _kustomization()["secretGenerator"]}


def _key_volumes(workload: dict) -> tuple[dict, str, dict, str]:
    """(secret volume, where the init container mounts it, keys volume, where it mounts that)."""
    init = _containers(workload, init=True)
    assert len(init) == 1 and init[0]["name"] == "keys", f"{workload['metadata']['name']}: one init container `keys` expected"
    mounts = {m["name"]: m for m in init[0]["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
    secret = [n for n in mounts if "secret" in volumes[n]]
    keys = [n for n in mounts if "emptyDir" in volumes[n]]
    assert len(secret) == 1 and len(keys) == 1, f"{workload['metadata']['name']}: the init container mounts one Secret and one emptyDir"
    return volumes[secret[0]], mounts[secret[0]]["mountPath"], volumes[keys[0]], mounts[keys[0]]["mountPath"]


def test_secrets_come_from_git_ignored_generated_files(objects):
    generators = _secret_generators()
    assert not any(kind == "Secret" for kind, _ in objects), "no Secret manifest: keys come from the secretGenerator"
    referenced = set()
    for name, workload in _workloads(objects).items():
        secret, _at, keys, _keys_at = _key_volumes(workload)
        referenced.add(secret["secret"]["secretName"])
        assert secret["secret"]["secretName"] in generators, f"{name}: Secret {secret['secret']['secretName']} is not generated by the kustomization"
        assert secret["secret"]["defaultMode"] == 0o440, f"{name}: mode 0440 (with fsGroup): readable by the pod's user only"
        assert keys["emptyDir"].get("medium") == "Memory", f"{name}: keep the copied keys in memory, never on the node's disk"
        main = _main(workload)
        assert secret["name"] not in {m["name"] for m in main.get("volumeMounts", [])}, f"{name}: only the init container mounts the Secret"
        serves = _args(main, _built_images()[main["image"]]).command == "serve"
        assert (secret["secret"]["secretName"] == "augserve-daemon-keys") == serves, f"{name}: the daemon, and only the daemon, holds the daemon's keyring"
    assert referenced == set(generators), f"generated but unused: {sorted(set(generators) - referenced)}"

    key_files = [f"docker/k8s/{f}" for files in generators.values() for f in files]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *key_files], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert set(ignored.stdout.split()) == set(key_files), f"not git-ignored: {sorted(set(key_files) - set(ignored.stdout.split()))}"
    for path in K8S.rglob("*"):
        if path.is_file() and "keys" not in path.relative_to(K8S).parts[:1]:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "secret-key" not in text and "augserve-key-bundle" not in text, f"{path}: key material in the repository"


def _augserve_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HOME=str(tmp))
    return env


@pytest.fixture(scope="module")
def made_keys(tmp_path_factory) -> Path:
    """docker/k8s run through its own make-keys.sh, in a copy (the real keys/ is the user's)."""
    copy_of = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy_of, ignore=shutil.ignore_patterns("keys"))
    result = subprocess.run(["sh", str(copy_of / "make-keys.sh")], capture_output=True, text=True, env=_augserve_env(copy_of.parent), timeout=SCRIPT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return copy_of


def test_make_keys_writes_every_file_the_generators_read(made_keys):
    for files in _secret_generators().values():
        for name in files:
            path = made_keys / name
            assert path.is_file(), f"make-keys.sh did not make {name}"
            if name.endswith(("_secret", ".keys")):
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{name}: secret material readable by group/others"


def _run_init(workload: dict, files: list[Path], tmp: Path) -> Path:
    """Run the pod's init container here: its Secret volume laid out as the kubelet does (one file per
    key, mode 0440), its paths mapped into ``tmp``. Returns the keys directory the main container reads."""
    secret, secret_at, _keys, keys_at = _key_volumes(workload)
    secret_dir, keys_volume = tmp / "secret", tmp / "volume"
    secret_dir.mkdir()
    keys_volume.mkdir(mode=0o777)
    os.chmod(keys_volume, 0o777)  # an emptyDir
    for path in files:
        target = secret_dir / path.name
        shutil.copyfile(path, target)
        os.chmod(target, secret["secret"]["defaultMode"])
    init = _containers(workload, init=True)[0]
    argv = [*init.get("command", []), *init.get("args", [])]
    argv = [a.replace(secret_at, str(secret_dir)).replace(keys_at, str(keys_volume)) for a in argv]
    result = subprocess.run(argv, capture_output=True, text=True, env=_augserve_env(tmp), timeout=SCRIPT_TIMEOUT_S)
    assert result.returncode == 0, f"{workload['metadata']['name']} init container: {result.stderr}"
    keys_dir = _env(_main(workload))["AUGSERVE_KEYS_DIR"]
    assert keys_dir.startswith(keys_at + "/"), f"AUGSERVE_KEYS_DIR={keys_dir} is not in the volume the init container fills ({keys_at})"
    return keys_volume / keys_dir[len(keys_at) + 1 :]


def test_init_containers_give_keyrings_that_fit(objects, made_keys, tmp_path):
    from augserve.security import Keyring

    generators = _secret_generators()
    keyrings = {}
    commands = {}
    for name, workload in _workloads(objects).items():
        secret, *_ = _key_volumes(workload)
        files = [made_keys / f for f in generators[secret["secret"]["secretName"]]]
        (tmp_path / name).mkdir()
        keys_dir = _run_init(workload, files, tmp_path / name)
        keyrings[name] = Keyring.load(keys_dir, create=False)  # what a daemon on 0.0.0.0 does: augserve's own checks
        commands[name] = _args(_main(workload), _built_images()[_main(workload)["image"]]).command
    daemon = keyrings["augserve-daemon"]
    assert daemon.daemon.secret is not None and daemon.client.secret is not None and daemon.worker.secret is None
    for name, keyring in keyrings.items():
        if commands[name] == "serve":
            continue
        role = {"train": "client", "worker": "worker"}[commands[name]]
        assert keyring.daemon.public == daemon.daemon.public and keyring.daemon.secret is None, f"{name}: must hold the daemon's public key only"
        assert keyring.pair(role).public == daemon.pair(role).public and keyring.pair(role).secret is not None, f"{name}: its {role} key is not one the daemon admits"
        if role == "client":
            assert daemon.worker.public in keyring.allowed("worker"), "the trainer's data socket must admit the workers"


# --- the real kustomize ------------------------------------------------------------------------------------


def test_kubectl_kustomize_renders_valid_objects(made_keys):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendered output is not checked here (the sources are, above)")
    result = subprocess.run([kubectl, "kustomize", str(made_keys)], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    namespace = _kustomization()["namespace"]
    for document in rendered:
        for version in VERSIONS:
            _validate(document, version)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace
        if document["kind"] in WORKLOADS:
            for volume in _pod(document)["volumes"]:
                if "secret" in volume:
                    assert ("Secret", volume["secret"]["secretName"]) in names, volume
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
    assert sum(kind == "Secret" for kind, _ in names) == len(_secret_generators())
