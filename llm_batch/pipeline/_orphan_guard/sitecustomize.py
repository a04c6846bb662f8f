"""Imported at start-up by the processes an engine actor spawns (vLLM's EngineCore and its
workers): they exit when their parent dies.

A process killed with SIGKILL cannot stop its children, and vLLM's engine core
outlives a killed Ray actor, holding memory and CPU. Each spawned process
watches its parent and kills itself once it has been re-parented. Only active
with ``LLM_BATCH_EXIT_WITH_PARENT=1``, which the engine stage sets.
"""

import os
import signal
import threading
import time

if os.environ.get("LLM_BATCH_EXIT_WITH_PARENT") == "1":
    _parent = os.getppid()

    def _watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != _parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=_watch, daemon=True, name="llm-batch-orphan-guard").start()
