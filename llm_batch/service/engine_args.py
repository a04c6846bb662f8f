"""The vLLM engine arguments a submitted job may set: a policy of the service.

Engine arguments reach vLLM unchanged, and some make it import or run code the
submitter names, open paths outside the storage roots, or replace what the job's
own fields chose; only the allowlist below (and the operator's additions,
``LLM_BATCH_ALLOWED_ENGINE_ARGS``) passes admission (``validation.py``).
"""

from __future__ import annotations

__all__ = ["SAFE_ENGINE_ARGS"]

# The ``vllm.EngineArgs`` fields a submitted job may set in ``model.engine.extra_args``
# unless the operator allows more (LLM_BATCH_ALLOWED_ENGINE_ARGS): tuning that takes
# numbers, flags or names from vLLM's own registries, and names no path, host, class,
# plugin or hub repository of code. ``a.b`` allows key ``b`` of the mapping ``a`` only:
# ``structured_outputs_config`` also holds ``reasoning_parser_plugin``, a file vLLM
# imports. Left out on purpose, among others: trust_remote_code, code_revision,
# worker_cls, worker_extension_cls, model_impl, hf_overrides, model_class_overrides,
# logits_processors, scheduler_cls, io_processor_plugin, reasoning_parser_plugin,
# distributed_executor_backend (import paths or remote code); model, tokenizer,
# hf_config_path, download_dir, load_format, model_loader_extra_config,
# generation_config, speculative_config, allowed_local_media_path, log_config_file
# (paths and other models); hf_token (the service's credentials); compilation_config,
# kv_transfer_config (custom passes and connectors by import path); data_parallel_*,
# master_addr/port (processes and ports beyond the engine's placement).
SAFE_ENGINE_ARGS = frozenset(
    {
        # scheduling and batching
        "max_num_batched_tokens",
        "long_prefill_token_threshold",
        "enable_chunked_prefill",
        "async_scheduling",
        # the KV cache
        "block_size",
        "kv_cache_dtype",
        "enable_prefix_caching",
        "num_gpu_blocks_override",
        "cpu_offload_gb",
        "disable_sliding_window",
        "disable_cascade_attn",
        # CUDA graphs
        "max_cudagraph_capture_size",
        "cudagraph_capture_sizes",
        # weights and tokenizer, by registry name or hub revision
        "quantization",
        "tokenizer_mode",
        "revision",
        "tokenizer_revision",
        "enable_expert_parallel",
        # logprobs
        "max_logprobs",
        "logprobs_mode",
        # structured outputs (prompts/review-records.yaml uses these)
        "structured_outputs_config.backend",
        "structured_outputs_config.disable_any_whitespace",
        "structured_outputs_config.disable_additional_properties",
    }
)
