"""The options of one analysis, declared once: :class:`AnalysisOptions` and its thresholds.

Every option that reaches :func:`gradscope.analyze` is a field of
:class:`AnalysisOptions`, with its default, a one-line help and, where there
are some, its allowed choices. The other layers come from these declarations:
``gradscope analyze``'s options are generated from the fields (``gradscope.cli``),
the ``[tool.gradscope]`` keys and their defaults are the fields' (``gradscope.config``),
and ``gradscope.analyze`` takes the fields as keywords; ``tests/test_options.py``
checks the three against this module.

No torch here (and no click): the settings layer and the command line read these
declarations before deciding whether torch is needed at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from gradscope.errors import ConfigError

#: Severities ``--fail-on`` / ``fail-on`` accept (a command-line setting, not an option
#: of the analysis: the report is the same whatever it is).
FAIL_ON: tuple[str, ...] = ("error", "warning", "info", "never")
LOSSES: tuple[str, ...] = ("dot", "sum", "mse", "cross_entropy")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
TRACERS: tuple[str, ...] = ("symbolic_trace", "export", "runtime")
PROBE_MODES: tuple[str, ...] = ("train", "eval")

@dataclass(frozen=True)
class Thresholds:
    """Limits on the gradient ratio (earliest trainable layers / output), after pooling.

    Ratios are of gradient norms, discounting averaging ops (see
    ``gradscope.rules.health``). Defaults follow docs/static-estimate.md:
    a plain stack whose product of gains leaves [1e-2, 1e2] needs attention.
    """

    vanishing_warning: float = 1e-2
    vanishing_error: float = 1e-3
    exploding_warning: float = 1e2
    exploding_error: float = 1e3
    min_coverage: float = 0.9
    #: Share of an activation's outputs in the flat tails (GS301/GS302); half of it
    #: saturated is an error.
    saturated_fraction: float = 0.2
    #: Share of a layer's units dead on every probe sample (GS401); all dead is an error.
    dead_fraction: float = 0.5
    #: Bias mean before a ReLU, in pre-activation standard deviations (GS402).
    negative_bias: float = 0.5
    #: Smallest ||grad W||/||W|| over the median layer's (GS104).
    update_imbalance: float = 1e-3
    #: Weight layers on a path no skip bypasses (GS701/GS702).
    plain_depth: int = 10
    #: Residual blocks without normalisation or branch scale (GS704).
    residual_blocks: int = 4
    #: Hanin's beta = sum of 1/width over the plain run's hidden layers (GS706).
    width_beta: float = 1.0


#: The names of the thresholds, the keys of ``[tool.gradscope.thresholds]``.
THRESHOLDS: tuple[str, ...] = tuple(f.name for f in fields(Thresholds))

#: ``metadata["kind"]`` of an option: how it is spelled on the command line and checked.
KINDS = ("text", "float", "int", "switch", "flag", "codes", "pairs", "table")


def _meta(help: str, kind: str, *, choices: tuple[str, ...] | None = None,
          metavar: str | None = None, minimum: float | None = None, min_open: bool = False,
          cli: bool = True, settings_default: Any = MISSING) -> dict[str, Any]:
    """The declaration of an :class:`AnalysisOptions` field, kept in its ``metadata``.

    ``help`` is one line, without the default (the command line adds it). ``kind``
    (:data:`KINDS`) says how the option is spelled on the command line and read from
    ``[tool.gradscope]``. ``settings_default``: the default of the command line and
    ``[tool.gradscope]`` where it differs from the library's (``device``: auto there,
    cpu in a test suite, so a test gives the same verdict on every machine).
    ``cli=False``: no command-line option (``tests/test_options.py`` lists why).
    """
    assert kind in KINDS, kind
    return {"help": help, "kind": kind, "choices": choices, "metavar": metavar,
            "minimum": minimum, "min_open": min_open, "cli": cli,
            "settings_default": settings_default}


#: A probe loss given as a function: ``loss_fn(output, inputs) -> scalar tensor``, or
#: ``loss_fn(output, inputs, target)`` when real batches with targets are given.
LossFn = Callable[..., Any]


@dataclass(frozen=True)
class AnalysisOptions:
    """Every option of one analysis, with its default; the fields' order is the help's.

    Building one checks every value (a :class:`ConfigError` with a one-line
    reason), so an ``AnalysisOptions`` that exists is one the pipeline accepts.
    ``select``/``ignore`` given as one comma-separated string become tuples of
    codes (case kept; the rule selection upper-cases them), ``per_module_ignore``
    as a mapping becomes ``(glob, codes)`` pairs, ``None`` for those and for
    ``thresholds`` is their default, and an integer ``output`` is its text.
    """

    device: str = field(default="cpu", metadata=_meta(
        "auto|cpu|cuda|cuda:N|mps: where the probe runs", "text", metavar="DEVICE",
        settings_default="auto"))
    probe: bool = field(default=True, metadata=_meta(
        "--no-probe: static analysis only, nothing is run on the model", "switch"))
    output: str | None = field(default=None, metadata=_meta(
        "Output entry to differentiate (logits, 0, hidden_states.1 ...)", "text",
        metavar="KEY"))
    tracer: str | None = field(default=None, metadata=_meta(
        "Force one tracer instead of trying them in order", "text", choices=TRACERS))
    lr: float | None = field(default=None, metadata=_meta(
        "Learning rate: turn on the per-layer update/weight checks and, with a loss_fn on "
        "real data, the learning-rate range test", "float"))
    optimizer: str | None = field(default=None, metadata=_meta(
        "The optimizer you will train with: under adam/adamw a uniformly small or large "
        "gradient is rescaled and judged for what Adam cannot fix (gradients below its eps); "
        "not given, the verdict assumes plain SGD and says so", "text", choices=OPTIMIZERS))
    momentum: float = field(default=0.0, metadata=_meta(
        "SGD momentum for --lr, used by the range test's optimizer (the first-update "
        "ratios do not depend on it)", "float"))
    weight_decay: float = field(default=0.0, metadata=_meta(
        "Weight decay for --lr (coupled for sgd/adam, decoupled for adamw)", "float"))
    steps: int | None = field(default=None, metadata=_meta(
        "Planned length of the training run in optimiser steps: warmup advice is a share "
        "of it (at most 10%); without it no warmup length is advised", "int", metavar="N",
        minimum=1))
    lr_range: bool = field(default=True, metadata=_meta(
        "--no-lr-range: skip the learning-rate range test (short training runs of a copy "
        "of the model at --lr and factors of it, run when --lr is given and the model "
        "file gives loss_fn and real example data)", "switch"))
    lr_range_steps: int = field(default=30, metadata=_meta(
        "Optimizer steps of each range-test run", "int", metavar="N", minimum=1))
    batches: int = field(default=3, metadata=_meta(
        "Probe batches: the example inputs and N-1 seeded ones, or the first N of "
        "example_batches()", "int", minimum=1))
    #: A name from LOSSES, a ``loss_fn(output, inputs)`` (``loss_fn(output, inputs,
    #: target)`` with ``example_batches``), or None: the model file's
    #: ``loss_fn()`` when the CLI loaded one, else ``dot``.
    loss: str | LossFn | None = field(default=None, metadata=_meta(
        "Probe loss (default: loss_fn() in the model file, else dot with a fixed random "
        "direction)", "text", choices=LOSSES))
    probe_mode: str = field(default="train", metadata=_meta(
        "Run the probe in train or eval mode", "text", choices=PROBE_MODES))
    timeout: float | None = field(default=None, metadata=_meta(
        "Stop the probe once the analysis has run this long: the report keeps the batches "
        "done (or the static estimate alone) and says so", "float", metavar="SECONDS",
        minimum=0, min_open=True))
    seed: int = field(default=0, metadata=_meta("Seed of the probe", "int"))
    select: tuple[str, ...] = field(default=(), metadata=_meta(
        "Only these rule codes or prefixes (GS1,GS802; ALL); repeatable", "codes",
        metavar="CODES"))
    ignore: tuple[str, ...] = field(default=(), metadata=_meta(
        "Drop these rule codes or prefixes; the longest match with --select wins, ignore on "
        "a tie; repeatable", "codes", metavar="CODES"))
    per_module_ignore: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), metadata=_meta(
        "Drop these codes for findings in modules matching GLOB ('encoder.*', '*.attn'; '*' "
        "also matches the whole model); repeatable", "pairs", metavar="GLOB=CODES"))
    meta: bool = field(default=False, metadata=_meta(
        "Build the model on the meta device (no weights allocated) and estimate from "
        "declared initialisations; implies --no-probe", "flag"))
    stream: bool = field(default=False, metadata=_meta(
        "Probe a model larger than memory: build it on the meta device and materialise one "
        "block at a time with its declared initialisation (docs/large-models.md)", "flag"))
    distributed: bool = field(default=False, metadata=_meta(
        "Under torchrun: shard the model over the processes with FSDP2 and probe the "
        "shards; rank 0 writes the report (docs/large-models.md)", "flag"))
    stream_blocks: str | None = field(default=None, metadata=_meta(
        "With --stream or --distributed: the module whose children are the blocks (the "
        "default: the largest ModuleList/Sequential of same-class layers)", "text",
        metavar="PATH"))
    thresholds: Thresholds = field(default_factory=Thresholds, metadata=_meta(
        "Limits the rules judge against ([tool.gradscope.thresholds])", "table", cli=False))

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, once, at construction.
        set_ = object.__setattr__
        if self.thresholds is None:
            set_(self, "thresholds", Thresholds())
        for name in ("select", "ignore"):
            value = getattr(self, name)
            if value is None:
                set_(self, name, ())
            elif isinstance(value, str) or (isinstance(value, (list, tuple))
                                            and all(isinstance(v, str) for v in value)):
                set_(self, name, split_codes(value))
        if not isinstance(self.per_module_ignore, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], tuple)
                for p in self.per_module_ignore):
            set_(self, "per_module_ignore", per_module_pairs(self.per_module_ignore))
        if isinstance(self.output, int) and not isinstance(self.output, bool):
            set_(self, "output", str(self.output))  # output = 0: a tuple output's first entry
        self.validate()

    def replaced(self, **changes: Any) -> AnalysisOptions:
        """A copy with ``changes`` set; a name that is no option is a ``TypeError``."""
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown analysis option {unknown[0]!r} (options: "
                            f"{', '.join(OPTION_NAMES)})")
        return replace(self, **changes) if changes else self

    def check_together(self) -> None:
        """Refuse options that contradict each other (checked by ``analyze`` before it runs
        anything; each value alone is checked by :meth:`validate` on construction, so the
        settings layers can hold any one of them)."""
        for name in ("stream", "distributed"):
            if getattr(self, name) and (self.meta or not self.probe):
                raise ConfigError(f"--{name} runs the probe: it cannot go with "
                                  + ("--meta" if self.meta else "--no-probe"),
                                  "drop one of the two (--meta: static estimate only)")
        if self.stream and self.distributed:
            raise ConfigError("--stream and --distributed are two ways to probe a model too "
                              "large for one device: choose one",
                              "--distributed under torchrun with several processes, "
                              "--stream in one")

    def validate(self) -> None:
        """Check every value's type and range: a bad one is a one-line :class:`ConfigError`."""
        def bad(name: str, wants: str, value: Any) -> ConfigError:
            return ConfigError(f"{name} {wants}, not {value!r}", "fix the setting")

        if not isinstance(self.device, str):
            raise bad("device", "must be a string", self.device)
        if self.output is not None and not isinstance(self.output, str):
            raise bad("output", "must be a string", self.output)
        for name in ("probe", "meta", "stream", "distributed", "lr_range"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false", getattr(self, name))
        if not _is_int(self.seed):
            raise bad("seed", "must be an integer", self.seed)
        if self.stream_blocks is not None and not isinstance(self.stream_blocks, str):
            raise bad("stream-blocks", "must be a module path", self.stream_blocks)
        for name, choices in (("tracer", TRACERS), ("optimizer", OPTIMIZERS),
                              ("probe_mode", PROBE_MODES)):
            value = getattr(self, name)
            if (value is not None or name == "probe_mode") and value not in choices:
                raise bad(name.replace("_", "-"), f"must be one of {', '.join(choices)}", value)
        if self.loss is not None and not callable(self.loss) and self.loss not in LOSSES:
            raise bad("loss", f"must be one of {', '.join(LOSSES)} or a function", self.loss)
        if self.lr is not None and (not _is_number(self.lr) or not self.lr > 0):
            raise bad("lr", "must be a positive number", self.lr)
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0:
                raise bad(name, "must be a non-negative number", value)
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise bad("steps", "must be a whole number >= 1", self.steps)
        if not _is_int(self.lr_range_steps) or self.lr_range_steps < 1:
            raise bad("lr-range-steps", "must be a whole number >= 1", self.lr_range_steps)
        if not _is_int(self.batches) or self.batches < 1:
            raise bad("batches", "must be a whole number >= 1", self.batches)
        if self.timeout is not None and (not _is_number(self.timeout)
                                         or not 0 < self.timeout < math.inf):
            raise bad("timeout", "must be a positive number of seconds", self.timeout)
        if not isinstance(self.thresholds, Thresholds):
            raise bad("thresholds", "must be a gradscope.Thresholds", self.thresholds)
        for name in THRESHOLDS:
            value = getattr(self.thresholds, name)
            if not _is_number(value) or not value >= 0:
                raise bad(name, "must be a non-negative number", value)
        for name in ("select", "ignore"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise bad(name, "must be a list of rule codes", value)
        # Each code is checked against the rule registry where a selection is built
        # (gradscope.rules.selection.RuleSelection, before anything runs, and the
        # settings layer): the options sit below the rules and cannot know the codes.
        for glob, _codes in self.per_module_ignore:
            if not glob.strip():
                raise ConfigError("empty module glob in per-module-ignore",
                                  "use '*' for every module, 'encoder.*' for a subtree")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: The options' fields, in declaration order.
OPTION_FIELDS: tuple[Field[Any], ...] = tuple(fields(AnalysisOptions))
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in OPTION_FIELDS)


def default_of(f: Field[Any]) -> Any:
    """The library's default of an option (``gradscope.analyze``)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def settings_default_of(f: Field[Any]) -> Any:
    """The default on the command line and in ``[tool.gradscope]``: mostly the library's."""
    declared = f.metadata["settings_default"]
    return default_of(f) if declared is MISSING else declared


def settings_defaults() -> AnalysisOptions:
    """The options before ``[tool.gradscope]`` and the command line change any."""
    return AnalysisOptions(**{f.name: f.metadata["settings_default"] for f in OPTION_FIELDS
                              if f.metadata["settings_default"] is not MISSING})


# ---------------------------------------------------------------------------
# Parsing the rule-selection options (their codes are checked by gradscope.rules.selection)

#: ``per_module_ignore`` as held: (module glob, codes) pairs in the order given.
PerModule = tuple[tuple[str, tuple[str, ...]], ...]


def split_codes(values: str | Iterable[str]) -> tuple[str, ...]:
    """``("GS101,GS102", "GS8")`` -> ``("GS101", "GS102", "GS8")``.

    Options are comma-separated and repeatable (``--ignore GS101,GS102 --ignore GS8``),
    so every value is split; empty pieces of a trailing comma are dropped.
    """
    items = [values] if isinstance(values, str) else list(values)
    codes: list[str] = []
    for item in items:
        if isinstance(item, str):
            codes.extend(piece.strip() for piece in item.split(",") if piece.strip())
        else:  # not a string: left for check_codes to report with where it came from
            codes.append(item)
    return tuple(codes)


def parse_per_module(value: str) -> tuple[str, tuple[str, ...]]:
    """The command-line form ``GLOB=CODE[,CODE...]`` -> ``(GLOB, (CODE, ...))``.

    The last ``=`` splits, as codes never contain one. Codes are not checked
    against the registry here; :class:`RuleSelection` does that with the others.
    """
    glob, sep, codes = value.rpartition("=")
    parsed = split_codes(codes)
    if not sep or not glob.strip() or not parsed:
        raise ConfigError(f"--per-module-ignore wants GLOB=CODE[,CODE...], not {value!r}",
                          "for example --per-module-ignore 'encoder.layers.*=GS1'")
    return glob.strip(), parsed


def per_module_pairs(value: Mapping[str, str | Sequence[str]]
                     | Iterable[tuple[str, str | Sequence[str]]] | None) -> PerModule:
    """A mapping ``glob -> codes`` (or ``(glob, codes)`` pairs) as the tuple a selection holds.

    Pairs are accepted too because a repeated command-line option may name the
    same glob twice; a mapping could not hold both.
    """
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    pairs: list[tuple[str, tuple[str, ...]]] = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[0], str)):
            raise ConfigError(f"per-module-ignore must map module globs to rule codes, not "
                              f"{item!r}", 'write it like {"encoder.*": ["GS1"]}')
        glob, codes = item
        if isinstance(codes, str):
            codes = split_codes(codes)
        elif not isinstance(codes, (list, tuple)):
            raise ConfigError(f"per-module-ignore {glob!r} must list rule codes, not {codes!r}",
                              'write it like {"encoder.*": ["GS1"]}')
        pairs.append((glob, tuple(codes)))
    return tuple(pairs)
