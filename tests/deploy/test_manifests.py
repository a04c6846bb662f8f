"""The deployment in ``deploy/`` agrees with itself and with the code.

Pure logic, no cluster: every YAML document in ``deploy/kuberay``, the Dockerfile,
``deploy/README.md`` and ``pyproject.toml`` are read and checked against each other
and against the package: ``Settings`` (the ``LLM_BATCH_*`` variables), the CLI, the
job format and the driver module. Each failure names the file and the field that
disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pydantic import AliasChoices

from llm_batch.job.spec import JobSpec, ModelSpec
from llm_batch.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
README = ROOT / "deploy" / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

# Manifests that kustomization.yaml leaves out on purpose (a one-off run with its
# own cluster; see the comment in kustomization.yaml).
NOT_IN_KUSTOMIZATION = {"rayjob.yaml"}

# Variables the deployment sets for settings the service does not have yet. Each
# entry must go once Settings grows the field (test_pending_settings says when).
PENDING_SETTINGS: dict[str, str] = {}

# Ray's name for the resource a node of accelerator type T offers, and what a job's
# `model.accelerator_type: T` asks for (llm_batch/pipeline/placement.py).
ACCELERATOR_PREFIX = "accelerator_type:"
GPU_RESOURCE = "nvidia.com/gpu"


# -- loading ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    file: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name"))

    def at(self, field: str) -> str:
        """``file Kind/name: field``, the place a failure message points to."""
        named = f"{self.kind}/{self.name}" if self.body.get("metadata") else self.kind
        return f"{self.file} {named}: {field}"


@functools.cache
def all_docs() -> tuple[Doc, ...]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")) + sorted(KUBERAY.glob("*.yml")):
        with path.open(encoding="utf-8") as f:
            for body in yaml.safe_load_all(f):
                if body is not None:
                    docs.append(Doc(path.name, body))
    return tuple(docs)


def manifests() -> list[Doc]:
    """Everything but the kustomization."""
    return [d for d in all_docs() if d.kind != "Kustomization"]


def only(kind: str, file: str | None = None) -> Doc:
    found = [d for d in manifests() if d.kind == kind and (file is None or d.file == file)]
    assert len(found) == 1, f"expected one {kind} in deploy/kuberay{'/' + file if file else ''}"
    return found[0]


def find(kind: str, name: str) -> Doc | None:
    return next((d for d in manifests() if d.kind == kind and d.name == name), None)


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def pinned(requirement: str) -> str:
    """The version of a ``name==X`` requirement."""
    specs = list(Requirement(requirement).specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{requirement!r} is not a pin"
    return specs[0].version


def project_requirement(name: str) -> Requirement:
    for req in pyproject()["project"]["dependencies"]:
        if Requirement(req).name == name:
            return Requirement(req)
    raise AssertionError(f"pyproject.toml: project.dependencies has no {name}")


def extra_requirement(extra: str) -> Requirement:
    reqs = pyproject()["project"]["optional-dependencies"][extra]
    assert len(reqs) == 1, f"pyproject.toml: the {extra!r} extra should be one vLLM pin"
    return Requirement(reqs[0])


@functools.cache
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def docker_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile(), flags=re.MULTILINE))


# -- the shape of pods -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerGroup:
    at: str
    name: str
    num_gpus: int
    resources: dict[str, float]
    min_replicas: int
    max_replicas: int

    @property
    def accelerator_types(self) -> set[str]:
        return {k.removeprefix(ACCELERATOR_PREFIX) for k in self.resources if _is_accel(k)}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A RayCluster, or the cluster spec inside a RayJob."""

    doc: Doc
    path: str  # field path of the RayClusterSpec in the document
    spec: dict[str, Any]

    @property
    def head(self) -> dict[str, Any]:
        return self.spec["headGroupSpec"]

    @property
    def head_start_params(self) -> dict[str, str]:
        return {k: str(v) for k, v in (self.head.get("rayStartParams") or {}).items()}

    @property
    def groups(self) -> list[dict[str, Any]]:
        return list(self.spec.get("workerGroupSpecs") or [])

    def worker_groups(self) -> list[WorkerGroup]:
        out = []
        for i, group in enumerate(self.groups):
            at = self.doc.at(f"{self.path}.workerGroupSpecs[{i}]")
            params = group.get("rayStartParams") or {}
            out.append(
                WorkerGroup(
                    at=at,
                    name=str(group.get("groupName")),
                    num_gpus=int(params.get("num-gpus", 0)),
                    resources=ray_resources(str(params["resources"]), at=at)
                    if "resources" in params
                    else {},
                    min_replicas=int(group.get("minReplicas", 0)),
                    max_replicas=int(group.get("maxReplicas", group.get("replicas", 0))),
                )
            )
        return out

    @property
    def head_service(self) -> str:
        # KubeRay names the head's Service <RayCluster name>-head-svc.
        return f"{self.doc.name}-head-svc"


def _is_accel(resource: str) -> bool:
    return resource.startswith(ACCELERATOR_PREFIX)


