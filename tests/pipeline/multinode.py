"""A multi-node Ray cluster on this machine, running one job; prints a JSON report.

Run as ``python -m tests.pipeline.multinode MODEL OUT_DIR``, in its own process (a
process can be connected to one Ray cluster only). Nodes: a CPU-only head, an
A10 node and three H100 nodes (logical GPUs; the engines are vLLM's CPU build).
The job asks for two H100 replicas; mid-job the node of one engine is removed,
and Ray restarts that engine on the spare H100 node.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 1000


def main(model: str, out_dir: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.run import run_job

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": list(range(ROWS)), "text": [f"item {i}" for i in range(ROWS)]}),
        root / "in.parquet",
        row_group_size=100,
    )
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 0})
    nodes = {
        "a10": cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A10": 1}),
        "h100-1": cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1}),
        "h100-2": cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1}),
        "h100-3": cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1}),
    }
    ray.init(address=cluster.address)
    ids = {name: n.node_id for name, n in nodes.items()}
    spec = JobSpec.from_dict(
        {
            "name": "multinode",
            "input": {"path": str(root / "in.parquet")},
            "prompt": {"template": "{{ text }}:"},
            "model": {
                "path": model,
                "engine": {"max_model_len": 256, "dtype": "bfloat16", "enforce_eager": True},
                "replicas": 2,
                "accelerator_type": "H100",
                "batch_size": 16,
            },
            "sampling": {"max_tokens": 24, "ignore_eos": True},
            "carryover": ["id"],
            "output": {"path": str(root / "out"), "rows_per_file": 32},
        }
    )
    removed: list[str] = []
    concurrent: set[str] = set()
    lock = threading.Lock()

    def on_progress(snap: dict) -> None:
        with lock:
            live = {e["node_id"] for e in snap.get("engines", [])}
            if len(live) >= 2 and not removed:
                concurrent.update(live)
            # Once both replicas have answered, take one's node away.
            if not removed and len(live) >= 2 and snap["rows_done"] >= 96:
                victim = next(n for n, i in ids.items() if i in live)
                removed.append(victim)
                threading.Thread(
                    target=cluster.remove_node,
                    args=(nodes[victim],),
                    kwargs={"allow_graceful": False},
                ).start()

    started = time.time()
    result = run_job(spec, on_progress=on_progress, progress_interval=0.5)
    table = pq.read_table(root / "out")
    report = {
        "rows": table.num_rows,
        "ids": sorted(table.column("id").to_pylist()),
        "errors": table.num_rows - table.column("error").null_count,
        "engines": result.progress["engines"],
        "node_ids": ids,
        "removed": removed,
        "concurrent_nodes": sorted(concurrent),
        "seconds": round(time.time() - started, 1),
    }
    print("MULTINODE-REPORT " + json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
