"""``gradscope.analyze``: the pipeline end to end, for Python callers and the CLI.

loading is the caller's (a model and inputs arrive here) -> tracing ->
static estimate -> probe -> rules -> report. The model is restored whatever
happens (``gradscope.state.preserved``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.errors import DeviceError, InputError
from gradscope.estimate.depth import summarize_depth
from gradscope.estimate.engine import estimate
from gradscope.loading import as_batches
from gradscope.lr_range import RangeTest, output_picker, run_range_test
from gradscope.meta import is_meta_model
from gradscope.options import (
    OPTION_NAMES,
    AnalysisOptions,
    Thresholds,
    per_module_pairs,
    split_codes,
)
from gradscope.probe import ProbeResult, run_probe
from gradscope.render.notebook import NotebookReport
from gradscope.report import Layer, ModelInfo, ProbeInfo, Report, TraceInfo
from gradscope.resources import Deadline, check_memory, factory_footprint, footprint
from gradscope.rules.analysis import Analysis, run_rules
from gradscope.rules.optimizers import ASSUMED_NOTE
from gradscope.rules.selection import RuleSelection
from gradscope.state import preserved
from gradscope.streaming import (
    Streamer,
    find_blocks,
    memory_alternatives,
    stream_footprint,
)
from gradscope.tracing import trace_model
from gradscope.trial import try_fixes

Progress = Callable[[str], None]


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; a device that is not there is an error."""
    text = device.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} is not available: this torch build or machine "
                              "has no CUDA GPU", "use --device cpu or --device auto")
        index = text.partition(":")[2]
        if index:
            if not index.isdigit():
                raise DeviceError(f"bad device {device!r}", "write cuda or cuda:N")
            if int(index) >= torch.cuda.device_count():
                raise DeviceError(f"device {device!r} does not exist: "
                                  f"{torch.cuda.device_count()} CUDA device(s) present",
                                  f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return text
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("device 'mps' is not available on this machine",
                              "use --device cpu or --device auto")
        return "mps"
    raise DeviceError(f"unknown device {device!r}", "choose auto, cpu, cuda, cuda:N or mps")


def _build(factory: Callable[[], nn.Module], meta: bool,
           declared: dict[int, tuple[float, float]], values: bool = False) -> nn.Module:
    """Call a model factory, on the meta device with init recording when asked
    (``values``: also what ``--stream`` needs to materialise the weights later)."""
    from gradscope.loading import call_factory
    from gradscope.meta import library_init, recording_init

    if meta:
        with recording_init(declared, values=values):
            model = call_factory(factory, "the model factory")
            library_init(model)
            return model
    return call_factory(factory, "the model factory")


def _is_lazy(model: nn.Module) -> bool:
    """Whether the model holds parameters or buffers that nn.Lazy* modules have not sized."""
    from torch.nn.parameter import is_lazy

    return any(is_lazy(t) for t in (*model.parameters(), *model.buffers()))


def _materialised(model: nn.Module, inputs: tuple[Any, ...]) -> nn.Module:
    """A copy of a lazy model, sized by one forward on ``inputs``; the original is untouched.

    Lazy modules initialise on their first call from the global generator: the copy
    is sized under a forked RNG so that the caller's random stream does not move.
    """
    sized = copy.deepcopy(model)
    devices = [d for d in {t.device for t in inputs if isinstance(t, torch.Tensor)}
               if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            sized(*inputs)
        except Exception as exc:
            raise InputError(f"the lazy model could not be initialised by a forward on the "
                             f"example inputs: {type(exc).__name__}: {exc}",
                             "check --input-shape/--dtype or example_inputs()") from exc
    return sized


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, not "
                     f"{type(example_inputs).__name__}", "pass (x,) or (x, y)")


def _range_test_skipped(enabled: bool, loss: Any, real: bool,
                        synthetic_inputs: bool, stream: bool = False) -> str | None:
    """Why no learning-rate range test runs (what would enable one); None: it runs."""
    if stream:
        return ("the range test trains copies of the whole model, which --stream and "
                "--distributed do not hold in memory")
    if not enabled:
        return "the range test was turned off (--no-lr-range)"
    if not callable(loss):
        return ("the probe's loss is not the model's: define loss_fn(output, inputs) (or "
                "loss_fn(output, inputs, target) with example_batches()) in the model file, "
                "or pass loss=<function>")
    if not real and synthetic_inputs:
        return ("the inputs are made up (--input-shape, or inferred from the first layer): "
                "give real data with example_inputs() or example_batches()")
    return None


def _run_range_test(model: nn.Module, batches: list[tuple[tuple[Any, ...], Any]],
                    loss: Any, lr: float, optimizer: str, *, momentum: float,
                    weight_decay: float, steps: int, device: str, seed: int, mode: str,
                    output: str | None, deadline: Deadline,
                    ) -> tuple[RangeTest | None, str | None]:
    """The range test on a copy of ``model``; (None, why) when it could not run."""
    try:
        return run_range_test(
            model, batches, loss, lr, optimizer, momentum=momentum,
            weight_decay=weight_decay, steps=steps, device=device, seed=seed, mode=mode,
            output=output_picker(output), deadline=deadline), None
    except Exception as exc:  # noqa: BLE001 - the probe ran these batches: say why, go on
        return None, f"the range test could not run: {type(exc).__name__}: {exc}"


def _range_note(test: RangeTest) -> str:
    """The range test's figures as a report note (every renderer shows the notes)."""
    text = (f"learning-rate range test ({test.optimizer}, {test.steps} steps per run over "
            f"{test.batches} batch(es), mean loss over them before -> after): "
            f"{test.summary()}")
    if test.factor is not None:
        text += f"; supports lr {test.advised_lr:.3g} (x{test.factor:g}), see GS601"
    elif test.given is not None and not test.given_fails:
        text += "; the given learning rate trained: no learning-rate advice"
    return text


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _num(x: float | None) -> float | None:
    return None if x is None else float(x)


def _layers(analysis: Analysis) -> list[Layer]:
    traced, est, probe = analysis.traced, analysis.estimate, analysis.probe
    health = analysis.health
    layers = []
    for name in traced.compute_nodes():
        d = traced.node(name)
        judged = health.of(name)
        layers.append(Layer(
            name=name, op=d.op, depth=d.depth, module=d.module,
            module_class=d.module_class, kind=d.kind, inputs=list(d.inputs),
            shape=list(d.shape) if d.shape is not None else None, dtype=d.dtype,
            num_params=d.num_params, file=d.file,
            line=d.line, understood=est.understood.get(name, True),
            static_grad_rms=_num(est.grad_rms.get(name)),
            probe_grad_rms=_num(probe.grad_rms.get(name)) if probe else None,
            param_grad_ratio=_num(probe.param_grad_ratio.get(name)) if probe else None,
            param_grad_norm=_num(probe.param_grad_norm.get(name)) if probe else None,
            update_ratio=_num(probe.update_ratio.get(name)) if probe else None,
            probe_grad_rms_min=probe.grad_rms_range[name][0]
            if probe and name in probe.grad_rms_range else None,
            probe_grad_rms_max=probe.grad_rms_range[name][1]
            if probe and name in probe.grad_rms_range else None,
            dead_fraction=probe.dead_fraction.get(name) if probe else None,
            saturated_fraction=probe.saturated_fraction.get(name) if probe else None,
            nonfinite_forward=bool(probe and name in probe.nonfinite_forward),
            nonfinite_backward=bool(probe and name in probe.nonfinite_backward),
            health=_num(judged.value), health_source=judged.source,
            health_class=judged.cls, health_note=judged.note,
            health_predicted=_num(health.predicted.get(name)),
            health_measured=_num(health.measured.get(name)),
            time_profile=_time_profile(est.recurrent.get(name)),
        ))
    return layers


def _time_profile(result: Any) -> list[float | None] | None:
    """A recurrent unroll's per-step input gradient norm relative to its largest step's
    (None at a step whose figure overflowed)."""
    profile = getattr(result, "profile", ()) or ()
    top = max((v for v in profile if math.isfinite(v)), default=0.0)
    if top <= 0.0:
        return None
    return [math.sqrt(v / top) if math.isfinite(v) else None for v in profile]


def _summary(analysis: Analysis, layers: list[Layer]) -> dict[str, float | int | str | None]:
    facts, health, t = analysis.facts, analysis.health, analysis.thresholds
    summary: dict[str, float | int | str | None] = {
        "trainable_nodes": len(facts.trainable), "entry_nodes": len(facts.entries)}
    static = health.extremes(measured=False)
    if static:
        summary.update(static_min_ratio=static[1], static_min_node=static[0],
                       static_max_ratio=static[3], static_max_node=static[2])
    if analysis.probe is not None:
        measured = health.extremes(measured=True)
        if measured:
            summary.update(probe_min_ratio=measured[1], probe_min_node=measured[0],
                           probe_max_ratio=measured[3], probe_max_node=measured[2])
    depth = summarize_depth(analysis.traced, analysis.estimate, list(facts.entries))
    summary.update(
        longest_plain_run=facts.longest_plain_run, plain_run_end=facts.plain_run_end,
        residual_skips=len(facts.residual_adds), concat_skips=len(facts.concat_skips),
        static_chi_product=depth.chi_product,
        static_path_layers=depth.path_layers, static_chi_per_layer=depth.chi_per_layer,
        static_depth_scale=depth.depth_scale, static_coverage=analysis.estimate.coverage)
    # The health classes' bounds, so that every view can draw and explain the same band.
    summary.update(health_vanishing_warning=t.vanishing_warning,
                   health_vanishing_error=t.vanishing_error,
                   health_exploding_warning=t.exploding_warning,
                   health_exploding_error=t.exploding_error)
    counts: dict[str | None, int] = {"ok": 0, "warn": 0, "bad": 0, None: 0}
    for layer in layers:  # the classes the report shows, counted
        counts[layer.health_class] += 1
    summary.update(health_ok=counts["ok"], health_warn=counts["warn"],
                   health_bad=counts["bad"], health_not_judged=counts[None])
    return summary



def analyze(
    model: nn.Module | Callable[[], nn.Module],
    example_inputs: Any,
    options: AnalysisOptions | None = None,
    *,
    name: str | None = None,
    source: str | None = None,
    notes: list[str] | None = None,
    progress: Progress | None = None,
    declared: dict[int, tuple[float, float]] | None = None,
    example_batches: list[tuple[Any, Any]] | None = None,
    synthetic_inputs: bool = False,
    **keywords: Any,
) -> Report:
    """Analyse ``model`` on ``example_inputs`` and return the report.

    The options of the analysis are the fields of :class:`gradscope.options.AnalysisOptions`
    (their defaults and help are declared there): pass one as ``options``, or its fields
    as keywords (``device="cpu"``, ``probe=False``, ``lr=1e-3``, ``thresholds=...``), or
    both, the keywords then overriding the fields. A keyword that is no option is a
    ``TypeError``; a bad value is a ``ConfigError`` raised before anything runs.
    ``name``, ``source``, ``notes`` (the report's), ``progress`` (called with each
    stage's name), ``declared``, ``example_batches`` and ``synthetic_inputs`` are not
    options of the analysis but what the caller knows about the model and its data.

    ``example_batches``: real data, a list of ``(inputs, target)`` pairs (``inputs`` a
    tensor or a tuple, as ``example_inputs``). The probe then runs on the first
    ``batches`` of them instead of synthetic batches, and a ``loss`` function is called
    as ``loss(output, inputs, target)``; ``example_inputs`` may then be None (the first
    batch's inputs stand for it). With ``lr`` and a ``loss`` function on real data
    (``example_batches``, or ``example_inputs`` - unless ``synthetic_inputs`` says they
    were made up, as the CLI's ``--input-shape`` ones are - then one batch repeated), a
    learning-rate range test trains copies of the model for ``lr_range_steps`` steps at
    ``lr`` and, where it fails, at factors of it (``gradscope.lr_range``); GS601 advises
    only what it showed. ``lr_range=False`` (or ``probe=False``) skips it.

    ``device`` is where the probe runs (``auto`` picks CUDA when available; the
    default is the CPU); ``probe=False`` gives the static estimate only. ``output``
    names the output entry to differentiate (``logits``, ``0``, ...). The model is left
    exactly as it was found. ``lr`` (with ``optimizer`` sgd/adam/adamw) adds
    each layer's first-update/weight ratio and the learning-rate check.

    ``meta=True``: with a zero-argument factory for ``model``, the model is built
    under ``torch.device("meta")`` (no weight allocated) and each weight's declared
    initialisation is recorded for the estimate; a model already on the meta
    device is used as it is (module default inits). Either way nothing runs:
    static estimate only. ``declared`` passes init moments recorded elsewhere
    (``gradscope.loading.load_target(..., meta=True)``).

    The probe runs ``batches`` seeded batches (the example inputs first), in
    ``probe_mode`` train or eval, with ``loss`` "dot" (<output, fixed random
    direction>, the default), "sum", "mse", "cross_entropy" or a ``loss_fn(output, inputs)``.
    ``momentum`` is the range test's SGD momentum; the first step of SGD with momentum
    equals plain SGD's, so it does not change the update/weight figures.

    ``select``/``ignore`` (rule codes or prefixes such as ``"GS1"``; ``"ALL"``)
    decide the ruff way (``gradscope.rules.selection``) which rules run at all, so
    a deselected rule costs nothing; ``per_module_ignore`` (module glob -> codes)
    drops findings of the rules that ran. The report's status and every renderer
    see the same findings, and its notes name the rules not run and count the
    findings dropped. An unknown code is a ``ConfigError`` raised before anything
    runs.

    ``timeout`` (seconds, counted from this call) bounds the probe: once it has
    passed, the probe stops at the next node or batch and the report holds the
    batches finished, with a note; if none finished, the static estimate alone
    (a CI job gets a report rather than nothing). Before a model is built from a
    factory, moved to ``device`` or probed, its weights and gradients are compared
    with the free memory there (``gradscope.resources``); a model that would not
    fit is a ``ResourceError`` that suggests ``meta=True``.
    """
    if options is not None and not isinstance(options, AnalysisOptions):
        raise TypeError(f"options must be a gradscope.options.AnalysisOptions, not "
                        f"{type(options).__name__} (pass device=... and the rest as keywords)")
    unknown = sorted(set(keywords) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"analyze() got an unexpected keyword argument {unknown[0]!r}")
    opts = (options or AnalysisOptions()).replaced(**keywords)
    opts.check_together()
    device, probe, output, tracer, seed = (opts.device, opts.probe, opts.output, opts.tracer,
                                           opts.seed)
    # Not given: plain SGD is assumed (the stricter judge: it rescales nothing), and the
    # report says so; the rules read ``opts.optimizer`` to tell given from assumed.
    lr, optimizer, weight_decay, momentum = opts.lr, opts.optimizer or "sgd", opts.weight_decay, \
        opts.momentum
    lr_range, lr_range_steps = opts.lr_range, opts.lr_range_steps
    meta, batches, probe_mode, timeout = opts.meta, opts.batches, opts.probe_mode, opts.timeout
    stream, distributed = opts.stream, opts.distributed
    if stream or distributed:
        # The blocks run their own forward (gradscope.streaming, FSDP's hooks): the graph
        # is the runtime recorder's, which calls it.
        tracer = "runtime"
    loss = "dot" if opts.loss is None else opts.loss
    select, ignore, per_module_ignore = opts.select, opts.ignore, opts.per_module_ignore
    thresholds = opts.thresholds
    deadline = Deadline(timeout)
    say = progress or (lambda _msg: None)
    # split_codes: a bare "GS1,GS8" string is a list of codes, not of letters.
    selection = RuleSelection(select=split_codes(select or ()), ignore=split_codes(ignore or ()),
                              per_module_ignore=per_module_pairs(per_module_ignore))
    output = None if output is None else str(output)
    real_batches = None if example_batches is None else as_batches(
        example_batches, "example_batches", "pass example_batches=[(x0, y0), (x1, y1), ...]")
    if example_inputs is None and real_batches:
        example_inputs = real_batches[0][0]
    inputs = _as_inputs(example_inputs)
    report_notes = list(notes or [])
    thresholds = thresholds or Thresholds()
    declared = dict(declared or {})
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise InputError(f"model must be an nn.Module or a factory, not "
                             f"{type(model).__name__}", "pass the model or a function building it")
        big = stream or distributed
        if not (meta or big):  # on meta nothing is allocated; else count before building
            planned = factory_footprint(model)
            if planned is not None:
                counted = planned.model
                check_memory("cpu", weights=planned.weights, doing="build the model",
                             instead=None if counted is None else
                             lambda: memory_alternatives(counted, opts.stream_blocks))
        model = _build(model, meta or big, declared, values=big)
    if _is_lazy(model):
        model = _materialised(model, inputs)
        report_notes.append("the model has lazy (uninitialised) parameters: a copy was "
                            "initialised by one forward on the example inputs and analysed; "
                            "the model passed in is left uninitialised")
    on_meta = is_meta_model(model)
    if meta and not on_meta:
        report_notes.append("meta=True, but the model was already built with real weights: "
                            "their measured scales were used")
    if on_meta and probe and not (stream or distributed):
        probe = False
        report_notes.append("the model is on the meta device (no weights): static estimate "
                            "only, from each weight's declared initialisation")
    target_device = resolve_device(device) if probe else "cpu"
    if distributed:
        from gradscope.distributed import setup

        target_device = setup(target_device)
    blocks: list[str] = []
    if distributed:
        from gradscope.distributed import sharded_footprint

        blocks = find_blocks(model, opts.stream_blocks)
        weights, gradients = sharded_footprint(model, blocks)
        check_memory(target_device, weights=weights, gradients=gradients,
                     doing="probe the shards")
    elif stream:
        blocks = find_blocks(model, opts.stream_blocks)
        largest, kept, kept_grads = stream_footprint(model, blocks)
        check_memory(target_device, weights=largest + kept, gradients=kept_grads,
                     doing="stream the probe")
    elif probe:  # before the snapshot and the move: fail while nothing is allocated yet
        size = footprint(model)
        moving = torch.device(target_device) != _model_device(model)
        check_memory(target_device, weights=size.weights if moving else 0,
                     gradients=size.gradients,
                     instead=lambda: memory_alternatives(model, opts.stream_blocks))
    with preserved(model, report_notes):
        # Trace where the model lives; the probe moves it (and its inputs) when asked to.
        home = _model_device(model)
        trace_inputs = tuple(t.to(home) if isinstance(t, torch.Tensor) else t for t in inputs)
        # The mode the probe will run in: BatchNorm given a batch of one then fails (or
        # not, with probe_mode="eval") while tracing exactly as in the probe.
        model.train(probe_mode != "eval")
        say("tracing")
        try:
            traced = trace_model(model, trace_inputs, output_key=output, allow_run=probe,
                                 method=tracer)
        except InputError as exc:
            if not on_meta:
                raise
            raise InputError(f"{exc.message} (on the meta device)",
                             "the forward needs tensor values, which meta tensors do not "
                             "have: analyse it without --meta") from exc
        say(f"traced with {traced.method}: {traced.graph.number_of_nodes()} nodes")
        say("static estimate")
        est_inputs = inputs if on_meta else trace_inputs
        est = estimate(traced, est_inputs, declared, batches=batches)
        result: ProbeResult | None = None
        if probe:
            say(f"probe on {target_device}" + (f", streaming {len(blocks)} blocks"
                                                 if stream else ""))
            streamer = sharded = None
            probed, probed_traced = model, traced
            if stream:
                streamer = Streamer(model, blocks, target_device, seed)
                streamer.prepare()
            elif distributed:
                from gradscope.distributed import shard

                sharded = shard(model, traced, blocks, target_device, seed)
                probed, probed_traced = sharded.model, sharded.traced
            elif torch.device(target_device) != home:
                model.to(target_device)
            result = run_probe(probed, probed_traced,
                               inputs if stream or distributed else trace_inputs,
                               target_device, seed=seed, lr=lr,
                               optimizer=optimizer, weight_decay=weight_decay,
                               batches=batches, loss=loss, mode=probe_mode,
                               # processes must stop at the same node: a deadline
                               # each reads from its own clock would not stop them so
                               deadline=None if distributed else deadline,
                               real_batches=real_batches, streamer=streamer,
                               sharded=sharded)
            report_notes.extend(result.notes)
            if streamer is not None:
                report_notes.append(streamer.note())
            if sharded is not None:
                report_notes.append(sharded.note(blocks))
            if result.batches == 0:  # timed out before one batch: static estimate only
                result = None
                probe = False
        lr_test: RangeTest | None = None
        range_batches: list[tuple[tuple[Any, ...], Any]] = []
        lr_skipped: str | None = None
        if lr is not None and result is not None:
            lr_skipped = _range_test_skipped(lr_range, loss, real_batches is not None,
                                             synthetic_inputs, stream or distributed)
            if lr_skipped is None:
                say("learning-rate range test")
                range_batches = real_batches[:max(batches, 1)] if real_batches \
                    else [(trace_inputs, None)]
                lr_test, lr_skipped = _run_range_test(
                    model, range_batches, loss, lr, optimizer, momentum=momentum,
                    weight_decay=weight_decay, steps=lr_range_steps, device=target_device,
                    seed=seed, mode=probe_mode, output=output, deadline=deadline)
            if lr_test is not None:
                report_notes.append(_range_note(lr_test))
                report_notes.extend(lr_test.notes)
    report_notes.extend(traced.notes)
    analysis = Analysis(traced=traced, estimate=est, probe=result, thresholds=thresholds,
                        inputs=tuple(est_inputs), declared=declared, steps=opts.steps,
                        model=model, lr_range=lr_test,
                        lr_range_skipped=lr_skipped, optimizer=opts.optimizer)
    findings, not_run = run_rules(analysis, selection)
    if lr_test is not None and range_batches and callable(loss):
        say("trying the model changes at the given learning rate")
        findings, tried = try_fixes(
            model, findings, lr_test, range_batches, loss, momentum=momentum,
            weight_decay=weight_decay, device=target_device, seed=seed, mode=probe_mode,
            output=output_picker(output), deadline=deadline)
        report_notes.extend(tried)
    if opts.optimizer is None:
        report_notes.append(ASSUMED_NOTE)
    facts = analysis.facts
    if facts.zero_init:
        first = traced.node(facts.zero_init[0]).label()
        report_notes.append(
            f"{len(facts.zero_init)} zero-initialised layer(s) (first: {first}): by design "
            "(ReZero/SkipInit gains, Fixup, a zero-initialised head) they receive a gradient "
            "and leave zero at the first update; the "
            f"{len(facts.behind_zero_init)} node(s) behind them get none until then and are "
            "not judged")
    not_run_note = selection.not_run_note(not_run)
    if not_run_note is not None:
        report_notes.append(not_run_note)
    suppressed = selection.suppressed_note(findings)
    if suppressed is not None:
        report_notes.append(suppressed)
        findings = selection.apply(findings)
    params = list(dict.fromkeys(model.parameters()))
    if not any(p.requires_grad for p in params):
        # Not an error (a frozen feature extractor is a fine thing to check), but the
        # report must say why no weight gradient or update figure appears in it.
        report_notes.append("the model has no trainable parameter (none, or all with "
                            "requires_grad=False): gradients were measured with respect "
                            "to the inputs only, and no weight-gradient check applies")
    trace = TraceInfo(
        method=traced.method, ok=True,
        message="; ".join(f"{a.method} failed: {a.message}" for a in traced.attempts
                          if not a.ok) or None,
        attempts=traced.attempts, num_nodes=traced.graph.number_of_nodes(),
        coverage=est.coverage, unknown_ops=est.unknown_ops)
    info = ModelInfo(
        name=name or type(model).__name__,
        num_parameters=sum(p.numel() for p in params),
        num_trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        device=target_device if probe else str(home), trace=trace, output=traced.output_desc,
        inputs=[{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                if isinstance(t, torch.Tensor) else {"shape": None, "dtype": type(t).__name__}
                for t in inputs],
        source=source,
        modules={path: type(m).__name__ for path, m in model.named_modules() if path})
    probe_info = ProbeInfo(enabled=probe)
    if result is not None:
        probe_info = ProbeInfo(
            enabled=True, device=result.device, batch_size=result.batch_size, loss=result.loss,
            seed=result.seed, mode=result.mode, output_grad_rms=result.output_grad_rms,
            lr=result.lr, optimizer=result.optimizer, batches=result.batches,
            nonfinite_forward=result.nonfinite_forward[0] if result.nonfinite_forward else None,
            nonfinite_backward=result.nonfinite_backward[-1] if result.nonfinite_backward
            else None)
    layers = _layers(analysis)
    summary = _summary(analysis, layers)
    summary = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
               for k, v in summary.items()}
    return NotebookReport(model=info, layers=layers, findings=findings,
                  probe=probe_info, summary=summary, notes=report_notes)
