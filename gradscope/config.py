"""Layered settings: defaults, then ``[tool.gradscope]`` of the nearest pyproject.toml,
then the command line (which wins).

Unknown keys are an error that names the key: a typo in CI configuration must
not silently turn a check off. No torch here; the CLI reads settings before
deciding whether torch is needed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib  # type: ignore[no-redef]

from gradscope.errors import ConfigError
from gradscope.options import (
    FAIL_ON,
    LOSSES,
    OPTIMIZERS,
    OPTION_FIELDS,
    OPTION_NAMES,
    PROBE_MODES,
    THRESHOLDS,
    TRACERS,
    AnalysisOptions,
    Thresholds,
    settings_defaults,
)
from gradscope.rules.selection import RuleSelection

# The choices and the analysis options are declared once, in gradscope.options.
__all__ = [
    "ANALYSIS_KEYS",
    "FAIL_ON",
    "LOSSES",
    "OPTIMIZERS",
    "PROBE_MODES",
    "THRESHOLDS",
    "TRACERS",
    "Settings",
    "find_pyproject",
    "load_settings",
    "resolve_targets",
    "shapes_for",
    "validate",
]

#: Keys of the analysis: the fields of AnalysisOptions but ``thresholds``, whose entries
#: are keys of their own (``[tool.gradscope.thresholds]``, or at the top level).
ANALYSIS_KEYS: tuple[str, ...] = tuple(f.name for f in OPTION_FIELDS if f.name != "thresholds")


def _with_where(error: ConfigError, where: str) -> ConfigError:
    return ConfigError(f"{error.message}{where}", error.hint) if where else error


@dataclass(frozen=True)
class Settings:
    """Everything ``gradscope analyze`` can be told, with its defaults.

    The options of the analysis live in ``analysis`` (an :class:`AnalysisOptions`
    starting from :func:`gradscope.options.settings_defaults`) and read as attributes
    of their own (``settings.lr``, ``settings.vanishing_warning``); the fields here
    are the command line's own settings, which never reach ``gradscope.analyze``.
    """

    fail_on: str = "error"
    input_shape: tuple[str, ...] = ()
    dtype: tuple[str, ...] = ()
    html: str | None = None
    json: str | None = None
    sarif: str | None = None
    #: Globs of model files, relative to the pyproject.toml's folder, analysed when
    #: ``gradscope analyze`` is given no target (:func:`resolve_targets`).
    targets: tuple[str, ...] = ()
    #: ``(target glob or path, shapes)`` pairs: input shapes of the targets that match,
    #: used when the command line gives no ``--input-shape`` (:func:`shapes_for`).
    input_shapes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    analysis: AnalysisOptions = field(default_factory=settings_defaults)
    source: str | None = field(default=None, compare=False)

    def __getattr__(self, name: str) -> Any:
        """``settings.lr``: an option of the analysis; ``settings.plain_depth``: a threshold."""
        analysis = self.__dict__.get("analysis")
        if analysis is not None:
            if name in ANALYSIS_KEYS:
                return getattr(analysis, name)
            if name in THRESHOLDS:
                return getattr(analysis.thresholds, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def merged(self, **overrides: Any) -> Settings:
        """A copy with the given values set, ignoring ``None`` (an option not given).

        Options of the analysis and thresholds go into ``analysis``, which checks
        them; a bad one is a :class:`ConfigError` that says where it came from.
        """
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        own = {k: v for k, v in given.items() if k in _OWN_KEYS}
        options = {k: v for k, v in given.items() if k in OPTION_NAMES}  # thresholds too
        limits = {k: v for k, v in given.items() if k in THRESHOLDS}
        unknown = set(given) - set(own) - set(options) - set(limits)
        if unknown:
            raise TypeError(f"unknown setting {sorted(unknown)[0]!r}")
        if options or limits:
            analysis = self.analysis
            try:
                if limits:
                    base = options.get("thresholds", analysis.thresholds)
                    if not isinstance(base, Thresholds):
                        raise ConfigError(f"thresholds must be a gradscope.Thresholds, not "
                                          f"{base!r}", "fix the setting")
                    options["thresholds"] = replace(base, **limits)
                own["analysis"] = analysis.replaced(**options)
                check_selection(own["analysis"])
            except ConfigError as error:
                raise _with_where(error, _where(self)) from None
        return replace(self, **own) if own else self

    def options(self, loss_fn: Any = None) -> AnalysisOptions:
        """The options of the analysis; a model file's ``loss_fn`` stands in for no ``loss``."""
        if self.analysis.loss is None and loss_fn is not None:
            return self.analysis.replaced(loss=loss_fn)
        return self.analysis


