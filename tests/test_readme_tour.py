"""The README's five-minute tour, run as written, so that it cannot silently stop working.

Every `$ ` line in the tour's `sh` blocks is run with bash from the repository (lines ending in `\\` continue
it), in order, against a fresh home and free ports; the lines under a command are output it must print, in
that order (other lines may come between). `…` stands for whatever differs from run to run, and so do times,
durations, fences, revisions and lease counters. Ids the tour shows (an approval, a request) are learnt from
the output that showed them and put into the later commands that use them. The upstream and `bastion serve`
run in the background, as they would in their own terminals.

Only what the reader would type changes: `.venv/bin/...` becomes this interpreter, ports 9000/8080/8081 become
free ports (in the tour's rules too), `flows.har` goes to a temporary directory, and BASTION_HOME,
BASTION_LISTEN and BASTION_ADMIN point every command at this run's Bastion.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO
from services import require_command
from support.bastion import clean_env
from support.ports import free_port

README = REPO / "README.md"
TOUR_HEADING = "## A five-minute tour"
TOUR_RULES = "rules/examples/tour.yaml"
BACKGROUND = ("bastion serve", "echo_upstream.py")  # long-running: their own terminal in the tour
RETRIED = ("audit tail", "audit verify", "locks list", "approvals list", "/metrics")  # reads that may lag
RETRY_FOR = 10.0

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
DYNAMIC = re.compile(
    rf"(?P<uuid>{UUID})"
    r"|(?P<partial>[0-9a-f]{8}(?:-[0-9a-f]{4})*-…)"
    r"|(?P<apr>apr_[0-9a-f]{20})"
    r"|(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)"
    r"|(?P<ms>\d+(?:\.\d+)?ms)"
    r"|(?P<counter>(?:expires_in=|retry-after: )\d+)"
    r"|(?P<big>\d{10,})"
    r"|(?P<hex>\b[0-9a-f]{12}\b)"
    r"|(?P<more>…)"
)
PLAIN = {"time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z", "ms": r"\d+(?:\.\d+)?ms", "big": r"\d{10,}",
         "hex": r"[0-9a-f]{12}", "more": r".*?"}


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def tour_section(text: str) -> list[str]:
    """The tour's lines: from its heading to the next heading outside a code block."""
    lines = text.splitlines()
    start = lines.index(TOUR_HEADING)
    section, fenced = [], False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            break
        section.append(line)
    return section


def tour_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    in_sh = False
    continued = False
    for line in tour_section(text):
        if line.startswith("```"):
            in_sh = not in_sh and line.strip() == "```sh"
            continue
        if not in_sh:
            continue
        if continued:
            steps[-1].command += " " + line.strip().removesuffix("\\").strip()
        elif line.startswith("$ "):
            steps.append(Step(line[2:].removesuffix("\\").strip()))
        else:
            assert steps, f"output before any command in the tour: {line!r}"
            steps[-1].expected.append(line)
        continued = line.endswith("\\")
    return steps


