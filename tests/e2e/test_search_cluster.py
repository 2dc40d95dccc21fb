"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): trials run on both."""
import ray
from ray.cluster_utils import Cluster

from search.driver import runner
from search_fixtures import search_options, trial_runs, write_space


def test_trials_run_on_both_nodes(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        space = write_space(tmp_path / "nodes.yaml", num_samples=2, max_concurrent_trials=2, fixed={"epochs": 4})
        options = search_options(tmp_path, space, "nodes", address=cluster.address)
        summary = runner.run_search(options)
        assert summary["complete"] and summary["counts"] == {"finished": 2}
        runs = trial_runs(options.tracking_uri, "nodes")
        assert {r.data.tags["htnet.node_id"] for r in runs} == nodes  # one trial on each node
    finally:
        ray.shutdown()
        cluster.shutdown()
