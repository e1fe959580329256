"""The cluster files: cluster.yaml passes Ray's own checks, k8s/rayjob.yaml has what KubeRay requires."""

from __future__ import annotations

import copy
import importlib
import json
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    return ray_dep.split("==")[1]


def test_cluster_yaml_validates_against_rays_schema(cluster):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_passes_ray_up_preparation(cluster):
    """What `ray up` does before it contacts the cloud: merge provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_is_cpu_only_and_gpu_workers_have_8_gpus(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    (gpu_type,) = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert gpu_type["resources"]["GPU"] == 8
    assert 0 <= gpu_type["min_workers"] <= gpu_type["max_workers"] <= cluster["max_workers"]


def test_setup_installs_the_checkout_that_ray_up_copies(cluster):
    (remote,) = [r for r, local in cluster["file_mounts"].items() if local == "."]
    install = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert install and f"cd {remote}" in install[0] and "-e ." in install[0]
    assert ".gitignore" in cluster["rsync_filter"]  # .venv/, out/ and runs/ stay on the laptop


def test_cluster_and_rayjob_images_run_the_pinned_ray(cluster, rayjob):
    tag = f"{pinned_ray_version()}-py311"
    images = [cluster["docker"]["head_image"], cluster["docker"]["worker_image"]]
    spec = rayjob["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        images += [c["image"] for c in group["template"]["spec"]["containers"]]
    assert all(image.startswith(f"rayproject/ray:{tag}") for image in images), images
    assert spec["rayVersion"] == pinned_ray_version() == ray.__version__


def test_rayjob_has_the_fields_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python jobs/")
    yaml.safe_load(spec["runtimeEnvYAML"])  # KubeRay passes it to Ray as YAML
    cluster_spec = spec["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    for group in cluster_spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_rayjob_entrypoint_is_accepted_by_its_job(rayjob):
    """The manifest's command line parses with the job's own parser (no stale or misspelt flags)."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    module = importlib.import_module(argv[1].removesuffix(".py").replace("/", "."))
    _, unknown = module.build_parser().parse_known_args(argv[2:])
    assert unknown == []
