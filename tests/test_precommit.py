"""gradscope as a pre-commit hook: the manifest, ``analyze --skip-non-models``, real hooks.

The hook tests run pre-commit and git for real in temporary repositories:
``pre-commit try-repo`` on a copy of this repository's ``.pre-commit-hooks.yaml``
(committed in a repository of its own, so the result does not depend on what is
uncommitted here), and a ``git commit`` that an installed hook blocks, with the
``repo: local`` config and with the ``repo: <url>`` + ``rev`` config users write.
The hook is ``language: system``: it runs the ``gradscope`` console script found on
PATH, so the venv's bin folder goes first on PATH. Skipped where pre-commit, git or
the console script are missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import cli_runner

from gradscope._scan import source_may_define_model
from gradscope.cli import main

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / ".pre-commit-hooks.yaml"
HEALTHY = REPO / "sample_models" / "relu_mlp_kaiming.py"
UNHEALTHY = REPO / "sample_models" / "deep_sigmoid_mlp.py"
BIN = Path(sys.executable).parent

#: An ordinary Python file: imported, it would fail (so a skip must not import it).
SCRIPT = 'import sys\n\n\ndef main():\n    return 0\n\n\nraise RuntimeError("imported")\n'
#: nn.Module building blocks whose constructors need arguments: no model to build.
LAYERS = textwrap.dedent("""
    from torch import nn


    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.linear = nn.Linear(dim, dim)

        def forward(self, x):
            return self.linear(x).relu()
""")
#: Classes, but none an nn.Module: imported, then skipped.
NOT_TORCH = "import dataclasses\n\n\nclass Config(dict):\n    pass\n"
#: Two constructible models and no build_model(): ambiguous, an error even when skipping.
TWO_MODELS = textwrap.dedent("""
    from torch import nn


    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)


    class B(A):
        pass
