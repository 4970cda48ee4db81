"""Run a DSPy program over many examples in threads, with a progress bar and per-example errors."""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One example's result: the prediction, or the error that replaced it."""

    example: Any
    prediction: Any = None
    error: str | None = None


def run_parallel(
    function: Callable[[Any], Any],
    items: list,
    *,
    threads: int = 8,
    desc: str = "",
    show_progress: bool = True,
    on_result: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Call `function(item)` for every item in `threads` threads; results keep the input order.

    Each call runs in a copy of the caller's context, so DSPy settings and tracing context reach the
    worker threads. An exception is logged and kept as the outcome's `error`; it never stops the run.
    `on_result(outcome)` runs in the calling thread as soon as each item finishes, so a caller can
    save finished items before the rest are done. An exception from `on_result`, or Ctrl-C, stops
    the run: items not started yet are dropped, and the ones running finish before the raise.
    """
    from tqdm.auto import tqdm

    def call(item):
        try:
            return Outcome(item, prediction=function(item))
        except Exception as error:  # recorded per example; the caller decides what a failure means
            logger.warning("%s failed on %s: %s: %s", desc or "call", _item_id(item), type(error).__name__, error)
            return Outcome(item, error=f"{type(error).__name__}: {error}")

    outcomes: list[Outcome | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = {pool.submit(contextvars.copy_context().run, call, item): index for index, item in enumerate(items)}
        with tqdm(total=len(items), desc=desc, disable=not show_progress, unit="ex") as bar:
            try:
                for future in _as_completed(futures):
                    outcome = future.result()
                    outcomes[futures[future]] = outcome
                    if on_result is not None:
                        on_result(outcome)
                    bar.update(1)
            except BaseException:
                # Leaving the pool waits for its queue, so the items not started yet are cancelled first.
                for pending in futures:
                    pending.cancel()
                raise
    return outcomes  # type: ignore[return-value]


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)


def _item_id(item: Any) -> str:
    return str(getattr(item, "id", None) or (item.get("id") if isinstance(item, dict) else None) or "item")