def ray_resources(value: str, *, at: str) -> dict[str, float]:
    """``rayStartParams.resources``: KubeRay pastes it into a shell command line, so it
    is a JSON object inside double quotes with escaped inner quotes."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"')
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise AssertionError(
            f"{at}.rayStartParams.resources: {value!r} is not a quoted JSON object "
            f'(write it as \'"{{\\"accelerator_type:T\\": 1}}"\'): {e}'
        ) from None
    assert isinstance(parsed, dict), f"{at}.rayStartParams.resources: not a JSON object"
    return parsed


def clusters() -> list[Cluster]:
    out = []
    for doc in manifests():
        if doc.kind == "RayCluster":
            out.append(Cluster(doc, "spec", doc.body["spec"]))
        elif doc.kind == "RayJob":
            out.append(Cluster(doc, "spec.rayClusterSpec", doc.body["spec"]["rayClusterSpec"]))
    return out


@dataclasses.dataclass(frozen=True)
class Pod:
    doc: Doc
    path: str  # field path of the pod template in the document
    role: str  # service | ray-head | ray-worker
    template: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return self.template.get("spec") or {}

    @property
    def labels(self) -> dict[str, str]:
        return dict((self.template.get("metadata") or {}).get("labels") or {})

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("containers") or [])

    def at(self, field: str) -> str:
        return self.doc.at(f"{self.path}.{field}")

    def container_at(self, container: dict[str, Any], field: str) -> str:
        return self.at(f"spec.containers[{container.get('name')}].{field}")


def pods() -> list[Pod]:
    out = []
    for doc in manifests():
        if doc.kind == "Deployment":
            out.append(Pod(doc, "spec.template", "service", doc.body["spec"]["template"]))
    for c in clusters():
        out.append(Pod(c.doc, f"{c.path}.headGroupSpec.template", "ray-head", c.head["template"]))
        for i, group in enumerate(c.groups):
            path = f"{c.path}.workerGroupSpecs[{i}].template"
            out.append(Pod(c.doc, path, "ray-worker", group["template"]))
    return out


def service_pod() -> Pod:
    found = [p for p in pods() if p.role == "service"]
    assert len(found) == 1, "deploy/kuberay should hold one Deployment: the llm-batch service"
    return found[0]


def service_container() -> dict[str, Any]:
    pod = service_pod()
    assert len(pod.containers()) == 1, pod.at("spec.containers: expected one container")
    return pod.containers()[0]


def env_list(container: dict[str, Any]) -> list[dict[str, Any]]:
    return list(container.get("env") or [])


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in env_list(container) if "value" in e}


def container_port(container: dict[str, Any], ref: int | str) -> int | None:
    """A port given by number or by the name of one of the container's ports."""
    if isinstance(ref, int):
        return ref
    for port in container.get("ports") or []:
        if port.get("name") == ref:
            return int(port["containerPort"])
    return None


