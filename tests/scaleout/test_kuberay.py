"""raycluster/: KubeRay manifests valid in structure, and in step with the project and each other.

Kubernetes' own kinds (ConfigMap, Secret, the pod templates inside the Ray CRs) are checked
against Kubernetes' OpenAPI schemas shipped by ``kubernetes-validate``; the KubeRay fields,
which no installable schema covers, are checked by hand.
"""

from __future__ import annotations

import re
import shlex
from importlib.metadata import version
from pathlib import Path

import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "raycluster"
DOCKERFILE = MANIFESTS / "Dockerfile"
K8S_VERSION = kubernetes_validate.latest_version()
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def one(kind: str) -> dict:
    found = by_kind(kind)
    assert len(found) == 1, f"expected one {kind} in raycluster/, found {len(found)}"
    return found[0]


def cluster_specs() -> dict[str, dict]:
    return {
        "RayCluster": one("RayCluster")["spec"],
        "RayJob.rayClusterSpec": one("RayJob")["spec"]["rayClusterSpec"],
    }


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) of the head and every worker group of a cluster spec."""
    return [("head", spec["headGroupSpec"])] + [
        (f"worker group {g['groupName']}", g) for g in spec["workerGroupSpecs"]
    ]


def ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the pod's first container.
    return group["template"]["spec"]["containers"][0]


def dockerfile() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def project_version() -> str:
    return version("clusterattack")


def constraint_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1]
    raise KeyError(package)


def test_kinds_and_names():
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["ConfigMap", "RayCluster", "RayJob", "Secret"], kinds
    for doc in documents():
        expected = "ray.io/v1" if doc["kind"].startswith("Ray") else "v1"
        assert doc["apiVersion"] == expected, f"{doc['kind']}: apiVersion {doc['apiVersion']}"
        assert DNS_LABEL.match(doc["metadata"]["name"]), doc["metadata"]["name"]


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret"])
def test_core_kinds_match_kubernetes_schema(kind):
    kubernetes_validate.validate(one(kind), K8S_VERSION, strict=True)


@pytest.mark.parametrize("where", sorted(cluster_specs()))
def test_pod_templates_match_kubernetes_schema(where):
    for name, group in groups(cluster_specs()[where]):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": group["template"],
        }
        try:
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where} {name}: {exc}") from exc


def test_schema_check_is_real():
    """The same validation refuses a misspelt container field."""
    group = cluster_specs()["RayCluster"]["headGroupSpec"]
    broken = yaml.safe_load(yaml.safe_dump(group["template"]))
    broken["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagee"):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": broken},
            K8S_VERSION,
            strict=True,
        )


def test_rayjob_runs_the_paper_sweep_on_the_same_cluster_spec():
    job = one("RayJob")["spec"]
    assert shlex.split(job["entrypoint"]) == ["python", "jobs/sweep.py", "--preset", "paper"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    # One cluster definition: the RayJob's own cluster is the RayCluster's spec, verbatim.
    assert job["rayClusterSpec"] == one("RayCluster")["spec"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    workdir = [line.split(None, 1)[1] for line in dockerfile() if line.startswith("WORKDIR")]
    assert runtime_env["working_dir"] == workdir[-1]


@pytest.mark.parametrize("where", sorted(cluster_specs()))
def test_cluster_structure(where):
    spec = cluster_specs()[where]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["workerGroupSpecs"], "no worker group"
    for name, group in groups(spec):
        params = group.get("rayStartParams", {})
        # KubeRay's rayStartParams is a map of strings.
        assert all(isinstance(v, str) for v in params.values()), f"{name}: {params}"
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers), name
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        assert group["maxReplicas"] >= 1
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0", "the head should not take trials"
    ports = {g.get("rayStartParams", {}).get("metrics-export-port") for _, g in groups(spec)}
    assert len(ports) == 1 and None not in ports, f"metrics ports {ports}"
    (port,) = ports
    for name, group in groups(spec):
        named = {p["name"]: p["containerPort"] for p in ray_container(group).get("ports", [])}
        assert str(named.get("metrics")) == port, f"{name}: container port 'metrics' vs {port}"


@pytest.mark.parametrize("where", sorted(cluster_specs()))
def test_gpu_resources_agree(where):
    spec = cluster_specs()[where]
    gpu_groups = 0
    for name, group in groups(spec):
        resources = ray_container(group)["resources"]
        limits, requests = resources["limits"], resources.get("requests", {})
        gpus = int(limits.get("nvidia.com/gpu", 0))
        # Kubernetes needs extended resources requested exactly as limited.
        assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, f"{name}: {resources}"
        params = group.get("rayStartParams", {})
        assert int(params.get("num-gpus", gpus)) == gpus, f"{name}: num-gpus vs {gpus} GPUs"
        if name != "head":
            assert float(params.get("num-cpus", limits["cpu"])) == float(limits["cpu"]), name
        if gpus:
            gpu_groups += 1
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), name
    head_limits = ray_container(spec["headGroupSpec"])["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    assert gpu_groups >= 1, "no worker group asks for a GPU"


def test_image_agrees_with_project_and_dockerfile():
    images = {
        ray_container(group)["image"]
        for spec in cluster_specs().values()
        for _, group in groups(spec)
    }
    assert len(images) == 1, f"one image for every Ray container, got {sorted(images)}"
    tag = images.pop().rsplit(":", 1)[1]
    assert tag.startswith(f"{project_version()}-ray{ray.__version__}-"), tag
    lines = dockerfile()
    base = [line.split()[1] for line in lines if line.startswith("FROM")]
    assert len(base) == 1 and base[0].startswith(f"rayproject/ray:{ray.__version__}-"), base
    assert re.search(r"-(gpu|cu\d+)$", base[0]), f"{base[0]} is not a GPU image"
    runs = [line for line in lines if line.startswith("RUN")]
    torch = [r for r in runs if re.search(r"pip install .*\btorch==", r)]
    assert torch and re.search(r"torch==(\S+)", torch[0]).group(1) == constraint_pin("torch")
    assert "torch.version.cuda" in torch[0], "the image must refuse a CPU build of torch"
    install = [r for r in runs if "-e ." in r]
    assert install and "-c constraints.txt" in install[0]
    assert runs.index(torch[0]) < runs.index(install[0])


def test_build_context_holds_only_what_the_image_copies():
    ignore = [
        line.strip()
        for line in (MANIFESTS / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the context should start from nothing (no .venv, data, secrets)"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in dockerfile():
        if line.startswith("COPY"):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            copied.update(w.rstrip("/") for w in words[:-1])
    assert copied == allowed, f"COPY {sorted(copied)} but context allows {sorted(allowed)}"
    for path in copied:
        assert (ROOT / path).exists(), path


def test_environment_comes_from_the_configmap_and_secret():
    config_maps = {d["metadata"]["name"]: d for d in by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in by_kind("Secret")}
    for where, spec in cluster_specs().items():
        for name, group in groups(spec):
            refs = ray_container(group).get("envFrom", [])
            cm = [r["configMapRef"]["name"] for r in refs if "configMapRef" in r]
            sec = [r["secretRef"]["name"] for r in refs if "secretRef" in r]
            assert cm and set(cm) <= set(config_maps), f"{where} {name}: ConfigMaps {cm}"
            assert sec and set(sec) <= set(secrets), f"{where} {name}: Secrets {sec}"
    settings = one("ConfigMap")["data"]
    assert settings["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert settings["AWS_DEFAULT_REGION"]
    credentials = one("Secret")["stringData"]
    assert set(credentials) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("REPLACE_") for v in credentials.values()), "placeholders only"
    source = "\n".join(p.read_text() for p in (ROOT / "clusterattack").rglob("*.py"))
    for key in [*settings, *credentials]:
        assert key in source or key.startswith("AWS_"), f"{key} is read by nothing"
