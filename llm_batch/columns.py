"""Column names the pipeline reserves, in one place.

Output columns are part of the product's contract (users' scripts read them);
internal columns start with ``__llm_batch_`` and never reach the output.
"""

from __future__ import annotations

__all__ = [
    "EMBEDDING",
    "DROPPED",
    "DROPPED_BY",
    "ERROR",
    "FINISH_REASON",
    "GENERATED_TEXT",
    "INPUT_ERROR",
    "INTERNAL_PREFIX",
    "LABEL",
    "MESSAGES",
    "NUM_INPUT_TOKENS",
    "NUM_OUTPUT_TOKENS",
    "OUTPUT_COLUMNS",
    "LOGPROBS",
    "PAIR",
    "PARSED",
    "PROBS",
    "PROMPT",
    "REASONING_TEXT",
    "RENDER_ERROR",
    "ROW_ID",
    "SAMPLE_INDEX",
    "SCORE",
    "TASK_COLUMNS",
    "model_column",
]

# Every output row's stable id: which input file (sorted) × 2**40 + its row in
# that file. Written first; it is what resuming after a fault keys on.
ROW_ID = "row_id"

# Output columns appended after the carryover columns, in this order.
GENERATED_TEXT = "generated_text"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
FINISH_REASON = "finish_reason"
ERROR = "error"
OUTPUT_COLUMNS = (GENERATED_TEXT, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS, FINISH_REASON, ERROR)

# A pooling model's columns instead (model.task embed, classify, score).
EMBEDDING = "embedding"  # fixed_size_list<float32>[D]
PROBS = "probs"  # list<float32>, in the order of the model's id2label
LABEL = "label"  # the top class's name
SCORE = "score"  # float32
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "embed": (EMBEDDING, NUM_INPUT_TOKENS, ERROR),
    "classify": (LABEL, PROBS, NUM_INPUT_TOKENS, ERROR),
    "score": (SCORE, NUM_INPUT_TOKENS, ERROR),
}

# Present only when a job asks for n > 1 samples per prompt.
SAMPLE_INDEX = "sample_index"
# Present only for a model with a `reasoning_parser`: its reasoning, apart from the answer.
REASONING_TEXT = "reasoning_text"
# Present only when a JSON-schema job asks for `structured.parse`.
PARSED = "parsed"
# Present only when a job asks for `sampling.logprobs`.
LOGPROBS = "logprobs"

# Present only in a job with stages: the stage where the row stopped (its keep_if said
# no, or a model of it failed the row); null for a row that went through every stage.
DROPPED_BY = "dropped_by"

INTERNAL_PREFIX = "__llm_batch_"
# The rendered prompt (completion jobs) or rendered messages (chat jobs).
PROMPT = INTERNAL_PREFIX + "prompt"
MESSAGES = INTERNAL_PREFIX + "messages"
# The rendered second text of a score job's pair.
PAIR = INTERNAL_PREFIX + "pair"
# Why a row's prompt could not be rendered; the engine skips such rows.
RENDER_ERROR = INTERNAL_PREFIX + "render_error"
# DROPPED_BY on its way through the stages (the engines skip rows that have one).
DROPPED = INTERNAL_PREFIX + "dropped_by"
# Why an input line could not be read (bad JSON, not UTF-8, wrong field count).
INPUT_ERROR = INTERNAL_PREFIX + "input_error"


def model_column(model_name: str | None, column: str) -> str:
    """The output column name for one model's output in a multi-model job.

    A single-model job (``model_name is None``) keeps the plain names; a
    multi-model job writes ``<model>__generated_text`` and so on.
    """
    return column if model_name is None else f"{model_name}__{column}"
