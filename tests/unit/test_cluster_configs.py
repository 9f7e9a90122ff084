"""The cluster configs parse, carry the fields their tools require, run a command our CLI accepts, turn on Ray's
token authentication and keep the dashboard off public addresses, and have labelled node groups that can hold the
job they run; node-aware placement plans (no cluster needed)."""

import itertools
import shlex
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import ConfigError, load_config, resolve
from rlhf_ray.controller.placement import (PlacementError, RoleRequest, check_plan, plan_placement,
                                           selector_matches)


ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster_configs"
POOL = "rlhf-ray/pool"


def load_command(cmd: str):
    """The config a `python -m rlhf_ray train CONFIG k=v ...` or `python launch/submit.py ... CONFIG k=v ...`
    line runs, loaded with its overrides."""
    argv = shlex.split(cmd)
    if argv[:4] == ["python", "-m", "rlhf_ray", "train"]:
        config, overrides = argv[4], argv[5:]
    else:
        assert argv[:2] == ["python", "launch/submit.py"], argv
        args = [a for i, a in enumerate(argv[2:], 2) if not a.startswith("--") and not argv[i - 1] == "--address"]
        config, overrides = args[0], args[1:]
    assert config.startswith("examples/") and all("=" in o for o in overrides), argv
    return load_config(ROOT / config, overrides)


def check_entrypoint(cmd: str):
    """`python -m rlhf_ray train CONFIG [k=v ...]` with a config that loads with those overrides."""
    assert shlex.split(cmd)[:4] == ["python", "-m", "rlhf_ray", "train"], cmd
    return load_command(cmd)


def comment_commands(path: Path) -> list[str]:
    return [line.lstrip("# ").strip() for line in path.read_text().splitlines()
            if line.startswith("#") and "launch/submit.py" in line]


def check_fits(cfg, nodes: list[tuple[dict, dict]]) -> None:
    """The job's plan (pools, strategies, node selectors) fits the cluster's nodes (resources, labels)."""
    plan = resolve(cfg).plan
    totals = {"GPU": sum(r.get("GPU", 0) for r, _ in nodes), "CPU": sum(r.get("CPU", 0) for r, _ in nodes)}
    check_plan(plan, totals, [r for r, _ in nodes], labeled_nodes=nodes)


def _pod_gpus(template: dict) -> int:
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def kuberay_nodes(spec: dict) -> list[tuple[dict, dict]]:
    """(resources, labels) of every pod the cluster starts with: the head (num-cpus 0) and `replicas` per group."""
    nodes = [({"CPU": float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 1))}, {})]
    for w in spec["workerGroupSpecs"]:
        limits = w["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": float(limits["cpu"]), "GPU": float(_pod_gpus(w["template"]))}
        nodes += [(res, dict(w.get("labels", {})))] * w["replicas"]
    return nodes


