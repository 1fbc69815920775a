"""Every command of the README runs as written (issue 15: "Every README command must run").

The README's fenced ``bash`` and ``python`` blocks are read from README.md itself, so an
edited example is tested as edited. Each block belongs to a section, and each section says
how its block is run:

* "Commands": every command, in order, in one scratch directory that holds what the
  commands assume (``partitioner/data/edge-hub-cloud.toml``, as in a clone). Shell
  variables (``SYS=...``) carry over to later commands. ``runtime serve`` keeps running:
  it is started in the background, the next command waits until its ``--listen`` port
  accepts connections, and it is stopped at the end (and must not have printed a
  traceback);
* "Python API": the block runs with ``python`` in that same directory, after "Commands"
  (it uses their model and input);
* "Two commands": the first block (fresh venv, ``pip install -e .``, ``partitioner demo``)
  runs as written in a copy of the repository; the second is the test suite itself, so it
  is checked to be exactly what ``.ci/run`` (which CI runs) runs instead of recursing;
* "Lean worker (edge devices)": run by ``tests/test_lean_worker.py``.

A block in any other section fails :func:`test_every_readme_block_is_run`: teach this file
how to run it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

COMMANDS, PYTHON_API, TWO_COMMANDS, LEAN_WORKER = (
    "Commands", "Python API", "Two commands", "Lean worker (edge devices)")
HANDLED = {COMMANDS, PYTHON_API, TWO_COMMANDS, LEAN_WORKER}


@dataclass(frozen=True)
class Block:
    """A fenced code block of the README: its section heading, language and text."""

    section: str
    language: str
    text: str


def readme_blocks(path: Path = README) -> list[Block]:
    """The README's fenced ``bash`` / ``python`` blocks, each with its ``##`` section."""
    blocks, section = [], ""
    lines = path.read_text(encoding="utf-8").splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = k + 1
            while not lines[end].startswith("```"):
                end += 1
            if fence.group(1) in ("bash", "python"):
                blocks.append(Block(section, fence.group(1), "\n".join(lines[k + 1:end])))
            k = end
        k += 1
    return blocks


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].rstrip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append(command)
    return out


def section(name: str, language: str = "bash") -> list[Block]:
    found = [b for b in readme_blocks() if b.section == name and b.language == language]
    assert found, f"README.md has no {language} block under '## {name}'"
    return found


def environment(with_repo_on_path: bool = True) -> dict[str, str]:
    """The test's environment, with this interpreter's scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if with_repo_on_path:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    else:
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    return env


def copy_repository(dest: Path) -> Path:
    """The repository's tracked files (its working-tree versions) under ``dest``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode().split("\0")
        files = [f for f in listed if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not {".git", ".venv", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


def _listen_address(command: str) -> tuple[str, int]:
    words = shlex.split(command)
    host, _, port = words[words.index("--listen") + 1].rpartition(":")
    return host, int(port)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _run(command: str, prelude: list[str], cwd: Path, env: dict[str, str],
         timeout: float = 900) -> subprocess.CompletedProcess[str]:
    script = "\n".join(["set -e", *prelude, command])
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"README command failed (exit {proc.returncode}): {command}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
    return proc


def stop(procs: list[subprocess.Popen[Any]]) -> None:
    """Terminate long-running commands (servers), killing those that do not exit."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_every_readme_block_is_run() -> None:
    blocks = readme_blocks()
    assert blocks
    for b in blocks:
        assert b.section in HANDLED, (
            f"README block under '## {b.section}' is not run by any test: add it to "
            f"tests/test_readme.py\n{b.text}")


def test_command_parsing_joins_continuations_and_drops_comments() -> None:
    text = "# a comment\nrun a \\\n    --b c   # note\n\nSYS=x.toml\n"
    assert commands(text) == ["run a --b c   # note", "SYS=x.toml"]


@pytest.mark.slow
def test_readme_commands_and_python_api_run_as_written(tmp_path: Path) -> None:
    from partitioner.data import example_system_path

    work = tmp_path / "work"
    (work / "partitioner" / "data").mkdir(parents=True)
    shutil.copy2(example_system_path(), work / "partitioner" / "data" / "edge-hub-cloud.toml")
    env = environment()
    prelude: list[str] = []
    servers: list[tuple[str, subprocess.Popen[str], Path]] = []
    try:
        for block in section(COMMANDS):
            for command in commands(block.text):
                if re.match(r"^[A-Za-z_]\w*=\S*(\s+#.*)?$", command):
                    prelude.append(command)  # a shell variable the later commands use
                elif command.startswith("runtime serve"):
                    host, port = _listen_address(command)
                    assert not _port_open(host, port), (
                        f"port {port} is in use; the README command needs it: {command}")
                    log = tmp_path / f"serve-{port}.log"
                    with open(log, "w") as sink:
                        proc = subprocess.Popen(
                            ["bash", "-c", "\n".join([*prelude, "exec " + command])],
                            cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT,
                            text=True)
                    servers.append((command, proc, log))
                    deadline = time.monotonic() + 180
                    while not _port_open(host, port):
                        assert proc.poll() is None, (
                            f"{command} exited {proc.returncode}:\n{log.read_text()}")
                        assert time.monotonic() < deadline, f"{command}: not listening"
                        time.sleep(0.2)
                else:
                    _run(command, prelude, work, env)
        for block in section(PYTHON_API, "python"):
            _run(f"python - <<'README_PYTHON'\n{block.text}\nREADME_PYTHON", [], work, env)
    finally:
        stop([proc for _, proc, _ in servers])
    for command, _, log in servers:
        assert "Traceback" not in log.read_text(), f"{command}\n{log.read_text()}"
    # what the commands should have left behind
    assert (work / "bundle" / "manifest.json").is_file()
    assert (work / "plan.png").stat().st_size > 0
    assert (work / "out.npz").is_file()
    assert (work / "bundle-api" / "fallback" / "without-nano" / "manifest.json").is_file()


def test_readme_test_command_is_what_ci_runs() -> None:
    # Running it here would run this suite inside itself; CI runs it (.ci/run).
    blocks = section(TWO_COMMANDS)
    assert len(blocks) == 2
    [command] = commands(blocks[1].text)
    ci = [re.sub(r"^python -m pip install -q ", "pip install ", line.strip())
          for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = command.split(" && ")
    assert steps[-1].startswith("python -m pytest")
    for step in steps:
        assert any(line.startswith(step) for line in ci), f"{step!r} is not in .ci/run"


@pytest.mark.slow
def test_readme_first_command_installs_and_runs_the_demo(tmp_path: Path) -> None:
    # A fresh venv from a copy of the repository, as a new user would (pip's cache and
    # the configured indexes make the install fast; CI has PyPI access).
    repo = copy_repository(tmp_path / "repo")
    [command] = commands(section(TWO_COMMANDS)[0].text)
    assert command.endswith("partitioner demo")
    proc = _run(command, [], repo, environment(with_repo_on_path=False), timeout=1800)
    assert "OK" in proc.stdout.splitlines()[-1], proc.stdout
