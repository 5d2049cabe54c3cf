"""The command line: options in, one call of the library, reports and an exit code out.

This module must not import torch at import time: ``gradscope --help``,
``--version`` and ``rules`` run in pre-commit hooks on every commit. Torch is
imported inside ``analyze`` only. The settings, the rule selection and the
report model are imported inside the commands too, so that ``--help`` pays for
click and little else (``benchmarks/startup.py``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from gradscope._version import __version__
from gradscope.errors import ConfigError, ExitCode, GradscopeError, NoModelError

# The declarations the analyze options are built from (torch-free, no settings layer).
from gradscope.options import FAIL_ON, OPTION_FIELDS, settings_default_of

if TYPE_CHECKING:
    from pathlib import Path

    from gradscope.config import Settings


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Progress:
    """Stage messages on stderr for stages that last: after ``delay`` s, then every ``every`` s.

    At a terminal the first line comes after a second; in a CI log or a pre-commit hook
    (stderr not a terminal) after 10 s, so that quick runs print nothing before their
    result or their one-line error, and a long one still shows it is alive at least
    every 10 s (issue 15).
    """

    def __init__(self, enabled: bool, label: str, *, delay: float = 1.0,
                 every: float = 10.0) -> None:
        self.enabled = enabled
        self.label = label
        self.delay = delay
        self.every = every
        self._done: threading.Event | None = None
        self._start = time.monotonic()
        self._stream = sys.stderr  # tracers redirect sys.stderr while they run

    def __call__(self, message: str) -> None:
        self.stop()
        if not self.enabled:
            return
        done = self._done = threading.Event()

        def report() -> None:
            wait = self.delay
            while not done.wait(wait):
                elapsed = time.monotonic() - self._start
                click.echo(f"gradscope: {self.label}: {message}... ({elapsed:.0f}s)",
                           file=self._stream)
                wait = self.every

        threading.Thread(target=report, daemon=True).start()

    def stop(self) -> None:
        if self._done is not None:
            self._done.set()
            self._done = None


def _fail(error: GradscopeError, debug: bool) -> None:
    _report_error(error, debug)
    sys.exit(int(error.exit_code))


def _report_error(error: GradscopeError, debug: bool, target: str | None = None) -> None:
    """``gradscope: error: [TARGET: ]message (hint)`` on stderr, the traceback with --debug."""
    if debug:
        import traceback

        traceback.print_exception(error)
    where = f"{target}: " if target else ""
    click.echo(f"gradscope: error: {where}{error.one_line()}", err=True)


def _report_bug(error: BaseException, target: str | None = None) -> None:
    """A bug in gradscope, not the user's to fix: the traceback for the report, one line."""
    import traceback

    traceback.print_exception(error)
    where = f"{target}: " if target else ""
    click.echo(f"gradscope: internal error: {where}{type(error).__name__}: "
               f"{' '.join(str(error).split())} (this is a bug in gradscope; please report "
               "it with the traceback above)", err=True)


def _per_target(path: str | None, stem: str, many: bool) -> str | None:
    """With several targets, ``out.json`` becomes ``out.<target>.json`` for each."""
    if path is None or path == "-" or not many:
        return path
    from pathlib import Path

    p = Path(path)
    return str(p.with_name(f"{p.stem}.{stem}{p.suffix}"))


def _target_stem(target: str) -> str:
    """``models/a.py`` -> ``a``; ``a.py:Net`` -> ``a_Net``; ``pkg.mod:Net`` -> ``pkg.mod_Net``."""
    head, name = target, None
    if ":" in target:
        h, _, tail = target.rpartition(":")
        if h and tail and not tail.startswith(("\\", "/")):  # not a Windows drive letter
            head, name = h, tail
    is_file = head.endswith(".py") or "/" in head or "\\" in head
    from pathlib import Path

    base = Path(head).stem if is_file else head
    return f"{base}_{name}" if name else base


def _target_stems(targets: tuple[str, ...]) -> list[str]:
    """One distinct stem per target, so no report overwrites another."""
    stems: list[str] = []
    for target in targets:
        stem = base = _target_stem(target)
        n = 2
        while stem in stems:
            stem, n = f"{base}_{n}", n + 1
        stems.append(stem)
    return stems