_OWN_KEYS = {f.name for f in fields(Settings)} - {"source", "analysis"}
#: Every key of ``[tool.gradscope]`` (with ``-`` or ``_``), ``thresholds`` a table of them.
_KEYS = _OWN_KEYS | set(ANALYSIS_KEYS) | set(THRESHOLDS)
_KINDS = {f.name: f.metadata["kind"] for f in OPTION_FIELDS}


def _where(settings: Settings) -> str:
    return f" (from {settings.source})" if settings.source else ""


def find_pyproject(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_settings(start: Path | None = None) -> Settings:
    """Defaults overlaid with ``[tool.gradscope]`` from the nearest pyproject.toml."""
    path = find_pyproject((start or Path.cwd()).resolve())
    if path is None:
        return Settings()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "fix the TOML syntax") from exc
    table = data.get("tool", {}).get("gradscope")
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.gradscope] in {path} is not a table", "write it as a table")
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key == "thresholds" and isinstance(value, dict):
            for sub, sub_value in value.items():
                sub_key = sub.replace("-", "_")
                if sub_key not in THRESHOLDS:
                    raise ConfigError(f"unknown key thresholds.{sub} in [tool.gradscope] of "
                                      f"{path}", "see the README for the settings")
                values[sub_key] = sub_value
            continue
        if key not in _KEYS:
            raise ConfigError(f"unknown key {raw_key!r} in [tool.gradscope] of {path}",
                              "see the README for the settings")
        if key in ("input_shape", "dtype"):
            value = _string_list(key, value, path)
        elif _KINDS.get(key) == "codes":  # select, ignore
            value = _code_list(raw_key, value, path)
        elif _KINDS.get(key) == "pairs":  # per-module-ignore
            value = _per_module_table(raw_key, value, path)
        elif key == "targets":
            value = _glob_list(raw_key, value, path)
        elif key == "input_shapes":
            value = _input_shapes_table(raw_key, value, path)
        elif key == "output" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # output = 0: the first element of a tuple output
        values[key] = value
    settings = Settings(source=str(path)).merged(**values)
    validate(settings)
    return settings


def _shape_text(item: Any) -> str | None:
    """``"8,3,32,32"`` or ``[8, 3, 32, 32]`` -> ``"8,3,32,32"``; anything else -> None."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and all(
            isinstance(d, int) and not isinstance(d, bool) for d in item):
        return ",".join(str(d) for d in item)
    return None


def _string_list(key: str, value: Any, path: Path, name: str | None = None) -> tuple[str, ...]:
    """``input-shape``/``dtype`` as one entry or a list of entries (a shape may be a list)."""
    raw: list[Any] = value if isinstance(value, list) else [value]
    items: list[str | None]
    if key == "input_shape":
        one = _shape_text(value)
        if one is not None:
            return (one,)
        items = [_shape_text(v) for v in raw]
    else:
        items = [v if isinstance(v, str) else None for v in raw]
    if not items or any(v is None for v in items):
        name = name or key.replace("_", "-")
        example = '"8,3,32,32" or [[8, 3, 32, 32], [8, 10]]' if key == "input_shape" \
            else '"int64" or ["float32", "int64"]'
        raise ConfigError(f"{name} in [tool.gradscope] of {path} must be like {example}, "
                          f"not {value!r}", "fix the setting")
    return tuple(v for v in items if v is not None)


_CODES_EXAMPLE = '["GS101", "GS8"]'


def _code_list(name: str, value: Any, path: Path) -> tuple[str, ...]:
    """``select``/``ignore``: a list of codes, as in ruff; anything else names the key."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} in [tool.gradscope] of {path} must be a list of rule codes "
                          f"like {_CODES_EXAMPLE}, not {value!r}", "fix the setting")
    return tuple(value)


def _per_module_table(name: str, value: Any,
                      path: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``[tool.gradscope.per-module-ignore]``: ``"glob" = ["GS101", ...]`` per line."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name} in [tool.gradscope] of {path} must be a table of "
                          f'"module glob" = {_CODES_EXAMPLE}, not {value!r}', "fix the setting")
    return tuple((glob, _code_list(f"{name}.{glob!r}", codes, path))
                 for glob, codes in value.items())


