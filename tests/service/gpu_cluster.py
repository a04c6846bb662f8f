"""A Ray cluster of two nodes on this machine, for a service in cluster mode; run as
``python -m tests.service.gpu_cluster`` in its own process.

The head has CPUs only and the dashboard (Ray's Jobs API); the second node declares
one logical GPU, so engine pools that ask for a GPU (``device: gpu``) can only run
there, one at a time. Prints ``GPU-CLUSTER {"dashboard": URL}`` once up, then waits
until its standard input closes, and shuts the cluster down.
"""

from __future__ import annotations

import json
import sys

from llm_batch.service.process import free_port


def main() -> int:
    from ray.cluster_utils import Cluster

    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "num_gpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            # Ports of their own: another Ray on this machine (the session's local one)
            # holds the defaults, and a head whose agent cannot bind takes no Ray jobs.
            "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(),
            "ray_client_server_port": free_port(),
        },
    )
    cluster.add_node(num_cpus=2, num_gpus=1, metrics_export_port=free_port())
    cluster.wait_for_nodes()
    print("GPU-CLUSTER " + json.dumps({"dashboard": f"http://127.0.0.1:{port}"}), flush=True)
    try:
        sys.stdin.read()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
