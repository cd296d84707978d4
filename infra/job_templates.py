"""Derive lsaq's work-pool job templates from Prefect's defaults, and render them for validation.

    prefect work-pool get-default-base-job-template --type kubernetes > /tmp/k8s.json   (needs prefect-kubernetes)
    python infra/job_templates.py derive kubernetes /tmp/k8s.json > infra/work-pools/kubernetes-gpu.json
    prefect work-pool get-default-base-job-template --type docker > /tmp/docker.json    (needs prefect-docker)
    python infra/job_templates.py derive docker /tmp/docker.json > infra/work-pools/docker-gpu.json
    python infra/job_templates.py render kubernetes infra/work-pools/kubernetes-gpu.json   (the Job a worker submits)
    python infra/job_templates.py render docker infra/work-pools/docker-gpu.json           (docker-py's host config)

    prefect work-pool create lsaq-k8s --type kubernetes --base-job-template infra/work-pools/kubernetes-gpu.json

What changes from Prefect's default: the image defaults to lsaq's CUDA image; each flow-run pod requests
``gpu_count`` NVIDIA GPUs (default 1), CPU and memory (defaults sized for one model in memory at a time), and runs
one model-loading stage at a time (``LSAQ_MODEL_SLOTS=1``); the lsaq cache is a pod volume; the Job's ``completions``/``parallelism`` sit in the Job spec (the default puts them in the
pod spec, which the Kubernetes schema rejects).
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

IMAGE = "lsaq:cuda"
CACHE = "/var/cache/lsaq"
LSAQ_ENV = {"LSAQ_MODEL_SLOTS": "1", "LSAQ_CACHE": CACHE, "PREFECT_LOGGING_EXTRA_LOGGERS": "lsaq"}


def derive_kubernetes(default: dict[str, Any]) -> dict[str, Any]:
    t = copy.deepcopy(default)
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    props["env"]["default"] = dict(LSAQ_ENV)
    props["gpu_count"] = {"title": "GPUs", "type": "integer", "minimum": 0, "default": 1,
                          "description": "NVIDIA GPUs per flow run (nvidia.com/gpu); 0 for a CPU pool."}
    # A flow run loads one model at a time: for a 7-8B model in float that is ~30 GB of host memory at load.
    for name, value in (("cpu_request", "2"), ("cpu_limit", "8"), ("memory_request", "16Gi"), ("memory_limit", "48Gi")):
        props[name]["default"] = value
    job = t["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    for key in ("completions", "parallelism"):  # Job fields, not pod fields
        job["spec"][key] = pod.pop(key)
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["volumeMounts"] = [{"name": "lsaq-cache", "mountPath": CACHE}]
    pod["volumes"] = [{"name": "lsaq-cache", "emptyDir": {}}]
    return t


def derive_docker(default: dict[str, Any]) -> dict[str, Any]:
    t = copy.deepcopy(default)
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    props["env"]["default"] = dict(LSAQ_ENV)
    props["container_create_kwargs"]["default"] = {
        "device_requests": [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]}
    return t


def render_kubernetes(template: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest the Kubernetes worker (prefect-kubernetes) submits for a flow run, every variable at its
    default."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}

    async def fill() -> dict[str, Any]:
        cfg = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
        cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="lsaq-validate", flow_id=uuid.uuid4()))
        return cfg.job_manifest

    manifest = asyncio.run(fill())
    manifest["metadata"].setdefault("name", "lsaq-validate")  # the worker uses generateName; validators want a name
    return manifest


def render_docker(template: dict[str, Any]) -> dict[str, Any]:
    """The host config docker-py builds from the Docker worker's configuration (GPU device requests included)."""
    import asyncio

    from docker.types import HostConfig
    from prefect_docker.worker import DockerWorkerJobConfiguration

    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    cfg = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, values))
    return json.loads(json.dumps(HostConfig(version="1.41", **cfg.container_create_kwargs)))  # plain JSON types


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "derive" and argv[1] in ("kubernetes", "docker"):
        with open(argv[2]) as f:
            default = json.load(f)
        derived = derive_kubernetes(default) if argv[1] == "kubernetes" else derive_docker(default)
        print(json.dumps(derived, indent=2, sort_keys=True))
        return 0
    if len(argv) == 3 and argv[0] == "render" and argv[1] in ("kubernetes", "docker"):
        import yaml

        with open(argv[2]) as f:
            template = json.load(f)
        rendered = render_kubernetes(template) if argv[1] == "kubernetes" else render_docker(template)
        print(yaml.safe_dump(rendered, sort_keys=False))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
