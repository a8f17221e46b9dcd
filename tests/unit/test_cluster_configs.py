"""The shipped cluster configs: Ray's own validator, the KubeRay CRD fields, the Kubernetes
pod schema, secure defaults; and effray.cluster's storage check and runtime_env builder."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from effray.cluster import runtime_env
from effray.errors import EffrayError
from effray.storage import check_storage_for_cluster, local_path, nodes_not_seeing, storage_error

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
MANIFESTS = {"raycluster": ROOT / "cluster" / "raycluster.yaml", "rayjob": ROOT / "cluster" / "rayjob.yaml"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
GPU_FAMILIES = ("g", "p")  # AWS accelerated-computing families with NVIDIA GPUs


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _cluster_spec(name: str) -> dict:
    doc = _load(MANIFESTS[name])
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _containers(spec: dict) -> list[dict]:
    return [c for t in _templates(spec) for c in t["spec"]["containers"]]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3])


# ---------------------------------------------------------------- cluster.yaml (cluster launcher)


def test_cluster_yaml_passes_ray_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(CLUSTER_YAML)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching AWS
    broken = copy.deepcopy(config)
    broken["available_node_types"]["worker.gpu"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):  # the validator does bite
        validate_config(prepare_config(broken))


def test_cluster_yaml_is_a_cpu_head_and_1_to_8_gpu_workers():
    config = _load(CLUSTER_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert list(workers) == ["worker.gpu"]
    gpu = workers["worker.gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert (gpu["min_workers"], gpu["max_workers"]) == (1, 8)
    assert config["max_workers"] >= gpu["max_workers"]
    assert re.fullmatch(r"rayproject/ray:[\d.]+-py3\d+-(gpu|cu\d+)", config["docker"]["image"])


def test_cluster_yaml_keeps_dashboard_local_and_token_auth_on():
    text = CLUSTER_YAML.read_text()
    config = yaml.safe_load(text)
    assert "0.0.0.0" not in text
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # every node gets the token `ray get-auth-token --generate` wrote on the submitter's machine
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"\b\w*(KEY|TOKEN|SECRET|PASSWORD)\w*=", text, re.I)  # no secret set inline


def test_cluster_yaml_installs_effray_from_the_working_dir():
    config = _load(CLUSTER_YAML)
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert f"pip install --quiet {remote}" in config["setup_commands"]
    # synced without the venv and local data; anchored so effray/data (a package) still goes
    assert {".venv", "/data", "/runs"} <= set(config["rsync_exclude"])
    assert "data" not in config["rsync_exclude"]


def test_images_and_versions_match_the_installed_ray():
    tag = f"{ray.__version__}-py311-gpu"
    assert _load(CLUSTER_YAML)["docker"]["image"] == f"rayproject/ray:{tag}"
    assert f"FROM rayproject/ray:{tag}\n" in (ROOT / "cluster" / "Dockerfile").read_text()
    for name in MANIFESTS:
        assert _cluster_spec(name)["rayVersion"] == ray.__version__


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_has_the_fields_kuberay_requires(name):
    """Required fields of the ray.io/v1 CRD types (KubeRay v1.6-1.7 API reference):
    HeadGroupSpec.template, WorkerGroupSpec.groupName/minReplicas/maxReplicas/template,
    rayStartParams on both (required by older CRDs), AuthOptions.mode in {disabled, token}."""
    doc = _load(MANIFESTS[name])
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster": "RayCluster", "rayjob": "RayJob"}[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # DNS-1123 label
    spec = _cluster_spec(name)
    assert _version(spec["rayVersion"]) >= (2, 52, 0)  # token auth exists from Ray 2.52
    assert spec["authOptions"] == {"mode": "token", "secretName": "effray-ray-token"}
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a LoadBalancer
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and isinstance(group["rayStartParams"], dict)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] == 8
    (worker,) = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    for c in _containers(spec):
        assert c["name"] and c["image"]
        assert not any(p["containerPort"] == 10001 for p in c.get("ports", []))  # Ray Client stays closed
    if name == "raycluster":
        assert group["minReplicas"] == 1  # always multi-node, so the storage check applies


def _flags(entrypoint: str) -> dict[str, str]:
    words = entrypoint.split()
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def test_rayjob_runs_train_on_a_cluster_sized_for_it():
    job = _load(MANIFESTS["rayjob"])["spec"]
    assert job["entrypoint"].startswith("python /home/ray/effray/jobs/train.py ")  # the image's copy
    flags = _flags(job["entrypoint"])
    assert flags["--storage"].startswith("/mnt/effray/") and flags["--data"].startswith("/mnt/effray/")
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    # effray train checks the GPUs are there when it starts: the group starts them up front
    assert group["minReplicas"] == group["replicas"] == int(flags["--workers"])
    assert float(flags["--gpus-per-worker"]) == float(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert float(flags["--cpus-per-worker"]) < float(worker["resources"]["limits"]["cpu"])
    shipped = _load(RUNTIME_ENV)["env_vars"]
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"] == shipped
    assert job["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_pod_templates_pass_the_kubernetes_schema(name):
    """Each pod template, wrapped as a core/v1 PodTemplate, against Kubernetes' own OpenAPI
    schema in strict mode (unknown fields are errors), as `kubectl apply` would check it."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)"
    )
    for i, template in enumerate(_templates(_cluster_spec(name))):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        kubernetes_validate.validate(wrapped, "1.30.0", strict=True)
    bad = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "bad"},
        "template": {"spec": {"containers": [{"name": "x", "image": "y", "resources": {"limit": {}}}]}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):  # strict mode does bite
        kubernetes_validate.validate(bad, "1.30.0", strict=True)
    volume = _load(ROOT / "cluster" / "storage.yaml")
    kubernetes_validate.validate(volume, "1.30.0", strict=True)
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for t in _templates(_cluster_spec(name))
        for v in t["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {volume["metadata"]["name"]}


def test_rayjob_runs_the_same_cluster_as_raycluster():
    """Same images, auth, env, volumes and pod resources; only the worker count differs."""
    job, long_lived = copy.deepcopy(_cluster_spec("rayjob")), copy.deepcopy(_cluster_spec("raycluster"))
    for spec in (job, long_lived):
        for group in spec["workerGroupSpecs"]:
            del group["replicas"], group["minReplicas"]
    assert job == long_lived


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_secrets_come_from_kubernetes_secrets_never_literals(name):
    envs = [e for c in _containers(_cluster_spec(name)) for e in c.get("env", [])]
    wandb = [e for e in envs if e["name"] == "WANDB_API_KEY"]
    assert len(wandb) == len(_containers(_cluster_spec(name)))  # head and every worker
    for e in envs:
        if SECRET_NAME.search(e["name"]):
            assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"]


# ---------------------------------------------------------------- runtime_env


def test_runtime_env_is_valid_and_ships_the_code_not_the_venv_or_data():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    spec = _load(RUNTIME_ENV)
    RuntimeEnv(**spec)  # Ray's own validation of the fields
    assert spec["working_dir"] == "."
    assert not any(SECRET_NAME.search(k) for k in spec.get("env_vars", {}))
    excluded = _get_excludes(ROOT, spec["excludes"])
    for shipped in ("effray/data/prepare.py", "effray/cli.py", "jobs/prepare_data.py", "pyproject.toml"):
        assert not excluded(ROOT / shipped), shipped
    for dropped in (".venv/bin/python", "data/cifar/train.parquet", "runs/r1/checkpoint.pt", "wandb/run-1/x"):
        assert excluded(ROOT / dropped), dropped


def test_runtime_env_adds_passthrough_secrets_from_the_given_environment():
    before = RUNTIME_ENV.read_text()
    env = runtime_env(RUNTIME_ENV, {"WANDB_API_KEY": "k-123", "WANDB_PROJECT": "", "HOME": "/root"})
    assert env["env_vars"] == {**_load(RUNTIME_ENV)["env_vars"], "WANDB_API_KEY": "k-123"}
    assert env["working_dir"] == "." and RUNTIME_ENV.read_text() == before
    assert "WANDB_API_KEY" not in runtime_env(RUNTIME_ENV, {})["env_vars"]


# ---------------------------------------------------------------- shared-storage check


def test_local_path_tells_uris_from_paths(tmp_path):
    assert local_path("s3://bucket/runs") is None
    assert local_path("gs://bucket/runs") is None
    assert local_path(f"file://{tmp_path}") == tmp_path
    assert local_path("runs/x") == Path.cwd() / "runs" / "x"
    check_storage_for_cluster("s3://bucket/runs")  # a URI needs no Ray at all


def test_storage_error_is_one_line_that_names_the_fix():
    msg = storage_error("/home/me/runs", [f"{i:08d}abcdef" for i in range(5)], 6)
    assert "\n" not in msg and msg.startswith("--storage /home/me/runs ")
    assert "00000000, 00000001, 00000002 and 2 more" in msg
    assert "s3://" in msg and "NFS" in msg


def test_local_storage_passes_on_one_node_and_fails_when_a_node_cant_see_it(ray_session, tmp_path, monkeypatch):
    import effray.storage as storage

    check_storage_for_cluster(str(tmp_path / "runs"))  # the session's Ray is one node
    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    # the real probe: a zero-CPU task pinned to the node finds the marker the driver wrote
    assert nodes_not_seeing(tmp_path / "runs", [node]) == []
    assert not list((tmp_path / "runs").iterdir())  # the marker is removed again
    # two nodes where the second answers "not there" (what a node-local disk looks like)
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": node, "Alive": True}, {"NodeID": "f" * 56, "Alive": True}])
    monkeypatch.setattr(storage, "nodes_not_seeing", lambda path, nodes: nodes[1:])
    with pytest.raises(EffrayError, match=r"has 2 nodes and node\(s\) ffffffff can't see it"):
        check_storage_for_cluster(str(tmp_path / "runs"))


def test_relative_output_paths_are_refused_only_inside_a_ray_job(tmp_path):
    from effray.cluster import JOB_ENV_VAR, check_output_paths
    from effray.errors import EffrayError
    from effray.run import RunConfig
    from effray.train.config import TrainConfig

    job = {JOB_ENV_VAR: "{}"}
    check_output_paths(TrainConfig(storage="runs"), {})  # a local shell: relative is fine
    check_output_paths(TrainConfig(storage=str(tmp_path)), job)
    check_output_paths(TrainConfig(storage="s3://bucket/runs"), job)
    with pytest.raises(EffrayError, match=r"^--storage runs is a relative path, .* /mnt/effray/runs\) or s3://"):
        check_output_paths(TrainConfig(storage="runs"), job)
    with pytest.raises(EffrayError, match="--out runs/demo is a relative path"):  # the main job's default
        check_output_paths(RunConfig(), job)