""")


# --- the static look: is a file worth importing? ---------------------------------------

@pytest.mark.parametrize(("source", "expected"), [
    ("import os\nprint('hi')\n", False),
    ("def main():\n    model = 1\n    return model\n", False),   # a local, not the module's
    ("def f(model):\n    return model\n", False),
    ("class Plain:\n    pass\n", False),                          # no base: no nn.Module
    ("if __name__ == '__main__':\n    print(1)\n", False),
    ("from torch import nn\nclass Net(nn.Module):\n    pass\n", True),
    ("from base import Base\nclass Net(Base):\n    pass\n", True),  # maybe an nn.Module
    ("class Net(metaclass=M):\n    pass\n", True),
    ("def build_model():\n    pass\n", True),
    ("from zoo import build_model\n", True),
    ("from zoo import make as build_model\n", True),
    ("import model\n", True),
    ("from zoo import *\n", True),
    ("model = make()\n", True),
    ("model: object = make()\n", True),
    ("model, other = make()\n", True),
    ("if True:\n    model = make()\n", True),
    ("try:\n    import a\nexcept ImportError:\n    model = b\n", True),
    ("for model in []:\n    pass\n", True),
    ("with make() as model:\n    pass\n", True),
    ("print(model := make())\n", True),
    ("match x:\n    case [model]:\n        pass\n", True),
    ("def setup():\n    global model\n    model = make()\n", True),
    ("this is not python (\n", True),                        # the import reports it
])
def test_static_scan(source: str, expected: bool) -> None:
    assert source_may_define_model(source) is expected


# --- analyze --skip-non-models -------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with its own pyproject.toml: no [tool.gradscope] leaks in."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return name


def test_without_the_option_a_non_model_file_is_exit_2(workdir: Path) -> None:
    result = cli_runner().invoke(main, ["analyze", _write(workdir, "layers.py", LAYERS)])
    assert result.exit_code == 2
    assert "no model found" in result.stderr


def test_non_model_files_are_skipped_not_imported(workdir: Path) -> None:
    files = [_write(workdir, "script.py", SCRIPT), _write(workdir, "layers.py", LAYERS),
             _write(workdir, "config.py", NOT_TORCH)]
    result = cli_runner().invoke(main, ["analyze", "--skip-non-models", *files])
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":")[0:2] for line in lines] == [
        ["gradscope", " skipped script.py"], ["gradscope", " skipped layers.py"],
        ["gradscope", " skipped config.py"]]
    assert "imported" not in result.stderr  # script.py was never run
    assert "need arguments: Block" in lines[1]
    assert result.stdout == ""


def test_quiet_skips_silently(workdir: Path) -> None:
    result = cli_runner().invoke(main, ["analyze", "-q", "--skip-non-models",
                                        _write(workdir, "script.py", SCRIPT)])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def test_models_beside_skipped_files_still_decide(workdir: Path) -> None:
    script = _write(workdir, "script.py", SCRIPT)
    result = cli_runner().invoke(main, ["analyze", "--skip-non-models", "--no-probe", script,
                                        str(UNHEALTHY), "--json", "out.json"])
    assert result.exit_code == 1, result.stderr
    assert "GS101" in result.stdout
    # Reports are written for the models only, named per target as usual.
    assert sorted(p.name for p in workdir.glob("out*.json")) == ["out.deep_sigmoid_mlp.json"]


@pytest.mark.parametrize(("text", "target_suffix"), [
    (TWO_MODELS, ""),                   # several models: choose one, do not skip it
    ("x = (\n", ""),                    # a syntax error is not "no model"
    (LAYERS, ":Block"),                 # a NAME the user gave is never skipped
])
def test_skip_does_not_hide_real_errors(workdir: Path, text: str, target_suffix: str) -> None:
    target = _write(workdir, "m.py", text) + target_suffix
    result = cli_runner().invoke(main, ["analyze", "--skip-non-models", "--no-probe", target])
    assert result.exit_code == 2, result.output + result.stderr
    assert "skipped" not in result.stderr


# --- pre-commit, for real ------------------------------------------------------------------

def _needs_tools() -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if importlib.util.find_spec("pre_commit") is None:
        pytest.skip("pre-commit is not installed (pip install -e '.[dev]')")
    if not (BIN / "gradscope").exists() and not (BIN / "gradscope.exe").exists():
        pytest.skip(f"no gradscope console script in {BIN} (pip install -e .)")
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST.name} is not there (not a source checkout)")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The hook's environment: venv first on PATH, no user or system git config."""
    _needs_tools()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "PRE_COMMIT")) and k != "SKIP"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               PRE_COMMIT_HOME=str(tmp_path / "pre-commit-home"), HF_HUB_OFFLINE="1",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, NO_COLOR="1")
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _git(cwd: Path, env: dict[str, str], *args: str) -> str:
    result = _run(["git", *args], cwd, env)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout.strip()


def _new_repo(path: Path, env: dict[str, str]) -> Path:
    path.mkdir()
    _git(path, env, "init", "-q")
    _git(path, env, "config", "user.email", "test@example.com")
    _git(path, env, "config", "user.name", "gradscope tests")
    _git(path, env, "config", "commit.gpgsign", "false")
    return path


def _pre_commit(*args: str) -> list[str]:
    return [sys.executable, "-m", "pre_commit", *args]


