"""cluster.yaml against Ray's own cluster-config schema, and its security promises."""
import copy
import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema():
    config = load()
    validate_config(config)                            # ray/autoscaler/ray-schema.json + Ray's checks
    validate_config(prepare_config(copy.deepcopy(config)))  # merged with Ray's AWS defaults, as `ray up` does
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}             # the head runs the driver and MLflow, no trials
    assert workers and all(t["max_workers"] > t.get("min_workers", 0) for t in workers)  # autoscaling
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU workers


def test_only_ssh_is_open_to_the_internet():
    config = load()
    group = config["provider"]["security_group"]
    # Ray's AWS provider adds SSH (22) and intra-cluster traffic; nothing else may be added.
    for rule in group.get("IpPermissions", []):
        assert rule.get("FromPort") == rule.get("ToPort") == 22, rule
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-host=0.0.0.0" not in head_start
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    host = re.search(r"--host (\S+(?: \| \S+)*)", mlflow).group(0)
    assert "hostname -I" in mlflow and "0.0.0.0" not in mlflow, host  # the head's private address


def test_setup_installs_requirements_and_syncs_data():
    config = load()
    setup = " ".join(config["setup_commands"])
    assert "-r ~/htnet/requirements.txt" in setup
    mounts = config["file_mounts"]
    assert mounts["/home/ubuntu/htnet"] == "."
    assert any("data" in remote and local.startswith("./data") for remote, local in mounts.items())
    assert "MLFLOW_TRACKING_URI" in " ".join(config["head_setup_commands"])


def test_the_local_simulation_differs_from_cluster_yaml_only_in_its_provider():
    aws, local = load(), yaml.safe_load((CLUSTER_YAML.parent / "cluster-local.yaml").read_text())
    assert local["provider"]["type"] == "fake_multinode" and aws["provider"]["type"] == "aws"
    aws.pop("provider"), local.pop("provider")
    assert local == aws   # node types, resources (GPUs stated), autoscaling, idle timeout, commands
    workers = local["available_node_types"]["gpu_worker"]
    assert workers["resources"] == {"CPU": 4, "GPU": 1}   # the simulation's workers are these
    # Ray's fake provider names its head ray.head.default: the AWS file uses that name too
    assert local["head_node_type"] == "ray.head.default"
    validate_config(yaml.safe_load((CLUSTER_YAML.parent / "cluster-local.yaml").read_text()))
