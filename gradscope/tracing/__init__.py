"""Tracing: model -> networkx graph, trying tracers from most to least static.

1. ``torch.fx.symbolic_trace`` (module-level graph, the user's source lines);
2. ``torch.export.export`` (aten-level; handles Hugging Face models and
   ``nn.TransformerEncoder``; module paths from ``nn_module_stack``);
3. a runtime graph recorded during one forward (data-dependent control flow).

Each failure is kept with its reason, so the report can say why the method
used was needed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gradscope.errors import GradscopeError, InputError, TraceError, model_error_hint
from gradscope.records import TraceAttempt

if TYPE_CHECKING:
    from torch import nn

    from gradscope.tracing.graph import TracedModel

# Nothing here imports torch at import time: the node records (gradscope.tracing.nodes)
# and the op tables (gradscope.tracing.ops) are read by the rule families and the
# report, which stay light; the tracers load torch when they run.


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's own loggers while tracers fail on purpose.

    ``torch.export`` logs whole graphs and guard warnings at WARNING level when
    it gives up on data-dependent code; the report already says why it failed.
    """
    # One setLevel on the "torch" logger (its children without a level of their own, and
    # those created while tracing, inherit it) and the ``disabled`` flag on the children
    # that exist: setLevel clears every logger's cache, so calling it on each of torch's
    # ~500 loggers twice per trace cost more than tracing a small model (issue 15).
    parent = logging.getLogger("torch")
    children = [lg for name, lg in list(logging.root.manager.loggerDict.items())
                if name.startswith("torch.") and isinstance(lg, logging.Logger)]
    level = parent.level
    disabled = [(lg, lg.disabled) for lg in children]
    try:
        parent.setLevel(logging.CRITICAL)
        for lg in children:
            lg.disabled = True
        yield
    finally:
        parent.setLevel(level)
        for lg, flag in disabled:
            lg.disabled = flag


def trace_model(model: nn.Module, inputs: tuple[Any, ...], *, output_key: str | None = None,
                allow_run: bool = True, method: str | None = None) -> TracedModel:
    """Trace ``model`` on ``inputs``; ``method`` forces one tracer (tests and ``--tracer``).

    ``allow_run=False`` (``--no-probe``) still permits the runtime recorder,
    which runs one forward without gradients, because otherwise a model with
    data-dependent control flow could not be analysed at all; the report says so.

    Where symbolic_trace fails (every Hugging Face model, ``nn.TransformerEncoder``), the
    runtime recorder goes before torch.export when the model may run (the probe will run
    it anyway) or lives on the meta device (a meta forward computes nothing): it costs
    one forward without gradients, where export cost 1.4 s on a 12-layer encoder whose
    forward and backward take 27 ms, and 6 s on Llama-7B on meta (issue 15). On the 31
    zoo models that need one of the two, the findings are the same except where the
    recorder's are better (the word-level LSTM language model, whose ``aten.lstm`` the
    estimate does not model on an exported graph; Mamba, a GS104 false warning);
    docs/benchmarks.md section 6. Export stays first for ``--no-probe`` on real weights,
    where the model is not to be run.
    """
    from gradscope.meta import is_meta_model
    from gradscope.tracing.fx_tracers import trace_export, trace_symbolic
    from gradscope.tracing.runtime import trace_runtime

    tracers: list[tuple[str, Callable[..., Any]]] = [
        ("symbolic_trace", functools.partial(trace_symbolic, run=allow_run)),
        ("export", trace_export), ("runtime", trace_runtime)]
    if allow_run or is_meta_model(model):
        tracers = [tracers[0], tracers[2], tracers[1]]
    if method is not None:
        tracers = [t for t in tracers if t[0] == method]
        if not tracers:
            raise TraceError(f"unknown tracer {method!r}",
                             "choose symbolic_trace, export or runtime")
    attempts: list[TraceAttempt] = []
    last_error: BaseException | None = None
    errors: list[BaseException] = []
    for name, tracer in tracers:
        try:
            # torch.export prints partial graphs straight to sys.stderr when it fails.
            with warnings.catch_warnings(), quiet_torch_logs(), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                traced = tracer(model, inputs, output_key, attempts)
        except GradscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - every tracer failure is reported, then next
            attempts.append(TraceAttempt(name, False, _reason(exc)))
            last_error = exc
            errors.append(exc)
            continue
        if not allow_run and name == "runtime":
            traced.notes.append("--no-probe: the model was still run forward once, without "
                                "gradients, to record its graph")
        return traced
    from gradscope.tracing.runtime import ModelForwardError

    # The model's own error, from the recorder's real forward, says most whichever tracer
    # ran last: the inputs do not fit the model.
    last_error = next((e for e in errors if isinstance(e, ModelForwardError)), last_error)
    shapes = ", ".join(str(list(t.shape)) if hasattr(t, "shape") else repr(t) for t in inputs)
    assert last_error is not None
    hint = model_error_hint(last_error)
    if not isinstance(last_error, ModelForwardError) and hint is not None:
        # The model's own error (BatchNorm with one value per channel) reached us through
        # a tracer's wrapping, not the runtime recorder's: the input's fault, not ours.
        raise InputError(f"the model could not be run on inputs of shape {shapes}: "
                         f"{_reason(last_error)}", hint) from last_error
    if not isinstance(last_error, ModelForwardError):
        raise TraceError(
            f"no tracer could record the graph: {_reason(last_error)}",
            "rerun with --debug and report it, or try --tracer runtime",
        ) from last_error
    where = f" {last_error.where}" if last_error.where else ""
    raise InputError(
        f"the model could not be run on inputs of shape {shapes}: "
        f"{_reason(last_error.error)}{where}",
        model_error_hint(last_error.error)
        or "check --input-shape/--dtype or example_inputs() against what forward expects",
    ) from last_error


def __getattr__(name: str) -> Any:
    if name == "TracedModel":  # lazily: gradscope.tracing.graph imports torch
        from gradscope.tracing.graph import TracedModel

        return TracedModel
    raise AttributeError(f"module 'gradscope.tracing' has no attribute {name!r}")


__all__ = ["TracedModel", "trace_model"]