@click.group(context_settings=CONTEXT, invoke_without_command=False)
@click.version_option(__version__, "--version", "-V", prog_name="gradscope")
def main() -> None:
    """gradscope: diagnose gradient flow in PyTorch models before training.

    \b
    gradscope analyze model.py               terminal summary of one model
    gradscope analyze model.py --html r.html --json r.json
    gradscope analyze model.py --html r.html --open   ... and open it in a browser
    gradscope view r.html                    open a written HTML report in a browser
    gradscope analyze model.py --baseline old.json   fail only on findings not in old.json
    gradscope diff old.json new.json         what changed between two JSON reports
    gradscope rules                          every rule code
    gradscope rules GS101                    what a rule means and how to fix it
    """


def _default_text(value: Any) -> str:
    """`` (default X)`` for the help, when the default is worth saying."""
    if value is None or value == () or isinstance(value, bool):
        return ""
    return f" (default {value})"


def _analysis_option(f: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one ``AnalysisOptions`` field, from its declaration.

    ``default=None`` throughout: an option not given leaves the ``[tool.gradscope]``
    value (or the default) in place (``Settings.merged``).
    """
    meta = f.metadata
    flag = "--" + f.name.replace("_", "-")
    kind = meta["kind"]
    help_text = meta["help"] + _default_text(settings_default_of(f)) + "."
    kwargs: dict[str, Any] = {"default": None, "help": help_text}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if kind == "switch":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, **kwargs)
    if kind == "flag":
        return click.option(flag, f.name, is_flag=True, **kwargs)
    if kind in ("codes", "pairs"):
        del kwargs["default"]
        return click.option(flag, f.name, multiple=True, **kwargs)
    if meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    elif kind == "float":
        kwargs["type"] = float if meta["minimum"] is None else click.FloatRange(
            min=meta["minimum"], min_open=meta["min_open"])
    elif kind == "int":
        kwargs["type"] = int if meta["minimum"] is None else click.IntRange(min=meta["minimum"])
    return click.option(flag, f.name, **kwargs)


def _analysis_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every option of the analysis, in the order ``gradscope.options`` declares them."""
    for f in reversed(OPTION_FIELDS):
        if f.metadata["cli"]:
            command = _analysis_option(f)(command)
    return command


@main.command(context_settings=CONTEXT)
@click.argument("targets", nargs=-1, required=False)
@click.option("--input-shape", "input_shape", multiple=True, metavar="N,C,H,W",
              help="Shape of one positional input; repeat for several inputs.")
@click.option("--dtype", multiple=True, metavar="DTYPE",
              help="Input dtype (float32, int64, ...): one for all inputs or one per input.")
@_analysis_options
@click.option("--html", default=None, metavar="PATH", help="Write the HTML report.")
@click.option("--open", "open_html", is_flag=True,
              help="Open the HTML report in a browser once written (needs --html).")
@click.option("--json", "json_path", default=None, metavar="PATH",
              help="Write the JSON report ('-' for stdout).")
@click.option("--sarif", default=None, metavar="PATH", help="Write a SARIF 2.1.0 report.")
@click.option("--format", "fmt", type=click.Choice(["text", "github", "json"]), default="text",
              help="stdout: text summary (default), GitHub Actions annotations (github), "
                   "or the JSON report (json, as --json -).")
@click.option("--fail-on", "fail_on", type=click.Choice(FAIL_ON), default=None,
              help="Exit 1 when a finding at or above this severity exists (default error).")
@click.option("--baseline", "baseline", default=None, metavar="OLD.json",
              help="A JSON report written earlier: only findings not in it decide the exit "
                   "code (all are still shown).")
@click.option("--skip-non-models", "skip_non_models", is_flag=True,
              help="Skip (exit 0 for) files that define no model instead of failing on "
                   "them: for pre-commit hooks handed every changed .py file.")
@click.option("--color/--no-color", default=None, help="Colour the terminal output.")
@click.option("--quiet", "-q", is_flag=True, help="No terminal summary and no progress.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def analyze(targets: tuple[str, ...], input_shape: tuple[str, ...], dtype: tuple[str, ...],
            html: str | None, json_path: str | None, sarif: str | None, fail_on: str | None,
            skip_non_models: bool, baseline: str | None, color: bool | None, quiet: bool,
            debug: bool, open_html: bool, fmt: str = "text", **options: Any) -> None:
    """Analyse the gradient flow of one or more models.

    TARGET is path/to/file.py, path/to/file.py:NAME or package.module:NAME;
    without one, the targets globs of [tool.gradscope] in pyproject.toml.
    Exit status: 0 no finding at or above --fail-on, 1 at least one, 2 the
    run could not be done.
    """
    from gradscope.config import load_settings, validate
    from gradscope.options import parse_per_module, split_codes
    from gradscope.rules.selection import check_codes

    try:
        # Checked here, before merging, so an unknown code names the option it came from.
        # ``options``: the analysis options given, by field name (``_analysis_options``).
        options["select"] = check_codes(split_codes(options["select"]), "--select")
        options["ignore"] = check_codes(split_codes(options["ignore"]), "--ignore")
        options["per_module_ignore"] = tuple(
            (glob, check_codes(codes, f"--per-module-ignore {glob!r}"))
            for glob, codes in map(parse_per_module, options["per_module_ignore"]))
        settings = load_settings().merged(
            input_shape=input_shape, dtype=dtype, html=html, json=json_path, sarif=sarif,
            fail_on=fail_on, **options)
        validate(settings)
        if not targets:
            from gradscope.config import resolve_targets

            targets = resolve_targets(settings)
            if not targets:
                raise ConfigError("no target given",
                                  "give TARGET... or set targets = [\"models/*.py\"] in "
                                  "[tool.gradscope] of pyproject.toml")
        _check_outputs(settings, len(targets), fmt)
        if open_html and settings.html in (None, "-"):
            raise ConfigError("--open needs an HTML report file",
                              "add --html PATH (not '-')")
        from gradscope.baseline import load_report

        # Read before the analysis: a missing or corrupt baseline fails at once, not after it.
        known = None if baseline is None else (baseline, load_report(baseline, "baseline"))
        failed = False
        broken: list[str] = []  # targets that could not be analysed (several targets)
        many = len(targets) > 1
        for target, stem in zip(targets, _target_stems(targets), strict=True):
            if skip_non_models and not _may_be_model(target):
                _skipped(target, "no model in it (no build_model(), no module-level `model`, "
                         "no class with a base class)", quiet)
                continue
            try:
                failed |= _analyze_one(target, _for_target(settings, target, input_shape),
                                       stem=stem, many=many, color=color,
                                       quiet=quiet, fmt=fmt, baseline=known)
            except NoModelError as error:
                if not skip_non_models:
                    if not many:
                        raise
                    _report_error(error, debug, target)
                    broken.append(target)
                    continue
                _skipped(target, error.message, quiet)
                continue
            except GradscopeError as error:
                # One target's failure does not stop the others: each is analysed, each
                # error line names its target, and the run exits 2 at the end.
                if not many:
                    raise
                _report_error(error, debug, target)
                broken.append(target)
                continue
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # a bug on one target: go on to the next, exit 2
                if not many:
                    raise
                _report_bug(error, target)
                broken.append(target)
                continue
            if open_html:
                _open_in_browser(str(_per_target(settings.html, stem, many)))
        if broken:
            click.echo(f"gradscope: {len(broken)} of {len(targets)} targets could not be "
                       f"analysed: {', '.join(broken)}", err=True)
            sys.exit(int(ExitCode.USAGE))
    except GradscopeError as error:
        _fail(error, debug)
    except KeyboardInterrupt:
        click.echo("gradscope: interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - last resort: exit 2, never 1
        # Exit 2 ("could not be done"), never 1, which CI reads as "findings".
        _report_bug(error)
        sys.exit(int(ExitCode.USAGE))
    sys.exit(int(ExitCode.FINDINGS if failed else ExitCode.OK))


def _may_be_model(target: str) -> bool:
    """False for a .py file that certainly defines no model: it is then not even imported."""
    from pathlib import Path

    from gradscope._scan import may_define_model

    path = Path(target)
    return path.suffix != ".py" or not path.is_file() or may_define_model(path)


def _skipped(target: str, why: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"gradscope: skipped {target}: {why}", err=True)


def _open_in_browser(report: str | Path) -> None:
    """Hand a report file to the user's browser; a file that is not there is exit 2."""
    import webbrowser
    from pathlib import Path

    path = Path(report)
    if not path.is_file():
        raise ConfigError(f"no such report file: {path}",
                          "write one with 'gradscope analyze MODEL --html PATH'")
    # webbrowser.open returns False when no browser could be started (a server, a
    # container, CI): say so with the file, instead of exiting 0 having shown nothing.
    if not webbrowser.open(path.resolve().as_uri()):
        raise ConfigError(f"no browser could be opened for {path}",
                          f"open {path.resolve()} yourself, or set $BROWSER to a browser "
                          "command")


def _for_target(settings: Settings, target: str, cli_shapes: tuple[str, ...]) -> Settings:
    """``[tool.gradscope.input-shapes]`` for this target, unless --input-shape was given."""
    if cli_shapes or not settings.input_shapes:
        return settings
    from gradscope.config import shapes_for

    shapes = shapes_for(settings, target)
    return settings if shapes is None else settings.merged(input_shape=shapes)


def _check_outputs(settings: Settings, count: int, fmt: str = "text") -> None:
    """Fail before the analysis, not after it, when a report cannot be written."""
    from gradscope._io import ensure_parent_writable

    to_stdout = [f"{flag} -" for flag, path in (("--html", settings.html),
                                                ("--json", settings.json),
                                                ("--sarif", settings.sarif)) if path == "-"]
    if fmt == "json" and settings.json != "-":
        to_stdout.append("--format json")
    elif fmt == "github":
        to_stdout.append("--format github")
    if len(to_stdout) > 1:
        raise ConfigError(f"{' and '.join(to_stdout)} both write to stdout",
                          "send at most one report to stdout")
    # GitHub annotations are one line each, so several targets' can share stdout.
    if to_stdout and count > 1 and to_stdout != ["--format github"]:
        raise ConfigError(f"{to_stdout[0]} with {count} targets would mix their reports on "
                          "stdout", "give a file path; each target gets its own file")
    for path in (settings.html, settings.json, settings.sarif):
        if path is not None:
            ensure_parent_writable(path)


def _analyze_one(target: str, settings: Settings, *, stem: str, many: bool,
                 color: bool | None, quiet: bool, fmt: str = "text",
                 baseline: tuple[str, dict[str, Any]] | None = None) -> bool:
    # At a terminal, progress after a second; in CI logs and pre-commit hooks only for
    # stages past 10 s (a quick run prints nothing before its result or its one-line
    # error), then every 10 s, so a long run is seen to be alive.
    interactive = sys.stderr.isatty()
    progress = Progress(enabled=not quiet, label=target, delay=1.0 if interactive else 10.0)
    try:
        progress("loading")
        from gradscope.api import analyze as run_analysis
        from gradscope.loading import load_target

        big = settings.analysis.stream or settings.analysis.distributed
        if settings.analysis.distributed:  # every process builds the same model
            import torch

            torch.manual_seed(settings.analysis.seed)
        loaded = load_target(target, list(settings.input_shape), list(settings.dtype),
                             meta=settings.analysis.meta or big, values=big)
        report = run_analysis(loaded.model, loaded.inputs, settings.options(loaded.loss_fn),
                              name=loaded.name, source=loaded.source, notes=loaded.notes,
                              progress=progress, declared=loaded.declared,
                              example_batches=loaded.batches,
                              synthetic_inputs=loaded.synthetic_inputs)
        progress("writing reports")
        deciding: list[Any] = list(report.findings)
        if baseline is not None:  # all findings are shown; only new ones decide the exit code
            from gradscope.baseline import baseline_note, new_findings

            deciding = new_findings(baseline[1], report.findings)
            report.notes.append(baseline_note(baseline[0], report.findings, deciding))
        doc = report.to_dict()
        if settings.analysis.distributed:
            from gradscope.distributed import rank

            if rank() != 0:  # every process ran the probe; rank 0 writes the report
                from gradscope.baseline import fails

                return fails(deciding, settings.fail_on)
    finally:
        progress.stop()
    from gradscope.render.html import write_html
    from gradscope.render.json_report import write_json
    from gradscope.render.sarif import write_sarif

    json_to = _per_target(settings.json, stem, many)
    if json_to is not None:
        write_json(doc, json_to)
    html_to = _per_target(settings.html, stem, many)
    if html_to is not None:
        write_html(doc, html_to)
    sarif_to = _per_target(settings.sarif, stem, many)
    if sarif_to is not None:
        write_sarif(doc, sarif_to)
    if fmt == "json" and json_to != "-":
        write_json(doc, "-")
    elif fmt == "github":  # the annotations are the output asked for: printed even with -q
        from gradscope.render.github import render_github

        click.echo(render_github(doc), nl=False)
    elif not quiet and "-" not in (json_to, html_to, sarif_to):
        from gradscope.render.terminal import render_terminal

        use_color = color if color is not None else (sys.stdout.isatty()
                                                     and "NO_COLOR" not in os.environ)
        # color= explicitly: click.echo strips ANSI codes from a pipe unless told not to,
        # which would make --color a no-op in CI logs.
        # The terminal's width: $COLUMNS, else the terminal's own, else 80 (a pipe, CI).
        import shutil

        width = shutil.get_terminal_size((80, 24)).columns
        click.echo(render_terminal(doc, color=use_color, width=width), nl=False,
                   color=use_color)
        for label, path in (("HTML", html_to), ("JSON", json_to), ("SARIF", sarif_to)):
            if path is not None and path != "-":
                click.echo(f"{label} report: {path}")
    from gradscope.baseline import fails

    return fails(deciding, settings.fail_on)


@main.command(context_settings=CONTEXT)
@click.argument("code", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "reference"]),
              default="text", show_default=True,
              help="markdown: the README's rule table; reference: docs/rules.md")
