"""The ``llm-batch`` command: its parser and its error handling.

Errors a user can fix print as one line on stderr with exit code 2; anything else
as one line with exit code 1, the traceback in the run's log (``terminal.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llm_batch.cli import run, service
from llm_batch.cli.terminal import terminal
from llm_batch.errors import LLMBatchError

__all__ = ["build_parser", "main"]

DESCRIPTION = "Offline LLM batch generation on Ray Data and vLLM."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-batch", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_commands(sub)
    service.add_commands(sub)
    from llm_batch.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def _log_hint() -> None:
    if terminal.log_path is not None:
        terminal.error(f"llm-batch: the full log is {terminal.log_path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LLMBatchError as e:
        terminal.error(f"llm-batch: error: {e}")
        _log_hint()
        return 2
    except KeyboardInterrupt:
        terminal.error("llm-batch: interrupted")
        return 130
    except Exception as e:
        if terminal.log_path is None:
            raise
        logging.getLogger("llm_batch").exception("llm-batch failed")
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        terminal.error(f"llm-batch: error: {type(e).__name__}: {first}".rstrip(": "))
        _log_hint()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