def test_ray_cluster_launcher_yaml():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(cfg))  # Ray's own schema, as `ray up` checks it first
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = {n: t for n, t in types.items() if t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))}
    assert gpu_types, "at least one GPU node type"
    for t in types.values():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(t)
    assert {t["labels"][POOL] for t in gpu_types.values()} == {"learner", "rollout"}
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    # Ray's token authentication on every node, the token shipped to every node, and the dashboard / Jobs API
    # bound to the head's loopback (reached by `ray dashboard`'s SSH port-forward), never a public address.
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all(shlex.split(c)[0] == "RAY_AUTH_MODE=token" for c in starts), starts
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    (head_start,) = [shlex.split(c) for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    hosts = [a.split("=", 1)[1] for a in head_start if a.startswith("--dashboard-host=")]
    assert hosts == ["127.0.0.1"], head_start  # Ray's default is loopback too; stated so nobody widens it by habit
    # The job its usage comment submits fits the nodes that exist at start (min_workers of each type).
    nodes = [(dict(types[cfg["head_node_type"]]["resources"]), {})]
    for t in gpu_types.values():
        nodes += [(dict(t["resources"]), dict(t["labels"]))] * t["min_workers"]
    (cmd,) = comment_commands(CONFIGS / "aws-gpu.yaml")
    check_fits(load_command(cmd), nodes)


def check_kuberay_security(spec: dict, text: str) -> None:
    """Token authentication on, and the dashboard (0.0.0.0 inside the head pod) behind an internal Service only,
    with a comment saying so."""
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP", "the head Service must stay internal (ClusterIP)"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0" and "ClusterIP" in text


def test_kuberay_raycluster():
    text = (CONFIGS / "kuberay-raycluster.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    check_kuberay_security(spec, text)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    workers = spec["workerGroupSpecs"]
    assert workers and all(_pod_gpus(w["template"]) > 0 for w in workers)
    assert all(w["groupName"] and w["replicas"] >= 1 for w in workers)
    assert {w["labels"][POOL] for w in workers} == {"learner", "rollout"}
    (cmd,) = comment_commands(CONFIGS / "kuberay-raycluster.yaml")
    check_fits(load_command(cmd), kuberay_nodes(spec))


def test_kuberay_rayjob_runs_our_cli():
    text = (CONFIGS / "kuberay-rayjob.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    check_kuberay_security(spec["rayClusterSpec"], text)
    cfg = check_entrypoint(spec["entrypoint"])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert all(_pod_gpus(w["template"]) > 0 for w in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.placement.node_selector == {"actor": {POOL: "learner"}, "rollout": {POOL: "rollout"}}
    check_fits(cfg, kuberay_nodes(spec["rayClusterSpec"]))
    # Move 4 GPUs from the learner pods to the rollout pods: still 16 in all, but the 8 learners no longer fit
    # on the nodes labelled learner (the check is not vacuous).
    for group, gpus in zip(spec["rayClusterSpec"]["workerGroupSpecs"], ("4", "12")):
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = gpus
    with pytest.raises(PlacementError, match=r"pool 'actor' \(8 x .*does not fit on the 1 node\(s\) labelled"):
        check_fits(cfg, kuberay_nodes(spec["rayClusterSpec"]))


def test_readme_placement_example():
    """The `placement:` block of the README's "Run on a cluster" loads, and on the launcher's two labelled node
    types puts the learners on the learner nodes and the engines on the rollout nodes."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    lines = section[section.index("    placement:\n"):].splitlines()
    block = [lines[0], *itertools.takewhile(lambda ln: ln.startswith("      "), lines[1:])]
    placement = yaml.safe_load("\n".join(ln[4:] for ln in block))["placement"]
    cfg = load_config(ROOT / "examples/grpo_7b_8gpu.yaml", values={f"placement.{k}": v for k, v in placement.items()})
    plan = resolve(cfg).plan
    assert {p.name: p.node_selector[POOL] for p in plan.pools} == {"actor": "learner", "rollout": "rollout"}
    assert {p.name: p.strategy for p in plan.pools} == {"actor": "PACK", "rollout": "SPREAD"}
    check_fits(cfg, [LEARNER, ROLLOUT])


# The README's cloud commands, verbatim: no cloud is reachable here, so what they take is checked instead.
CLOUD_COMMANDS = [
    "ray up cluster_configs/aws-gpu.yaml",
    "ray dashboard cluster_configs/aws-gpu.yaml",
    "ray down cluster_configs/aws-gpu.yaml",
    "kubectl apply -f cluster_configs/kuberay-raycluster.yaml",
    "kubectl port-forward svc/rlhf-ray-head-svc 8265:8265",
    "kubectl apply -f cluster_configs/kuberay-rayjob.yaml",
]


def test_readme_cloud_commands_take_these_files():
    """Each README cloud command names a file checked above, and that file's header documents the same line;
    the port-forward names the RayCluster's head service (KubeRay calls it <metadata.name>-head-svc) and a
    port its head container exposes as the dashboard."""
    readme = (ROOT / "README.md").read_text()
    for cmd in CLOUD_COMMANDS:
        assert f"    {cmd}\n" in readme, cmd
        for arg in shlex.split(cmd):
            if arg.startswith("cluster_configs/"):
                assert cmd in (ROOT / arg).read_text(), f"{arg}'s header does not document {cmd!r}"
    raycluster = yaml.safe_load((CONFIGS / "kuberay-raycluster.yaml").read_text())
    forward = shlex.split(CLOUD_COMMANDS[4])
    assert forward[2] == f"svc/{raycluster['metadata']['name']}-head-svc"
    ports = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"containerPort": int(forward[3].split(":")[1]), "name": "dashboard"} in ports


def test_launcher_comment_commands_use_existing_configs():
    """Commands in the files' usage comments name configs that exist and load with their overrides."""
    for path in CONFIGS.glob("*.yaml"):
        for cmd in comment_commands(path):
            load_command(cmd)


# ---- node-aware placement -------------------------------------------------------------------------------

LEARNER = ({"GPU": 8.0, "CPU": 96.0}, {POOL: "learner", "ray.io/node-id": "a"})
ROLLOUT = ({"GPU": 8.0, "CPU": 96.0}, {POOL: "rollout", "ray.io/node-id": "b"})


def test_selector_semantics():
    labels = {POOL: "rollout", "zone": "a"}
    assert selector_matches({POOL: "rollout"}, labels) and not selector_matches({POOL: "learner"}, labels)
    assert selector_matches({POOL: "in(learner, rollout)", "zone": "a"}, labels)
    assert selector_matches({POOL: "!learner"}, labels) and not selector_matches({POOL: "!rollout"}, labels)
    assert selector_matches({POOL: "!in(learner,critic)"}, labels)
    # A node without the label satisfies only negated forms.
    assert not selector_matches({"gpu": "h100"}, labels) and selector_matches({"gpu": "!h100"}, labels)


def test_plan_carries_selectors_and_strategies():
    reqs = [RoleRequest("actor", 2, 1), RoleRequest("reference", 2, 1), RoleRequest("rollout", 4, 1)]
    plan = plan_placement(reqs, [["actor", "reference"]], "PACK",
                          node_selector={"actor": {POOL: "learner"}, "rollout": {POOL: "rollout"}},
                          role_strategy={"rollout": "STRICT_SPREAD"})
    pools = {p.name: (p.strategy, p.node_selector) for p in plan.pools}
    # The reference shares the actor's pool, so it follows the actor's selector.
    assert pools == {"actor+reference": ("PACK", {POOL: "learner"}),
                     "rollout": ("STRICT_SPREAD", {POOL: "rollout"})}
    assert "pool rollout: 4 x {CPU=1, GPU=1} (STRICT_SPREAD) on nodes {rlhf-ray/pool=rollout} <- rollout" \
        in plan.describe()


def test_plan_selector_errors():
    reqs = [RoleRequest("actor", 2, 1), RoleRequest("reference", 2, 1)]
    with pytest.raises(PlacementError, match=r"colocated roles \['actor', 'reference'\] .* ask for "
                                             r"rlhf-ray/pool=a and rlhf-ray/pool=b"):
        plan_placement(reqs, [["actor", "reference"]], node_selector={"actor": {POOL: "a"}, "reference": {POOL: "b"}})
    with pytest.raises(PlacementError, match=r"different strategies \['PACK', 'SPREAD'\]"):
        plan_placement(reqs, [["actor", "reference"]], role_strategy={"actor": "PACK", "reference": "SPREAD"})
    with pytest.raises(PlacementError, match=r"placement.node_selector names role\(s\) \['rollout'\] but this "
                                             r"job's roles are \['actor', 'reference'\]"):
        plan_placement(reqs, node_selector={"rollout": {POOL: "rollout"}})


def test_check_plan_against_labelled_nodes():
    sel = {"actor": {POOL: "learner"}, "rollout": {POOL: "rollout"}}
    ok = plan_placement([RoleRequest("actor", 8, 1), RoleRequest("rollout", 8, 1)], node_selector=sel)
    check_plan(ok, {"GPU": 16, "CPU": 192}, labeled_nodes=[LEARNER, ROLLOUT])
    # Nobody carries the label: named before any actor starts, with the labels that do exist.
    gone = plan_placement([RoleRequest("actor", 1, 1)], node_selector={"actor": {POOL: "h100"}})
    with pytest.raises(PlacementError, match=r"no alive node has the labels \{rlhf-ray/pool=h100\} \(node labels "
                                             r"in this cluster: \{rlhf-ray/pool=learner\}, \{rlhf-ray/pool=rollout\}"):
        check_plan(gone, {"GPU": 16, "CPU": 192}, labeled_nodes=[LEARNER, ROLLOUT])
    # 9 actor GPUs on the one 8-GPU learner node: the cluster has 16 GPUs in all, but not where asked.
    big = plan_placement([RoleRequest("actor", 9, 1)], node_selector={"actor": {POOL: "learner"}})
    with pytest.raises(PlacementError, match=r"pool 'actor' \(9 x \{CPU=1, GPU=1\}, PACK\) does not fit on the 1 "
                                             r"node\(s\) labelled \{rlhf-ray/pool=learner\} \(8 fit"):
        check_plan(big, {"GPU": 16, "CPU": 192}, labeled_nodes=[LEARNER, ROLLOUT])
    # STRICT_SPREAD needs one node per bundle: 2 engines, 1 rollout node.
    spread = plan_placement([RoleRequest("rollout", 2, 1)], strategy="STRICT_SPREAD",
                            node_selector={"rollout": {POOL: "rollout"}})
    with pytest.raises(PlacementError, match=r"\(1 nodes hold one\)"):
        check_plan(spread, {"GPU": 16, "CPU": 192}, labeled_nodes=[LEARNER, ROLLOUT])
    check_plan(spread, {"GPU": 16, "CPU": 192}, labeled_nodes=[LEARNER, ROLLOUT, ROLLOUT])


@pytest.mark.parametrize("values, message", [
    ({"placement.node_selector": {"engine": {POOL: "x"}}}, "placement.node_selector: unknown role(s) ['engine']"),
    ({"placement.node_selector": {"rollout": "rollout"}}, "placement.node_selector.rollout: must be a mapping"),
    ({"placement.node_selector": {"rollout": {"bad key!": "x"}}}, "'bad key!' is not a valid label key"),
    ({"placement.node_selector": {"rollout": {POOL: "a b"}}}, "placement.node_selector.rollout.rlhf-ray/pool: 'a b'"),
    ({"placement.role_strategy": {"rollout": "SPRED"}}, "placement.role_strategy.rollout: must be one of"),
])
def test_placement_config_checks(values, message):
    with pytest.raises(ConfigError) as exc:
        load_config(values={"model.path": "m", **values})
    assert message in str(exc.value)


def test_node_selector_override_from_the_command_line():
    cfg = load_config(ROOT / "examples/sft_tiny_cpu.yaml", [f"placement.node_selector.learner.{POOL}=in(a,b)",
                                                            "placement.role_strategy.learner=STRICT_SPREAD"])
    assert cfg.placement.node_selector == {"learner": {POOL: "in(a,b)"}}
    assert cfg.placement.role_strategy == {"learner": "STRICT_SPREAD"}


def test_submit_leaves_credentials_out_of_the_upload_and_flags_secret_env(tmp_path):
    """launch/submit.py's excludes, through Ray's own matcher: .env files and keys stay home, the code goes."""
    import importlib.util

    from ray._private.runtime_env.packaging import _get_excludes

    spec = importlib.util.spec_from_file_location("submit", Path(__file__).resolve().parents[2] / "launch/submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    excluded = _get_excludes(tmp_path, submit.EXCLUDES)
    for rel in (".env", ".env.local", "examples/.env", "deploy/key.pem", ".aws/credentials", "conf/credentials.json"):
        assert excluded(tmp_path / rel), rel
    for rel in ("rlhf_ray/cli.py", "examples/grpo_tiny_cpu.yaml", "README.md", "launch/env.sh"):
        assert not excluded(tmp_path / rel), rel
    assert submit.secret_env_keys({"HF_TOKEN": "x", "WANDB_API_KEY": "y", "NCCL_DEBUG": "INFO"}) == \
        ["HF_TOKEN", "WANDB_API_KEY"]