# -- Settings ---------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    """Every environment variable ``Settings`` reads, from the model itself."""
    prefix = str(Settings.model_config.get("env_prefix") or "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def is_settings_like(name: str) -> bool:
    prefix = str(Settings.model_config.get("env_prefix") or "").upper()
    return name.upper().startswith(prefix) or name.upper() in settings_env_names()


@pytest.fixture
def service_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings`` as the service container would load them (literal env values; values
    from Secrets are left out)."""
    for name in list(os.environ):
        if is_settings_like(name):
            monkeypatch.delenv(name)
    for name, value in literal_env(service_container()).items():
        monkeypatch.setenv(name, value)
    try:
        return Settings()
    except Exception as e:  # pydantic's ValidationError names the field
        pytest.fail(f"service.yaml: the service container's env does not load as Settings: {e}")


def service_path(settings: Settings, variable: str) -> PurePosixPath:
    """A path setting of the service as the pod sees it: the literal, absolute value of
    its variable (Settings resolves paths against this machine's filesystem)."""
    field = variable.removeprefix(str(Settings.model_config.get("env_prefix") or "")).lower()
    value = literal_env(service_container()).get(variable)
    where = service_pod().container_at(service_container(), f"env {variable}")
    default = Settings.model_fields[field].default
    assert value, f"{where}: not set (the default, {default}, depends on the working directory)"
    path = PurePosixPath(value)
    assert path.is_absolute(), f"{where}: {value!r} should be an absolute path"
    loaded = getattr(settings, field)
    assert Path(str(loaded)) == Path(value).resolve(), f"{where}: Settings reads {loaded}"
    return path


def shared_volume() -> PurePosixPath:
    """Where the service's container mounts the shared claim (storage.yaml); every pod
    mounts it at the same path (test_one_rwx_claim_mounted_at_one_path_everywhere)."""
    pvc = only("PersistentVolumeClaim")
    pod, container = service_pod(), service_container()
    volumes = {
        v["name"]
        for v in pod.spec.get("volumes") or []
        if (v.get("persistentVolumeClaim") or {}).get("claimName") == pvc.name
    }
    paths = sorted(
        {m["mountPath"] for m in container.get("volumeMounts") or [] if m.get("name") in volumes}
    )
    assert len(paths) == 1, pod.container_at(
        container, f"volumeMounts: the claim {pvc.name!r} should be mounted once, is at {paths}"
    )
    return PurePosixPath(paths[0])


def on(path: str | PurePosixPath, folder: PurePosixPath) -> bool:
    """Whether an absolute path is ``folder`` or lies under it."""
    p = PurePosixPath(path)
    return p == folder or folder in p.parents


# -- the manifests as a whole ---------------------------------------------------------------


def test_every_manifest_names_its_kind_and_name():
    problems = []
    seen: dict[tuple[str, str], str] = {}
    for doc in manifests():
        for key in ("apiVersion", "kind"):
            if not doc.body.get(key):
                problems.append(doc.at(f"{key} is missing"))
        if not (doc.body.get("metadata") or {}).get("name"):
            problems.append(doc.at("metadata.name is missing"))
        if (doc.body.get("metadata") or {}).get("namespace"):
            problems.append(
                doc.at("metadata.namespace is set; kustomization.yaml (or -n) chooses it")
            )
        key = (doc.kind, doc.name)
        if key in seen:
            problems.append(doc.at(f"{doc.kind}/{doc.name} is also defined in {seen[key]}"))
        seen[key] = doc.file
    assert not problems, "\n".join(problems)
    kinds = {d.kind for d in manifests()}
    for kind in ("RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"):
        assert kind in kinds, f"deploy/kuberay has no {kind}"


def test_kustomization_lists_the_manifests():
    kustomizations = [d for d in all_docs() if d.kind == "Kustomization"]
    assert len(kustomizations) == 1, "deploy/kuberay needs one kustomization.yaml"
    k = kustomizations[0]
    assert k.file == "kustomization.yaml", f"{k.file}: the Kustomization must be kustomization.yaml"
    listed = list(k.body.get("resources") or [])
    problems = [
        k.at(f"resources lists {r!r}, which is not a file in deploy/kuberay")
        for r in listed
        if not (KUBERAY / r).is_file()
    ]
    files = {d.file for d in manifests()}
    for file in sorted(files - set(listed) - NOT_IN_KUSTOMIZATION):
        problems.append(k.at(f"resources does not list {file}"))
    for file in sorted(NOT_IN_KUSTOMIZATION & set(listed)):
        problems.append(k.at(f"resources lists {file}, which is meant to be applied by itself"))
    if not k.body.get("namespace"):
        problems.append(k.at("namespace is not set"))
    assert not problems, "\n".join(problems)


def test_one_image_everywhere_tagged_with_the_package_version():
    images: dict[str, list[str]] = {}
    for pod in pods():
        for c in pod.containers():
            images.setdefault(str(c.get("image")), []).append(pod.container_at(c, "image"))
    assert len(images) == 1, "containers use different images:\n" + "\n".join(
        f"{image}: {', '.join(where)}" for image, where in images.items()
    )
    image = next(iter(images))
    name, _, tag = image.rpartition(":")
    version = pyproject()["project"]["version"]
    assert tag == version, (
        f"image {image!r} ({next(iter(images.values()))[0]}) is not tagged with the package "
        f"version {version} (pyproject.toml project.version)"
    )
    k = next(d for d in all_docs() if d.kind == "Kustomization")
    names = [i.get("name") for i in k.body.get("images") or []]
    assert names == [name], (
        f"kustomization.yaml: images[].name {names} should be [{name!r}], the image the "
        "manifests use, so that `kustomize edit set image` retargets every container"
    )


def test_ray_version_is_pyprojects():
    ray = pinned(str(project_requirement("ray")))
    problems = [
        c.doc.at(f"{c.path}.rayVersion is {c.spec.get('rayVersion')!r}, pyproject pins ray=={ray}")
        for c in clusters()
        if str(c.spec.get("rayVersion")) != ray
    ]
    assert not problems, "\n".join(problems)


# -- the image ---------------------------------------------------------------------------------


def test_dockerfile_installs_pyprojects_vllm_and_ray():
    args = docker_args()
    text = dockerfile()
    where = "deploy/docker/Dockerfile"
    ray_req = project_requirement("ray")
    ray = pinned(str(ray_req))
    assert args.get("RAY_VERSION") == ray, (
        f"{where}: ARG RAY_VERSION={args.get('RAY_VERSION')} but pyproject.toml pins {ray_req}"
    )
    ray_spec = f"ray[{','.join(sorted(ray_req.extras))}]==${{RAY_VERSION}}"
    assert ray_spec in text, f"{where}: should install {ray_spec!r} (pyproject: {ray_req})"
    for extra in ("gpu", "cpu"):
        req = extra_requirement(extra)
        version = pinned(str(req))
        assert args.get("VLLM_VERSION") == version, (
            f"{where}: ARG VLLM_VERSION={args.get('VLLM_VERSION')} but pyproject.toml's "
            f"{extra!r} extra pins {req}"
        )
        assert f"{req.name}==${{VLLM_VERSION}}" in text, (
            f"{where}: ENGINE={extra} should install {req.name}==${{VLLM_VERSION}} "
            f"(pyproject.toml's {extra!r} extra: {req})"
        )


def test_dockerfile_builds_both_engines_from_the_extras():
    args = docker_args()
    text = dockerfile()
    where = "deploy/docker/Dockerfile"
    extras = pyproject()["project"]["optional-dependencies"]
    assert args.get("ENGINE") == "gpu", f"{where}: ARG ENGINE should default to gpu"
    assert {"gpu", "cpu"} <= set(extras), "pyproject.toml: the gpu and cpu extras are missing"
    assert "[${ENGINE}]" in text, (
        f"{where}: the package is not installed with its [${{ENGINE}}] extra"
    )
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", text), (
        f"{where}: ENGINE=cpu must remove torchvision, torchaudio and torchcodec after the last "
        "pip install (shared/docs/ENVIRONMENT.md)"
    )
    python = args.get("PYTHON_VERSION", "")
    requires = pyproject()["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{python}.0"), (
        f"{where}: ARG PYTHON_VERSION={python} is outside pyproject's requires-python {requires}"
    )


def test_dockerfile_command_and_user_fit_the_manifests():
    from llm_batch.cli import build_parser

    text = dockerfile()
    where = "deploy/docker/Dockerfile"
    scripts = pyproject()["project"]["scripts"]
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, flags=re.MULTILINE)
    assert cmd, f"{where}: no CMD in exec form"
    argv = json.loads(cmd.group(1))
    assert argv[0] in scripts, f"{where}: CMD runs {argv[0]!r}, not a pyproject console script"
    build_parser().parse_args(argv[1:])  # SystemExit here means the CLI refuses the CMD
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, flags=re.MULTILINE)
    assert user, f"{where}: USER should be numeric (uid:gid) so runAsNonRoot can check it"
    gid = int(user.group(2) or user.group(1))
    problems = []
    for pod in pods():
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
        if fs_group != gid:
            problems.append(
                pod.at(f"spec.securityContext.fsGroup is {fs_group}, the image runs as gid {gid}")
            )
    assert not problems, "\n".join(problems)