def _glob_list(name: str, value: Any, path: Path) -> tuple[str, ...]:
    """``targets``: a list of file globs (one string is a list of one)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f'{name} in [tool.gradscope] of {path} must be a list of file globs '
                          f'like ["models/*.py"], not {value!r}', "fix the setting")
    return tuple(items)


def _input_shapes_table(name: str, value: Any,
                        path: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``[tool.gradscope.input-shapes]``: ``"target glob or path" = ["8,3,32,32", ...]``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name} in [tool.gradscope] of {path} must be a table of "
                          f'"target glob" = ["8,3,32,32"], not {value!r}', "fix the setting")
    return tuple((glob, _string_list("input_shape", shapes, path, f"{name}.{glob!r}"))
                 for glob, shapes in value.items())


def _base_folder(settings: Settings) -> Path:
    """The folder ``targets`` and ``input-shapes`` globs are relative to."""
    return Path(settings.source).parent if settings.source else Path.cwd()


def _glob_files(pattern: str, base: Path) -> list[Path]:
    """Files matching ``pattern`` (``**`` spans folders), relative to ``base`` unless absolute."""
    import glob

    return [Path(base, hit).resolve()
            for hit in glob.glob(pattern, root_dir=base, recursive=True)
            if Path(base, hit).is_file()]


def _shown(path: Path) -> str:
    """Relative to the working directory when under it (shorter report names and output)."""
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def resolve_targets(settings: Settings) -> tuple[str, ...]:
    """``targets`` expanded: sorted, without duplicates; a glob matching nothing is an error."""
    base = _base_folder(settings)
    found: set[Path] = set()
    for pattern in settings.targets:
        hits = _glob_files(pattern, base)
        if not hits:
            where = f" in [tool.gradscope] of {settings.source}" if settings.source else ""
            raise ConfigError(f"targets glob {pattern!r}{where} matches no file under {base}",
                              "fix the glob or remove it")
        found.update(hits)
    return tuple(_shown(p) for p in sorted(found))


def shapes_for(settings: Settings, target: str) -> tuple[str, ...] | None:
    """The ``input-shapes`` entry for ``target``: an exact path first, else the first glob."""
    if not settings.input_shapes:
        return None
    base = _base_folder(settings)
    head = target
    if ":" in target:  # file.py:Name -> file.py (not a Windows drive letter)
        h, _, tail = target.rpartition(":")
        if h and tail and not tail.startswith(("\\", "/")):
            head = h
    file = Path(head).resolve() if Path(head).is_file() else None
    for key, shapes in settings.input_shapes:
        if key in (target, head) or (file is not None and (base / key).resolve() == file):
            return shapes
    if file is None:
        return None
    for key, shapes in settings.input_shapes:
        if file in _glob_files(key, base):
            return shapes
    return None


def check_selection(options: AnalysisOptions) -> None:
    """Every code of select/ignore/per-module-ignore against the rule registry.

    The options sit below the rules and cannot know the codes; the settings can, so
    a code that matches no rule is an error that names where it was written.
    """
    RuleSelection(select=options.select, ignore=options.ignore,
                  per_module_ignore=options.per_module_ignore)


def validate(settings: Settings) -> None:
    """Check every setting's type and range: a bad value is a one-line error, not a crash.

    The options of the analysis check themselves (:meth:`AnalysisOptions.validate`);
    the command line's own settings are checked here.
    """
    where = _where(settings)
    if settings.fail_on not in FAIL_ON:
        raise ConfigError(f"fail-on must be one of {', '.join(FAIL_ON)}, not "
                          f"{settings.fail_on!r}{where}", "fix the setting")
    if not isinstance(settings.analysis, AnalysisOptions):
        raise ConfigError(f"analysis must be AnalysisOptions, not {settings.analysis!r}",
                          "fix the setting")
    try:
        settings.analysis.validate()
        check_selection(settings.analysis)
    except ConfigError as error:
        raise _with_where(error, where) from None
    for name in ("html", "json", "sarif"):
        value = getattr(settings, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}{where}",
                              "fix the setting")
    for name in ("input_shape", "dtype"):
        value = getattr(settings, name)
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name.replace('_', '-')} must be a list of strings, not "
                              f"{value!r}{where}", "fix the setting")
    if not isinstance(settings.targets, tuple) or not all(
            isinstance(t, str) for t in settings.targets):
        raise ConfigError(f"targets must be a list of file globs, not {settings.targets!r}{where}",
                          "fix the setting")
    pairs = settings.input_shapes
    if not isinstance(pairs, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], tuple) and p[1] and all(isinstance(s, str) for s in p[1])
            for p in pairs):
        raise ConfigError(f"input-shapes must map target globs to lists of shapes, not "
                          f"{pairs!r}{where}", "fix the setting")