@pytest.fixture
def hook_repo(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """This repository's hook manifest, committed in a repository of its own: (path, rev)."""
    repo = _new_repo(tmp_path / "hook-repo", env)
    shutil.copy(MANIFEST, repo / MANIFEST.name)
    _git(repo, env, "add", MANIFEST.name)
    _git(repo, env, "commit", "-q", "-m", "hooks")
    return repo, _git(repo, env, "rev-parse", "HEAD")


@pytest.fixture
def project(tmp_path: Path, env: dict[str, str]) -> Path:
    """A user's repository: a healthy and an unhealthy model, and a plain script."""
    repo = _new_repo(tmp_path / "project", env)
    (repo / "models").mkdir()
    shutil.copy(HEALTHY, repo / "models" / "healthy.py")
    shutil.copy(UNHEALTHY, repo / "models" / "vanishing.py")
    (repo / "tools.py").write_text(SCRIPT)
    return repo


def test_manifest_is_valid(env: dict[str, str]) -> None:
    from pre_commit.clientlib import load_manifest

    (hook,) = load_manifest(str(MANIFEST))
    assert hook["id"] == "gradscope"
    assert hook["entry"].split()[:3] == ["gradscope", "analyze", "--skip-non-models"]
    # pre-commit 4.4 renamed `system` to `unsupported` and reads the old name as the new one.
    assert "\n  language: system\n" in MANIFEST.read_text()
    assert hook["language"] in ("system", "unsupported")
    assert (hook["pass_filenames"], hook["require_serial"]) == (True, True)
    assert hook["types"] == ["python"] and hook["files"] == r"\.py$"


def _try_repo(hook_repo: tuple[Path, str], project: Path, env: dict[str, str],
              *files: str) -> subprocess.CompletedProcess[str]:
    return _run(_pre_commit("try-repo", str(hook_repo[0]), "gradscope", "--verbose",
                            "--files", *files), project, env)


@pytest.mark.slow
def test_try_repo_healthy_model_passes(hook_repo: tuple[Path, str], project: Path,
                                       env: dict[str, str]) -> None:
    result = _try_repo(hook_repo, project, env, "models/healthy.py", "tools.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HEALTHY" in result.stdout
    assert "skipped tools.py" in result.stdout  # --verbose shows the hook's output


@pytest.mark.slow
def test_try_repo_unhealthy_model_fails(hook_repo: tuple[Path, str], project: Path,
                                        env: dict[str, str]) -> None:
    result = _try_repo(hook_repo, project, env, "models/vanishing.py")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Failed" in result.stdout and "GS101" in result.stdout


def test_try_repo_plain_python_file_passes(hook_repo: tuple[Path, str], project: Path,
                                           env: dict[str, str]) -> None:
    result = _try_repo(hook_repo, project, env, "tools.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout


LOCAL_CONFIG = """\
repos:
  - repo: local
    hooks:
      - id: gradscope
        name: gradscope
        entry: gradscope analyze --skip-non-models
        language: system
        types: [python]
        files: ^models/
        require_serial: true
"""


def _commit(repo: Path, env: dict[str, str], *files: str) -> subprocess.CompletedProcess[str]:
    _git(repo, env, "add", *files)
    return _run(["git", "commit", "-m", "change"], repo, env)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["local", "remote"])
def test_installed_hook_blocks_the_commit_of_an_unhealthy_model(
        config: str, hook_repo: tuple[Path, str], project: Path,
        env: dict[str, str]) -> None:
    text = LOCAL_CONFIG if config == "local" else (
        f"repos:\n  - repo: {hook_repo[0].as_posix()}\n    rev: {hook_repo[1]}\n"
        "    hooks:\n      - id: gradscope\n        files: ^models/\n")
    (project / ".pre-commit-config.yaml").write_text(text)
    installed = _run(_pre_commit("install"), project, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    blocked = _commit(project, env, ".pre-commit-config.yaml", "models/vanishing.py")
    assert blocked.returncode != 0, blocked.stdout + blocked.stderr
    assert "Failed" in blocked.stderr and "GS101" in blocked.stderr
    assert _run(["git", "rev-parse", "--verify", "-q", "HEAD"], project, env).returncode != 0

    _git(project, env, "rm", "-q", "--cached", "models/vanishing.py")
    if config == "remote":
        return  # the healthy commit is the same with either config: run it once
    done = _commit(project, env, ".pre-commit-config.yaml", "models/healthy.py", "tools.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gradscope....." in done.stderr and "Passed" in done.stderr  # hooks write stderr
    assert _git(project, env, "show", "--name-only", "--format=", "HEAD").split() == [
        ".pre-commit-config.yaml", "models/healthy.py", "tools.py"]