class Bindings:
    """Ids the tour shows, mapped to the ones this run produced."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}  # an id (or an id's prefix) as the tour shows it -> this run's id

    def lookup(self, token: str) -> str | None:
        """This run's id for a full id of the tour: bound exactly, or through the longest prefix shown."""
        if token in self.values:
            return self.values[token]
        prefixes = [p for p in self.values if token.startswith(p)]
        return self.values[max(prefixes, key=len)] if prefixes else None

    def pattern(self, line: str) -> tuple[re.Pattern[str], dict[str, str]]:
        """`line` as a regex, and which capture group binds which of the tour's ids."""
        parts: list[str] = []
        groups: dict[str, str] = {}  # group name -> tour token (a full id, or a prefix)
        seen: dict[str, str] = {}  # tour token -> group name, for repeats within the line
        pos = 0
        for m in DYNAMIC.finditer(line):
            parts.append(re.escape(line[pos:m.start()]))
            kind, token = m.lastgroup or "", m.group()
            known = self.lookup(token) if kind in ("uuid", "apr") else None
            if known is not None:
                parts.append(re.escape(known))
            elif kind in ("uuid", "apr", "partial"):
                key = token.removesuffix("…").rstrip("-") if kind == "partial" else token
                if key in seen and kind != "partial":
                    parts.append(f"(?P={seen[key]})")
                else:
                    name = f"g{len(groups)}"
                    parts.append(f"(?P<{name}>{UUID if kind != 'apr' else 'apr_[0-9a-f]+'})")
                    groups[name], seen[key] = key, name
            elif kind == "counter":
                parts.append(re.escape(token.rstrip("0123456789")) + r"\d+")
            else:
                parts.append(PLAIN[kind])
            pos = m.end()
        parts.append(re.escape(line[pos:]))
        return re.compile("".join(parts)), groups

    def substitute(self, command: str) -> str:
        def one(m: re.Match[str]) -> str:
            value = self.lookup(m.group())
            assert value is not None, f"the tour uses {m.group()} before any output showed it"
            return value

        return re.sub(rf"{UUID}|apr_[0-9a-f]{{20}}", one, command)


def match_output(expected: list[str], output: str, bindings: Bindings) -> str | None:
    """None when every expected line matches an output line, in order; otherwise what is missing. Binds the
    ids the matched lines show only when all of them match."""
    actual = [line.rstrip() for line in output.replace("\r", "").splitlines()]
    learnt: dict[str, str] = {}
    cursor = 0
    for want in (line.rstrip() for line in expected):
        if want.strip() == "…":
            continue
        pattern, groups = bindings.pattern(want)
        for i in range(cursor, len(actual)):
            m = pattern.fullmatch(actual[i])
            if m:
                learnt.update({token: m.group(name) for name, token in groups.items()})
                cursor = i + 1
                break
        else:
            return f"no output line matches {want!r} (as {pattern.pattern!r})"
    bindings.values.update(learnt)
    return None


