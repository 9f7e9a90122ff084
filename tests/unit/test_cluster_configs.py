"""The cluster configs parse, carry the fields their tools require, and run a command our CLI accepts."""

import shlex
from pathlib import Path

import yaml

from rlhf_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster_configs"


def check_entrypoint(cmd: str) -> None:
    """`python -m rlhf_ray train CONFIG [k=v ...]` with a config that loads with those overrides."""
    argv = shlex.split(cmd)
    assert argv[:4] == ["python", "-m", "rlhf_ray", "train"], argv
    config, overrides = argv[4], argv[5:]
    assert all("=" in o for o in overrides), overrides
    load_config(ROOT / config, overrides)


def test_ray_cluster_launcher_yaml():
    cfg = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))]
    assert gpu_types, "at least one GPU node type"
    for t in types.values():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(t)
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def _pod_gpus(template: dict) -> int:
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def test_kuberay_raycluster():
    doc = yaml.safe_load((CONFIGS / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    workers = spec["workerGroupSpecs"]
    assert workers and all(_pod_gpus(w["template"]) > 0 for w in workers)
    assert all(w["groupName"] and w["replicas"] >= 1 for w in workers)


def test_kuberay_rayjob_runs_our_cli():
    doc = yaml.safe_load((CONFIGS / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    check_entrypoint(spec["entrypoint"])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert all(_pod_gpus(w["template"]) > 0 for w in spec["rayClusterSpec"]["workerGroupSpecs"])


def test_launcher_comment_commands_use_existing_configs():
    """Configs named in the files' usage comments exist and load (the comments are documentation)."""
    for path in CONFIGS.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if "launch/submit.py" in line:
                args = shlex.split(line.lstrip("# "))
                config = next(a for a in args if a.startswith("examples/"))
                load_config(ROOT / config)