def rules(code: str | None, fmt: str) -> None:
    """List every rule code, or explain one (gradscope rules GS101)."""
    from gradscope.rules.registry import get_rule, iter_rules, markdown_reference, markdown_table

    if fmt == "markdown" and not code:
        click.echo(markdown_table(), nl=False)
        return
    if fmt == "reference" and not code:
        click.echo(markdown_reference(), nl=False)
        return
    if code:
        try:
            click.echo(get_rule(code).explain(), nl=False)
        except KeyError:
            _fail(GradscopeError(f"unknown rule {code!r}", "run 'gradscope rules' for the list"),
                  False)
        return
    for rule in iter_rules():
        click.echo(f"{rule.code}  {rule.severity:<7}  {rule.category:<18}  {rule.summary}")


@main.command(context_settings=CONTEXT)
@click.argument("report", metavar="REPORT.html")
def view(report: str) -> None:
    """Open an HTML report (written by analyze --html) in a browser."""
    try:
        _open_in_browser(report)
    except GradscopeError as error:
        _fail(error, False)


@main.command("diff", context_settings=CONTEXT)
@click.argument("old", metavar="OLD.json")
@click.argument("new", metavar="NEW.json")
@click.option("--fail-on-new", "fail_on_new", type=click.Choice(FAIL_ON), default="error",
              show_default=True,
              help="Exit 1 when a finding new in NEW.json (or one whose severity got worse) is "
                   "at or above this severity.")
@click.option("--factor", type=click.FloatRange(min=1.0, min_open=True), default=2.0,
              show_default=True,
              help="List layers whose gradient RMS moved by more than this factor.")
def diff_command(old: str, new: str, fail_on_new: str, factor: float) -> None:
    """What changed between two JSON reports: findings, status, layer gradients.

    Exit status: 0 nothing new at or above --fail-on-new, 1 something is, 2 a
    report could not be read. Does not import torch.
    """
    from gradscope.baseline import diff, load_report, render_diff

    try:
        result = diff(load_report(old), load_report(new), factor=factor)
    except GradscopeError as error:
        _fail(error, False)
    click.echo(render_diff(result, old, new), nl=False)
    sys.exit(int(ExitCode.FINDINGS if result.fails(fail_on_new) else ExitCode.OK))


def run(argv: list[str] | None = None) -> Any:
    """Entry point for ``python -m gradscope`` and the console script."""
    return main(args=argv, prog_name="gradscope")
