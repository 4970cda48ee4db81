"""DSPy callback that records every LM call and knowledge-base retrieval in a TraceStore."""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dspy.utils.callback import BaseCallback

from nesycd.tracing.store import TraceStore, utc_now
from nesycd.tracing.usage import pop_usage

logger = logging.getLogger(__name__)

# The only LM settings copied into lm_calls.params. Everything else in an LM's kwargs
# (api_key, api_base, headers, ...) is never read.
TRACED_LM_PARAMS = ("temperature", "max_tokens", "stop")

# The span_id of the innermost module call in this thread. DSPy calls on_module_start and
# on_module_end around the module call in the caller's thread, and nesycd.parallel copies the
# context into its workers, so nested calls find their parent here.
_current_span: contextvars.ContextVar[str | None] = contextvars.ContextVar("nesycd_current_span", default=None)


@dataclass
class _OpenCall:
    """The state that on_*_start captured, kept until the matching on_*_end."""

    start: float
    stage: str | None
    stage_id: str | None = None
    row: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    name: str = ""
    started_at: Any = None
    token: contextvars.Token | None = None
    retriever: bool = False


class TraceCallback(BaseCallback):
    """Record one lm_calls row per LM call, one spans row per module call and one retrievals row per retriever call.

    The role is the LM's ``nesycd_role`` attribute ("unknown" when absent). Token counts come
    from ``nesycd.tracing.usage.pop_usage`` and are set only by engines that report them,
    and only for synchronous calls, whose engine and on_lm_end run in one thread.
    A module with the attribute ``nesycd_retriever = True`` is recorded as a retrieval;
    its output is a dspy.Prediction with ``ids``, ``scores``, ``passages``, ``k`` and ``inserted_ids``.
    """

    def __init__(self, store: TraceStore) -> None:
        super().__init__()
        self.store = store
        self._open: dict[str, _OpenCall] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ LM calls

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        # Counts left over from an engine call outside any LM call must not be credited to this one.
        pop_usage()
        row = {
            "call_id": call_id,
            "role": getattr(instance, "nesycd_role", "unknown"),
            "model": getattr(instance, "model", None),
            "messages": _messages_from_inputs(inputs),
            "params": _traced_params(instance, inputs),
            "thread": threading.current_thread().name,
            "span_id": _current_span.get(),
        }
        opened = _OpenCall(
            start=time.perf_counter(), stage=self.store.current_stage, stage_id=self.store.current_stage_id, row=row
        )
        with self._lock:
            self._open[call_id] = opened

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            opened = self._open.pop(call_id, None)
        if opened is None:
            logger.warning("LM call %s ended without a recorded start, so it is not traced", call_id)
            return
        row = dict(opened.row)
        row["stage"] = opened.stage
        row["stage_id"] = opened.stage_id
        row["latency_s"] = time.perf_counter() - opened.start
        row["output"] = _first_output_text(outputs)
        if exception is not None:
            row["error"] = f"{type(exception).__name__}: {exception}"

        usage = pop_usage() or _usage_from_response(outputs)
        if usage is not None:
            row["prompt_tokens"] = usage.get("prompt_tokens")
            row["completion_tokens"] = usage.get("completion_tokens")
            row["cache_hit"] = usage.get("cache_hit")
        self.store.record("lm_calls", row)

    # ------------------------------------------------------------------ retrievals

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        stage_id = self.store.current_stage_id
        retriever = getattr(instance, "nesycd_retriever", False) is True
        opened = _OpenCall(
            start=time.perf_counter(),
            stage=self.store.current_stage,
            stage_id=stage_id,
            inputs=_module_arguments(instance, inputs) if retriever else {},
            parent_id=_current_span.get() or stage_id,
            name=type(instance).__name__,
            started_at=utc_now(),
            retriever=retriever,
        )
        opened.token = _current_span.set(call_id)
        with self._lock:
            self._open[call_id] = opened

    def on_module_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            opened = self._open.pop(call_id, None)
        if opened is None:
            logger.warning("Module call %s ended without a recorded start, so it is not traced", call_id)
            return
        self._restore_parent_span(opened)
        seconds = time.perf_counter() - opened.start
        error = None if exception is None else f"{type(exception).__name__}: {exception}"
        self.store.record(
            "spans",
            {
                "span_id": call_id,
                "parent_id": opened.parent_id,
                "stage": opened.stage,
                "stage_id": opened.stage_id,
                "kind": "module",
                "name": opened.name,
                "started_at": opened.started_at,
                "seconds": seconds,
                "error": error,
            },
        )
        if opened.retriever:
            self._record_retrieval(call_id, opened, outputs, exception, seconds)

    @staticmethod
    def _restore_parent_span(opened: _OpenCall) -> None:
        try:
            _current_span.reset(opened.token)
        except ValueError:
            # The end ran in another context than the start (a caller that switched threads), so
            # the variable there is set explicitly to the parent's span.
            _current_span.set(opened.parent_id if opened.parent_id != opened.stage_id else None)

    def _record_retrieval(
        self, call_id: str, opened: _OpenCall, outputs: Any | None, exception: BaseException | None, seconds: float
    ) -> None:
        arguments = opened.inputs
        row: dict[str, Any] = {
            "retrieval_id": call_id,
            "span_id": call_id,
            "stage": opened.stage,
            "stage_id": opened.stage_id,
            "query": arguments.get("query"),
            "task": arguments.get("task"),
            "latency_s": seconds,
        }
        if exception is not None:
            row["error"] = f"{type(exception).__name__}: {exception}"
        k = _output_field(outputs, "k")
        if k is None:
            k = arguments.get("k")
        row["k"] = k
        if outputs is not None:
            row["hits"] = _hits(outputs)
            inserted = _output_field(outputs, "inserted_ids")
            row["inserted"] = list(inserted) if inserted is not None else []
            # Set by an adaptive retriever: whether it retrieved, and the student's confidence (0-100).
            row["retrieved"] = _output_field(outputs, "retrieved")
            row["confidence"] = _output_field(outputs, "confidence")
        self.store.record("retrievals", row)


