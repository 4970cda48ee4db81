"""Thread-local hand-over of token counts from an in-process LM engine to the trace callback."""

import logging
import threading

logger = logging.getLogger(__name__)

_local = threading.local()


def set_usage(prompt_tokens: int, completion_tokens: int, cache_hit: bool = False) -> None:
    """Store the token counts of the LM call that the current thread is serving.

    DSPy runs an LM engine's ``complete`` and the callback's ``on_lm_end`` in the
    same thread for synchronous calls, so ``TraceCallback`` picks the counts up
    with ``pop_usage``. A second call before the pop replaces the first counts.
    """
    _local.usage = {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "cache_hit": bool(cache_hit),
    }


def pop_usage() -> dict | None:
    """Remove and return the counts set in this thread, or None when none are set."""
    usage = getattr(_local, "usage", None)
    _local.usage = None
    return usage