# -- storage ----------------------------------------------------------------------------------


def test_one_rwx_claim_mounted_at_one_path_everywhere(service_settings: Settings):
    """One claim, mounted at the same path on every pod, and the service's data directory
    on it (the drivers read job specs there)."""
    pvc = only("PersistentVolumeClaim")
    modes = pvc.body["spec"].get("accessModes") or []
    assert "ReadWriteMany" in modes, pvc.at(
        f"spec.accessModes is {modes}: engines on several nodes write one output folder"
    )
    mount = str(shared_volume())
    data_dir = service_path(service_settings, "LLM_BATCH_DATA_DIR")
    problems = []
    if not on(data_dir, shared_volume()):
        problems.append(
            service_pod().container_at(
                service_container(),
                f"env LLM_BATCH_DATA_DIR {data_dir} is not on the volume {pvc.name!r} "
                f"(mounted at {mount})",
            )
        )
    for pod in pods():
        volumes = pod.spec.get("volumes") or []
        claims = {
            v["name"]: v["persistentVolumeClaim"].get("claimName")
            for v in volumes
            if "persistentVolumeClaim" in v
        }
        for volume, claim in claims.items():
            if claim != pvc.name:
                problems.append(
                    pod.at(
                        f"spec.volumes[{volume}].persistentVolumeClaim.claimName is {claim!r}, "
                        f"the claim is {pvc.name!r} (storage.yaml)"
                    )
                )
        data_volumes = [v for v, c in claims.items() if c == pvc.name]
        if not data_volumes:
            problems.append(pod.at(f"spec.volumes: the claim {pvc.name!r} is not mounted"))
            continue
        for c in pod.containers():
            mounts = [m for m in c.get("volumeMounts") or [] if m.get("name") in data_volumes]
            paths = sorted({m.get("mountPath") for m in mounts})
            if paths != [mount]:
                problems.append(
                    pod.container_at(
                        c,
                        f"volumeMounts of {pvc.name!r} are at {paths}, the service mounts it "
                        f"at {mount} (service.yaml)",
                    )
                )
    assert not problems, "\n".join(problems)


# -- environment and Settings ---------------------------------------------------------------


def test_settings_variables_are_settings_fields():
    known = settings_env_names()
    problems = []
    for pod in pods():
        for c in pod.containers():
            for e in env_list(c):
                name = e["name"]
                if is_settings_like(name) and name not in known and name not in PENDING_SETTINGS:
                    problems.append(
                        pod.container_at(
                            c, f"env {name} is not a field of llm_batch.service.settings.Settings"
                        )
                    )
    assert not problems, "\n".join(problems) + f"\n(Settings reads: {', '.join(sorted(known))})"


def test_pending_settings():
    """Variables the deployment already sets for settings still being written."""
    known = settings_env_names()
    landed = sorted(set(PENDING_SETTINGS) & known)
    assert not landed, (
        f"{', '.join(landed)} now exist in Settings: remove them from PENDING_SETTINGS in "
        "tests/deploy/test_manifests.py"
    )
    used = {e["name"] for e in env_list(service_container())}
    unused = sorted(set(PENDING_SETTINGS) - used)
    assert not unused, f"PENDING_SETTINGS lists {unused}, which service.yaml does not set"
    if PENDING_SETTINGS:
        pytest.xfail(
            "service.yaml sets variables Settings does not read yet: "
            + "; ".join(f"{k} ({v})" for k, v in sorted(PENDING_SETTINGS.items()))
        )


