"""Rows grouped by prompt prefix before the engines (``run.group_by_prefix``), and what
Serve's prefix-aware router is given of a batch (``pool.PrefixHint``)."""

from __future__ import annotations

import pyarrow as pa

from llm_batch import columns
from llm_batch.pipeline.generation import BatchInputs
from llm_batch.pipeline.pool import PrefixHint, router_config
from llm_batch.pipeline.run import group_by_prefix

FEW_SHOT = {"a": "Examples A: 1 2 3. Q: ", "b": "Examples B: x y z. Q: "}


def test_rows_sharing_a_prefix_end_side_by_side_and_failed_ones_last():
    groups = ["a", "b", None, "a", "b", "a"]
    prompts = [None if g is None else FEW_SHOT[g] + f"q{i}" for i, g in enumerate(groups)]
    block = pa.table(
        {
            columns.ROW_ID: list(range(6)),
            columns.PROMPT: pa.array(prompts, pa.string()),
            columns.RENDER_ERROR: [None, None, "template error", None, None, None],
        }
    )
    out = group_by_prefix(block)
    assert out.column(columns.ROW_ID).to_pylist() == [0, 3, 5, 1, 4, 2]
    # Every row kept, each with its own columns.
    assert sorted(out.to_pylist(), key=lambda r: r[columns.ROW_ID]) == block.to_pylist()


def test_chat_rows_group_by_their_messages():
    system = {"role": "system", "content": "Label it."}
    messages = [
        [system, {"role": "user", "content": "zebra"}],
        [{"role": "system", "content": "Other."}, {"role": "user", "content": "ant"}],
        [system, {"role": "user", "content": "ant"}],
    ]
    block = pa.table({columns.ROW_ID: [0, 1, 2], columns.MESSAGES: messages})
    assert group_by_prefix(block).column(columns.ROW_ID).to_pylist() == [2, 0, 1]


def test_the_hint_is_the_first_prompt():
    text = BatchInputs(
        [None, "Examples A: q1", "Examples B"], [None] * 3, [None] * 3, [0] * 3, [None] * 3
    )
    assert PrefixHint.of(text).prompt == "Examples A: q1"
    chat = BatchInputs(
        [None],
        [[{"role": "user", "content": "hi"}, {"role": "user", "content": "!"}]],
        [None],
        [0],
        [None],
    )
    assert PrefixHint.of(chat).prompt == "hi!"
    assert PrefixHint.of(BatchInputs([None], [None], ["error"], [0], [None])).prompt == ""


def test_only_a_generating_pool_of_several_replicas_routes_by_prefix():
    model = {"task": "generate", "replicas": 1, "max_batches_in_flight": 4}
    assert router_config(model) is None
    assert router_config({**model, "replicas": {"min": 1, "max": 3}}) is not None
    routed = router_config({**model, "replicas": 2})
    assert routed is not None
    assert routed["request_router_class"].endswith("PrefixCacheAffinityRouter")
    assert routed["request_router_kwargs"]["imbalanced_threshold"] == 4
    assert router_config({**model, "replicas": 2, "task": "embed"}) is None


class _Replica:
    """A stand-in for ``EnginePool`` with its call's signature: says which replica answered."""

    def __init__(self) -> None:
        import os

        self.pid = os.getpid()

    async def generate(self, hint, inputs, sampling, job, alone):  # noqa: ANN001, ANN201
        return self.pid


def test_serves_router_keeps_a_prefix_on_one_replica(ray_local):
    """Ray Serve's real prefix-aware router, given our ``PrefixHint``, over two replicas:
    every batch of a prefix group goes to the same replica, and the groups spread over
    both. (The replicas are stand-ins: the routing is what is tested.)"""
    from ray import serve

    config = router_config({"task": "generate", "replicas": 2, "max_batches_in_flight": 4})
    app = serve.deployment(
        _Replica,
        name="EnginePool",
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=config,
    ).bind()
    serve.run(app, name="prefix-router-test", route_prefix=None)
    try:
        handle = serve.get_deployment_handle("EnginePool", app_name="prefix-router-test")
        seen: dict[str, set[int]] = {}
        for i in range(24):
            group = "ABCD"[i % 4]
            inputs = BatchInputs(
                [f"Examples {group}: " * 40 + f"question {i}"], [None], [None], [0], [None]
            )
            replica = handle.generate.remote(
                PrefixHint.of(inputs), inputs, {}, {"key": "job"}, False
            ).result(timeout_s=60)
            seen.setdefault(group, set()).add(replica)
        assert all(len(replicas) == 1 for replicas in seen.values()), seen
        assert len(set().union(*seen.values())) == 2, seen
    finally:
        serve.shutdown()  # the session's Ray as it was: no Serve controller left behind