# ---------------------------------------------------------------------- input and output readers


def _messages_from_inputs(inputs: dict[str, Any]) -> list | None:
    """Return the call's messages as a list of {role, content} dicts.

    A plain prompt becomes one user message. An explicit dspy.lm15.Request is converted
    from its system text and messages.
    """
    messages = inputs.get("messages")
    if messages is not None:
        return list(messages)
    prompt = inputs.get("prompt")
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "messages") and hasattr(prompt, "config"):
        return _request_messages(prompt)
    return [{"role": "user", "content": str(prompt)}]


def _request_messages(request: Any) -> list[dict[str, Any]]:
    converted = []
    system = getattr(request, "system", None)
    if system is not None:
        text = system if isinstance(system, str) else "".join(getattr(part, "text", "") or "" for part in system)
        converted.append({"role": "system", "content": text})
    for message in request.messages:
        text = getattr(message, "text", None)
        content = text if text is not None else [repr(part) for part in getattr(message, "parts", ())]
        converted.append({"role": getattr(message, "role", "user"), "content": content})
    return converted


def _traced_params(instance: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Return temperature, max_tokens and stop: call-time values over the LM's defaults."""
    prompt = inputs.get("prompt")
    config = getattr(prompt, "config", None) if not isinstance(prompt, str) else None
    if config is not None:
        return {name: getattr(config, name, None) for name in TRACED_LM_PARAMS}
    call_kwargs = inputs.get("kwargs") or {}
    defaults = getattr(instance, "kwargs", None) or {}
    params = {}
    for name in TRACED_LM_PARAMS:
        if name in call_kwargs:
            params[name] = call_kwargs[name]
        elif name in defaults:
            params[name] = defaults[name]
    return params


def _first_output_text(outputs: Any) -> str | None:
    """Return the text of the first completion, which is a string or a dict with "text"."""
    if outputs is None:
        return None
    if isinstance(outputs, (list, tuple)):
        if not outputs:
            return None
        first = outputs[0]
        if isinstance(first, dict):
            text = first.get("text")
            return None if text is None else str(text)
        return str(first)
    text = getattr(outputs, "text", None)
    if text is not None:
        return str(text)
    return str(outputs)


def _usage_from_response(outputs: Any) -> dict[str, Any] | None:
    """Return the token counts of a dspy.lm15.Response, the output of an explicit Request call, or None."""
    usage = getattr(outputs, "usage", None)
    if usage is None or isinstance(outputs, (list, tuple, dict)):
        return None
    prompt_tokens = getattr(usage, "input_tokens", None)
    completion_tokens = getattr(usage, "output_tokens", None)
    if prompt_tokens is None and completion_tokens is None:
        return None
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cache_hit": None}


def _module_arguments(instance: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Map a module call's positional and keyword arguments to the names of its forward()."""
    args = tuple(inputs.get("args") or ())
    kwargs = dict(inputs.get("kwargs") or {})
    try:
        # Read forward from the class: dspy.Module warns when an instance's forward is accessed outside __call__.
        bound = inspect.signature(type(instance).forward).bind_partial(instance, *args, **kwargs)
    except (TypeError, ValueError, AttributeError):
        logger.debug("Cannot bind the arguments of %s.forward, so only keyword arguments are traced",
                     type(instance).__name__)
        return kwargs
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(inspect.signature(type(instance).forward).parameters)), None)
    return arguments


def _output_field(outputs: Any, name: str) -> Any:
    if outputs is None:
        return None
    if isinstance(outputs, dict):
        return outputs.get(name)
    try:
        return getattr(outputs, name)
    except AttributeError:
        return None


def _hits(outputs: Any) -> list[dict[str, Any]]:
    """Return one {entry_id, score, rank} dict per retrieved entry, where rank 1 is the best hit."""
    ids = list(_output_field(outputs, "ids") or [])
    scores = list(_output_field(outputs, "scores") or [])
    hits = []
    for rank, entry_id in enumerate(ids, start=1):
        score = scores[rank - 1] if rank - 1 < len(scores) else None
        hits.append({"entry_id": entry_id, "score": None if score is None else float(score), "rank": rank})
    return hits