def test_service_serves_on_the_port_the_service_and_probes_use(service_settings: Settings):
    from llm_batch.service.api.routes.health import router

    pod, container = service_pod(), service_container()
    problems = []
    if service_settings.host in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            pod.container_at(
                container,
                f"env LLM_BATCH_HOST={service_settings.host}: "
                "probes and the Service cannot reach a loopback address",
            )
        )
    ports = [int(p["containerPort"]) for p in container.get("ports") or []]
    if ports != [service_settings.port]:
        problems.append(
            pod.container_at(
                container, f"ports {ports} but LLM_BATCH_PORT is {service_settings.port}"
            )
        )
    routes = {getattr(r, "path", None) for r in router.routes}
    # /readyz needs an API key, so its probe is an exec that sends the first key.
    ready = " ".join((container.get("readinessProbe") or {}).get("exec", {}).get("command", []))
    if "/readyz" not in ready or "LLM_BATCH_API_KEYS" not in ready or "/readyz" not in routes:
        problems.append(
            pod.container_at(container, "readinessProbe must call /readyz with an API key")
        )
    for probe, path in (("livenessProbe", "/healthz"),):
        get = (container.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or path not in routes:
            problems.append(
                pod.container_at(
                    container,
                    f"{probe}.httpGet.path is {get.get('path')!r}, the service answers {path}",
                )
            )
        port = container_port(container, get.get("port", ""))
        if port != service_settings.port:
            problems.append(
                pod.container_at(
                    container,
                    f"{probe}.httpGet.port {get.get('port')!r} is "
                    f"{port}, LLM_BATCH_PORT is {service_settings.port}",
                )
            )
    svc = only("Service")
    for i, p in enumerate(svc.body["spec"].get("ports") or []):
        target = container_port(container, p.get("targetPort", p.get("port")))
        if target != service_settings.port or int(p["port"]) != service_settings.port:
            problems.append(
                svc.at(
                    f"spec.ports[{i}] is port {p['port']} → targetPort "
                    f"{p.get('targetPort')!r} ({target}); LLM_BATCH_PORT is "
                    f"{service_settings.port}"
                )
            )
    assert not problems, "\n".join(problems)


def test_service_selects_the_service_pods_only():
    deployment = only("Deployment")
    pod = service_pod()
    problems = []
    match = deployment.body["spec"]["selector"].get("matchLabels") or {}
    if not match or any(pod.labels.get(k) != v for k, v in match.items()):
        problems.append(
            deployment.at(
                f"spec.selector.matchLabels {match} does not match the pod labels {pod.labels}"
            )
        )
    svc = only("Service")
    selector = svc.body["spec"].get("selector") or {}
    if not selector or any(pod.labels.get(k) != v for k, v in selector.items()):
        problems.append(
            svc.at(
                f"spec.selector {selector} does not select {deployment.name}'s pods {pod.labels}"
            )
        )
    for other in pods():
        if other.role != "service" and all(other.labels.get(k) == v for k, v in selector.items()):
            problems.append(
                svc.at(
                    f"spec.selector {selector} also selects Ray pods "
                    f"({other.at('metadata.labels')})"
                )
            )
    # The scheduler in the service is the only one that may start jobs.
    if deployment.body["spec"].get("replicas", 1) != 1:
        problems.append(deployment.at("spec.replicas must be 1: one scheduler"))
    if (deployment.body["spec"].get("strategy") or {}).get("type") != "Recreate":
        problems.append(deployment.at("spec.strategy.type must be Recreate: never two schedulers"))
    assert not problems, "\n".join(problems)


def test_service_command_is_the_cli_serve(service_settings: Settings):
    from llm_batch.cli import build_parser

    pod, container = service_pod(), service_container()
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    where = pod.container_at(container, "command")
    assert argv and argv[0] in pyproject()["project"]["scripts"], (
        f"{where}: {argv} does not run a pyproject console script"
    )
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve", f"{where}: {argv} is not `llm-batch serve`"
    workdir = PurePosixPath(container.get("workingDir") or "/")
    assert on(workdir, shared_volume()), (
        f"{pod.container_at(container, 'workingDir')} is {workdir}: relative paths of submitted "
        f"jobs resolve there, it should be on the shared volume ({shared_volume()})"
    )


def service_cluster(settings: Settings) -> Cluster:
    """The RayCluster whose head the service's Ray address names."""
    where = service_pod().container_at(service_container(), "env RAY_ADDRESS")
    address = settings.ray_address
    assert address, f"{where}: not set; the service would start a Ray head of its own"
    host = (urlsplit(address).hostname or "").split(".")[0]
    found = [c for c in clusters() if c.doc.kind == "RayCluster" and c.head_service == host]
    assert found, (
        f"{where}: {address!r} names no RayCluster's head service (KubeRay names it "
        f"<RayCluster name>-head-svc: "
        f"{[c.head_service for c in clusters() if c.doc.kind == 'RayCluster']})"
    )
    return found[0]


def test_shared_roots_are_the_volume_every_ray_pod_mounts(service_settings: Settings):
    """With RAY_ADDRESS the service is in cluster mode: it takes local job paths only under
    LLM_BATCH_SHARED_ROOTS and does not start unless its data directory is under one. Each
    shared root must be on the claim every pod mounts at the same path."""
    from llm_batch.service.errors import SettingsError

    container = service_container()
    where = service_pod().container_at(container, "env LLM_BATCH_SHARED_ROOTS")
    try:
        service_settings.check_cluster_storage()
    except SettingsError as e:
        pytest.fail(f"{where}: the service would not start: {e}")
    volume = shared_volume()
    raw = literal_env(container).get("LLM_BATCH_SHARED_ROOTS", "")
    problems = [
        f"{where}: {root!r} is not on the shared volume mounted at {volume} on every pod"
        for root in (r.strip() for r in raw.split(","))
        if root and not on(root, volume)
    ]
    assert not problems, "\n".join(problems)


def test_storage_roots_are_on_the_volume_beside_the_data_dir(service_settings: Settings):
    """A job of a key that is not an admin's may name no path in the service's data
    directory (other keys' jobs and files are there): its inputs, models and outputs
    need storage roots on the shared volume outside it."""
    container = service_container()
    where = service_pod().container_at(container, "env LLM_BATCH_STORAGE_ROOTS")
    data_dir = service_path(service_settings, "LLM_BATCH_DATA_DIR")
    volume = shared_volume()
    raw = literal_env(container).get("LLM_BATCH_STORAGE_ROOTS", "")
    roots = [r.strip() for r in raw.split(",") if r.strip()]
    assert roots, (
        f"{where}: not set, so the data directory {data_dir} is the only storage root and an "
        "ordinary API key can name no input at all"
    )
    problems = []
    for root in roots:
        if "://" in root:
            continue  # object storage
        if not PurePosixPath(root).is_absolute():
            problems.append(f"{where}: {root!r} should be absolute (Settings resolves it here)")
        elif not on(root, volume):
            problems.append(f"{where}: {root!r} is not on the shared volume ({volume})")
        elif on(root, data_dir):
            problems.append(
                f"{where}: {root!r} is inside the data directory {data_dir}, where a key that "
                "is not an admin's may name no path"
            )
    assert not problems, "\n".join(problems)


def test_ray_address_is_the_head_dashboard(service_settings: Settings):
    where = service_pod().container_at(service_container(), "env RAY_ADDRESS")
    cluster = service_cluster(service_settings)
    address = str(service_settings.ray_address)
    url = urlsplit(address)
    assert url.scheme == "http", (
        f"{where}: {address!r} should be the dashboard URL http://HEAD:PORT"
    )
    host = (url.hostname or "").split(".")
    k = next(d for d in all_docs() if d.kind == "Kustomization")
    if len(host) > 1:
        assert host[1] == k.body.get("namespace"), (
            f"{where}: {address!r} is in namespace {host[1]!r}, kustomization.yaml deploys to "
            f"{k.body.get('namespace')!r}"
        )
    head = cluster.head["template"]["spec"]["containers"][0]
    dashboard = container_port(head, "dashboard")
    assert url.port == dashboard, (
        f"{where}: port {url.port}, but {cluster.doc.at(cluster.path)} head's 'dashboard' "
        f"containerPort is {dashboard}"
    )


def test_models_file_is_the_mounted_catalog(service_settings: Settings):
    models = service_path(service_settings, "LLM_BATCH_MODELS")
    catalog = catalog_models(service_settings)
    assert catalog, f"{models}: the models file names no model"
    problems = []
    for name, block in catalog.items():
        try:
            ModelSpec.model_validate(block)
        except Exception as e:
            problems.append(f"service.yaml ConfigMap {models.name}: {name}: {e}")
    assert not problems, "\n".join(problems)


def catalog_models(settings: Settings) -> dict[str, Any]:
    """The models file the service reads, from the ConfigMap mounted where it points."""
    pod, container = service_pod(), service_container()
    path = service_path(settings, "LLM_BATCH_MODELS")
    volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        if PurePosixPath(mount["mountPath"]) != path.parent:
            continue
        config_map = (volumes.get(mount["name"]) or {}).get("configMap") or {}
        doc = find("ConfigMap", str(config_map.get("name")))
        assert doc is not None, pod.at(
            f"spec.volumes[{mount['name']}].configMap.name {config_map.get('name')!r} is no "
            "ConfigMap in deploy/kuberay"
        )
        data = doc.body.get("data") or {}
        assert path.name in data, doc.at(f"data has no key {path.name!r} (LLM_BATCH_MODELS={path})")
        return yaml.safe_load(data[path.name]) or {}
    raise AssertionError(
        pod.container_at(
            container,
            f"volumeMounts: nothing is mounted at {path.parent} (LLM_BATCH_MODELS={path})",
        )
    )


# -- the Ray clusters -----------------------------------------------------------------------------


def test_head_ports_and_start_params():
    problems = []
    for c in clusters():
        params = c.head_start_params
        head = c.head["template"]["spec"]["containers"][0]
        at = c.doc.at(f"{c.path}.headGroupSpec")
        gcs, dashboard = container_port(head, "gcs-server"), container_port(head, "dashboard")
        if params.get("port", "6379") != str(gcs):
            problems.append(
                f"{at}: rayStartParams.port {params.get('port')} but the "
                f"'gcs-server' containerPort is {gcs}"
            )
        if params.get("dashboard-port", "8265") != str(dashboard) or dashboard != 8265:
            problems.append(
                f"{at}: rayStartParams.dashboard-port {params.get('dashboard-port')} "
                f"and the 'dashboard' containerPort {dashboard} should both be 8265"
            )
        if params.get("dashboard-host") != "0.0.0.0":
            problems.append(
                f"{at}: rayStartParams.dashboard-host should be 0.0.0.0 so the Jobs "
                "API answers other pods"
            )
        if params.get("num-gpus", "0") != "0":
            problems.append(f"{at}: the head should declare num-gpus 0 (CPU head)")
        limits = (head.get("resources") or {}).get("limits") or {}
        if GPU_RESOURCE in limits:
            problems.append(f"{at}: the head asks for {GPU_RESOURCE}")
    assert not problems, "\n".join(problems)


def test_gpu_workers_declare_their_gpus_and_accelerator():
    problems = []
    for c in clusters():
        groups = c.worker_groups()
        if not groups:
            problems.append(c.doc.at(f"{c.path}.workerGroupSpecs: no GPU worker group"))
        for group, raw in zip(groups, c.groups, strict=True):
            container = raw["template"]["spec"]["containers"][0]
            resources = container.get("resources") or {}
            for section in ("limits", "requests"):
                gpus = (resources.get(section) or {}).get(GPU_RESOURCE)
                if section == "requests" and gpus is None:
                    continue  # Kubernetes copies limits into requests
                if gpus is None or int(gpus) != group.num_gpus:
                    problems.append(
                        f"{group.at}: resources.{section}[{GPU_RESOURCE}] is {gpus}, "
                        f"rayStartParams.num-gpus is {group.num_gpus}"
                    )
            if group.num_gpus < 1:
                problems.append(f"{group.at}: rayStartParams.num-gpus should be at least 1")
            accels = [k for k in group.resources if _is_accel(k)]
            if len(accels) != 1:
                problems.append(
                    f"{group.at}: rayStartParams.resources should declare one "
                    f"{ACCELERATOR_PREFIX}<T> resource, has {accels}"
                )
            replicas = int(raw.get("replicas", group.min_replicas))
            if not group.min_replicas <= replicas <= group.max_replicas:
                problems.append(
                    f"{group.at}: replicas {replicas} is outside minReplicas "
                    f"{group.min_replicas} .. maxReplicas {group.max_replicas}"
                )
            if group.max_replicas < max(group.min_replicas, 1):
                problems.append(
                    f"{group.at}: maxReplicas {group.max_replicas} is below "
                    f"minReplicas {group.min_replicas} (or 0)"
                )
    assert not problems, "\n".join(problems)


def model_fit_problems(model: ModelSpec, cluster: Cluster, where: str) -> list[str]:
    """Whether the cluster can ever hold the engine pool a model block asks for."""
    groups = cluster.worker_groups()
    accel = model.accelerator_type
    eligible = [g for g in groups if accel is None or accel in g.accelerator_types]
    if accel is not None and not eligible:
        offered = sorted({t for g in groups for t in g.accelerator_types})
        return [
            f"{where}: accelerator_type {accel!r}, but {cluster.doc.at(cluster.path)} "
            f"offers {offered}"
        ]
    problems = []
    gpus = model.engine.gpus_per_replica
    per_node = max((g.num_gpus for g in eligible), default=0)
    if model.placement_strategy == "STRICT_PACK" and gpus > per_node:
        problems.append(
            f"{where}: a replica needs {gpus} GPUs on one node (STRICT_PACK), the "
            f"largest eligible worker has {per_node}"
        )
    fits = sum(g.max_replicas * (g.num_gpus // gpus) for g in eligible)
    wanted = model.replicas if isinstance(model.replicas, int) else model.replicas.max
    if wanted > fits:
        problems.append(
            f"{where}: up to {wanted} replicas of {gpus} GPU(s), but the eligible "
            f"worker groups hold at most {fits} at maxReplicas"
        )
    min_gpus = sum(g.min_replicas * g.num_gpus for g in groups)
    if model.device == "auto" and min_gpus == 0:
        problems.append(
            f"{where}: device 'auto' picks the engine from the GPUs present when "
            "the job starts; the worker groups can scale to zero GPUs: say device: gpu"
        )
    return problems


def test_catalog_models_fit_the_cluster(service_settings: Settings):
    cluster = service_cluster(service_settings)
    problems = []
    for name, block in catalog_models(service_settings).items():
        problems += model_fit_problems(
            ModelSpec.model_validate(block), cluster, f"service.yaml models file: {name}"
        )
    assert not problems, "\n".join(problems)


def test_max_replicas_fits_the_cluster(service_settings: Settings):
    """A fixed pool waits until all its engines are placed: the most replicas the service
    admits for a job's model should fit the worker groups (one GPU each) at maxReplicas."""
    cluster = service_cluster(service_settings)
    gpus = sum(g.max_replicas * g.num_gpus for g in cluster.worker_groups())
    where = service_pod().container_at(service_container(), "env LLM_BATCH_MAX_REPLICAS")
    assert service_settings.max_replicas <= gpus, (
        f"{where}: {service_settings.max_replicas}, but the worker groups of "
        f"{cluster.doc.at(cluster.path)} hold at most {gpus} GPUs at maxReplicas"
    )


# -- the RayJob ---------------------------------------------------------------------------------


def rayjob_file(doc: Doc) -> tuple[str, list[str], dict[str, Any]]:
    """The RayJob's driver module, its arguments, and the job file it runs (from its
    ConfigMap mounted on the RayJob's head)."""
    entry = shlex.split(doc.body["spec"]["entrypoint"])
    where = doc.at("spec.entrypoint")
    assert entry[:2] in (["python", "-m"], ["python3", "-m"]), f"{where}: {entry} is not python -m"
    module, args = entry[2], entry[3:]
    assert len(args) == 1, f"{where}: the driver takes one job file, got {args}"
    job_path = PurePosixPath(args[0])
    head = doc.body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes") or []}
    for mount in head["containers"][0].get("volumeMounts") or []:
        if PurePosixPath(mount["mountPath"]) != job_path.parent:
            continue
        name = ((volumes.get(mount["name"]) or {}).get("configMap") or {}).get("name")
        config_map = find("ConfigMap", str(name))
        assert config_map is not None, doc.at(
            f"spec.rayClusterSpec.headGroupSpec: volume {mount['name']} names ConfigMap "
            f"{name!r}, which deploy/kuberay does not define"
        )
        data = config_map.body.get("data") or {}
        assert job_path.name in data, config_map.at(
            f"data has no key {job_path.name!r} (the RayJob runs {job_path})"
        )
        return module, args, yaml.safe_load(data[job_path.name])
    raise AssertionError(f"{where}: nothing is mounted at {job_path.parent} on the RayJob's head")


def rayjobs() -> list[Doc]:
    return [d for d in manifests() if d.kind == "RayJob"]


def test_rayjob_runs_the_driver_on_a_valid_job(service_settings: Settings):
    assert rayjobs(), "deploy/kuberay has no RayJob example"
    volume = shared_volume()
    problems = []
    for doc in rayjobs():
        module, _, job = rayjob_file(doc)
        if importlib.util.find_spec(module) is None:
            problems.append(doc.at(f"spec.entrypoint: module {module} does not exist"))
        if module != "llm_batch.pipeline.driver":
            problems.append(doc.at(f"spec.entrypoint runs {module}, not llm_batch.pipeline.driver"))
        spec = JobSpec.from_dict(job, source=doc.at("job file"))
        paths = {"input.path": spec.input.path, "output.path": spec.output_path}
        for field, model in spec.named_models():
            paths[f"{field}.path"] = model.path
        for field, path in paths.items():
            if "://" not in path and not on(path, volume):
                problems.append(
                    doc.at(f"job file {field} {path!r} is not on the shared volume ({volume})")
                )
        cluster = next(c for c in clusters() if c.doc == doc)
        for field, model in spec.named_models():
            problems += model_fit_problems(model, cluster, doc.at(f"job file {field}"))
    assert not problems, "\n".join(problems)


# -- the walkthrough ------------------------------------------------------------------------------


def test_readme_creates_what_the_manifests_reference():
    text = README.read_text(encoding="utf-8")
    problems = []
    k = next(d for d in all_docs() if d.kind == "Kustomization")
    namespace = k.body.get("namespace")
    if f"kubectl create namespace {namespace}" not in text:
        problems.append(
            f"deploy/README.md: no `kubectl create namespace {namespace}` "
            "(kustomization.yaml namespace)"
        )
    if "kubectl apply -k deploy/kuberay" not in text:
        problems.append("deploy/README.md: no `kubectl apply -k deploy/kuberay`")
    for pod in pods():
        for c in pod.containers():
            for e in env_list(c):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if not ref:
                    continue
                if f"kubectl create secret generic {ref['name']}" not in text:
                    problems.append(
                        f"deploy/README.md: never creates the Secret {ref['name']} "
                        f"({pod.container_at(c, 'env ' + e['name'])})"
                    )
                elif f"--from-literal={ref['key']}=" not in text:
                    problems.append(
                        f"deploy/README.md: the Secret {ref['name']} is created "
                        f"without its key {ref['key']!r}"
                    )
    svc = only("Service")
    port = svc.body["spec"]["ports"][0]["port"]
    if f"svc/{svc.name} {port}:{port}" not in text:
        problems.append(f"deploy/README.md: no port-forward of svc/{svc.name} {port}:{port}")
    for doc in rayjobs():
        if doc.name not in text:
            problems.append(f"deploy/README.md: never mentions the RayJob {doc.name}")
    assert not problems, "\n".join(problems)


def walkthrough_jobs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The jobs deploy/README.md submits to the service: its YAML job files and the JSON
    bodies it POSTs to /v1/jobs with curl."""
    jobs = []
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and {"input", "prompt"} <= set(data):
            jobs.append(("deploy/README.md: the job file", data))
    for body in re.findall(r"-X POST \S+/v1/jobs .*?-d '(\{.*?\})'", text, flags=re.DOTALL):
        jobs.append(("deploy/README.md: the curl request", json.loads(body)))
    return jobs


def test_the_walkthrough_job_is_admitted_for_an_ordinary_key(service_settings: Settings):
    """The walkthrough's API key (step 4) is not an admin's: the service, as service.yaml
    configures it, must take the job of step 8 from it, and that job must read the dataset
    step 7 copies to the volume (outside the service's data directory)."""
    from llm_batch.errors import LLMBatchError
    from llm_batch.service.catalog import ModelCatalog
    from llm_batch.service.validation import Admission, check_job

    text = README.read_text(encoding="utf-8")
    jobs = walkthrough_jobs(text)
    assert {where for where, _ in jobs} == {
        "deploy/README.md: the job file",
        "deploy/README.md: the curl request",
    }, "deploy/README.md: step 8 should show the job file and the same job sent with curl"
    assert all(job == jobs[0][1] for _, job in jobs), (
        "deploy/README.md: the curl request and the job file are not the same job"
    )
    workdir = Path(str(service_container().get("workingDir") or "/"))
    admission = Admission.from_settings(
        service_settings,
        catalog=ModelCatalog(catalog_models(service_settings)),
        base=workdir,
        admin=False,
    )
    data_dir = service_path(service_settings, "LLM_BATCH_DATA_DIR")
    copied = re.findall(r'kubectl cp \S+\s+"llm-batch/\$POD:(\S+)"', text)
    problems = [
        f"deploy/README.md: step 7 copies into the service's data directory: {dest}"
        for dest in copied
        if on(dest, data_dir)
    ]
    for where, job in jobs:
        try:
            spec = check_job(job, admission)
        except LLMBatchError as e:
            problems.append(f"{where}: the service refuses it from an ordinary API key: {e}")
            continue
        if spec.input.path not in copied:
            problems.append(
                f"{where}: input.path {spec.input.path!r} is not a file step 7 copies to the "
                f"volume ({', '.join(copied)})"
            )
    assert not problems, "\n".join(problems)