@dataclass
class Tour:
    repo_env: dict[str, str]
    replacements: list[tuple[str, str]]
    aliases: list[str] = field(default_factory=list)
    background: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def localize(self, text: str) -> str:
        """All replacements in one pass, so that one's result is never rewritten by another."""
        table = dict(self.replacements)
        return re.sub("|".join(map(re.escape, table)), lambda m: table[m.group()], text)

    def script(self, command: str) -> str:
        return "\n".join(["set -o pipefail", "shopt -s expand_aliases", *self.aliases, command])

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", self.script(command)], cwd=REPO, env=self.repo_env,
                              capture_output=True, text=True, timeout=120)

    def start(self, command: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=REPO, env=self.repo_env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the session this test started for it
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    require_command("curl")
    upstream, proxy, admin = free_port(), free_port(), free_port()
    rules = tmp_path / "tour.yaml"
    text = (REPO / TOUR_RULES).read_text()
    assert "port: 9000" in text, "the tour's rules no longer name port 9000: update this test"
    rules.write_text(text.replace("port: 9000", f"port: {upstream}"))
    replacements = [
        (".venv/bin/bastion", f"{sys.executable} -m bastion"),
        (".venv/bin/python", sys.executable),
        (TOUR_RULES, str(rules)),
        ("flows.har", str(tmp_path / "flows.har")),
        ("--port 9000", f"--port {upstream}"),
        ("127.0.0.1:9000", f"127.0.0.1:{upstream}"),
        ("127.0.0.1:8080", f"127.0.0.1:{proxy}"),
        ("127.0.0.1:8081", f"127.0.0.1:{admin}"),
    ]
    env = clean_env({"BASTION_HOME": str(tmp_path / "home"), "BASTION_LISTEN": f"127.0.0.1:{proxy}",
                     "BASTION_ADMIN": f"127.0.0.1:{admin}"})
    t = Tour(env, replacements)
    try:
        yield t
    finally:
        t.stop()


def wait_for_output(step: Step, proc: subprocess.Popen[bytes], log: Path, bindings: Bindings,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (problem := match_output(step.expected, log.read_text(errors="replace"), bindings)) is not None:
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"{step.command!r}: {problem}\n{log.read_text(errors='replace')}"
        time.sleep(0.1)


def wait_ready(admin_url: str, timeout: float = 30.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(f"{admin_url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "bastion serve never became ready"
        time.sleep(0.1)


def run_step(tour: Tour, step: Step, bindings: Bindings, index: int, workdir: Path) -> None:
    command = bindings.substitute(tour.localize(step.command))
    expected = [tour.localize(line) for line in step.expected]
    localized = Step(command, expected)
    if command.startswith("alias "):
        tour.aliases.append(command)
    elif any(b in command for b in BACKGROUND):
        log = workdir / f"background-{index}.log"
        wait_for_output(localized, tour.start(command, log), log, bindings)
        if "bastion serve" in command:
            wait_ready("http://" + tour.repo_env["BASTION_ADMIN"])
    else:
        deadline = time.monotonic() + (RETRY_FOR if any(r in command for r in RETRIED) else 0)
        while True:
            result = tour.run(command)
            problem = match_output(expected, result.stdout + result.stderr, bindings)
            if not expected and result.returncode != 0:
                problem = f"exit status {result.returncode}"
            if problem is None or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        assert problem is None, f"tour step {step.command!r}: {problem}\n--- output:\n{result.stdout}{result.stderr}"


def test_the_readme_tour_runs_as_written(tour: Tour, tmp_path: Path) -> None:
    steps = tour_steps(README.read_text(encoding="utf-8"))
    assert any("bastion serve" in s.command for s in steps) and any("approvals approve" in s.command
                                                                      for s in steps)
    bindings = Bindings()
    for i, step in enumerate(steps):
        run_step(tour, step, bindings, i, tmp_path)


# -- the checker itself: it must refuse output that differs from the tour ----------------------------------------

def test_tour_parser_joins_continued_commands_and_keeps_output_with_its_command() -> None:
    text = ("# X\n" + TOUR_HEADING + "\n\n```sh\n$ one \\\n    --flag\nout 1\n$ two\n```\n\n```yaml\n$ not: a command\n"
            "```\n\n## Next\n```sh\n$ outside\n```\n")
    steps = tour_steps(text)
    assert [(s.command, s.expected) for s in steps] == [("one --flag", ["out 1"]), ("two", [])]


def test_output_matching_tolerates_what_varies_and_nothing_else() -> None:
    b = Bindings()
    tour_line = ('2026-12-05T05:23:40.226Z  01a244a8-7443-…  writer  deny  DELETE http://x/pages/intro  403  5.8ms  '
                 'policy_denied')
    run_line = ("2027-01-01T00:00:00.001Z  01b00000-1111-7222-8333-944444444444  writer  deny  DELETE "
                "http://x/pages/intro  403  12.0ms  policy_denied")
    assert match_output(["first", "…", tour_line], f"first\nnoise\n{run_line}\n", b) is None
    assert b.substitute("show 01a244a8-7443-7168-b6b3-196d08851109") == "show 01b00000-1111-7222-8333-944444444444"
    assert match_output([tour_line], run_line.replace("deny", "allow"), Bindings()) is not None
    assert match_output(["a", "b"], "b\na\n", Bindings()) is not None  # order matters
    approval = Bindings()
    assert match_output(['x apr_37c43731610a3a87a3b0 y "apr_37c43731610a3a87a3b0"'],
                        'x apr_00000000000000000001 y "apr_00000000000000000002"', approval) is not None
    assert match_output(["apr_37c43731610a3a87a3b0 pending"], "apr_00000000000000000001 pending", approval) is None
    assert approval.substitute("approve apr_37c43731610a3a87a3b0") == "approve apr_00000000000000000001"
