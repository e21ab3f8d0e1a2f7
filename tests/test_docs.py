"""README.md against the program: docs that cannot drift.

Each test reads one promise of the README and the thing it describes from the program itself (the argument
parser object, the environment variables the code reads, the format strings it prints, the Makefile), so an
option, a variable or a message changed without the README fails here, at merge time at the latest.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import signal
import subprocess
from pathlib import Path

import pytest

from knack311.logs import _TAGS
from knack311.outcomes import RunReport

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# The program as shipped: the entry script, config.py and the package (the simulators and tests are not it).
PRODUCT = [ROOT / "send_esb_message.py", ROOT / "config.py", *sorted((ROOT / "knack311").glob("*.py"))]


# --- reading the README ----------------------------------------------------------------------------------------

def section(title: str, text: str = README) -> str:
    """The body of the heading `title` (any level), up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.MULTILINE)
    assert match, f"README.md has no heading {title!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, match.end())
    return text[match.end():end.start() if end else len(text)]


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def table_rows(text: str) -> list[list[str]]:
    """Markdown table rows as lists of cells (the separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s|:-]+\|", line):
            # a `|` inside backticks (`failed|held`) is not a cell border
            cells, cell, quoted = [], "", False
            for ch in line.strip()[1:-1]:
                if ch == "`":
                    quoted = not quoted
                if ch == "|" and not quoted:
                    cells.append(cell.strip())
                    cell = ""
                else:
                    cell += ch
            rows.append([*cells, cell.strip()])
    return rows


def quoted(cell: str) -> list[str]:
    """The code spans of a cell: `text`, or ``text with `backticks` in it``."""
    return [double or single for double, single in re.findall(r"``\s?(.+?)\s?``|`([^`]+)`", cell)]


# --- 1. the usage line names every option of the argument parser ------------------------------------------------

class _Parsed(Exception):
    pass


@pytest.fixture
def parser(monkeypatch) -> argparse.ArgumentParser:
    """The entry script's own parser object: main() is run up to the moment it parses the arguments."""

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    interrupt = signal.getsignal(signal.SIGINT)
    try:
        entry = importlib.import_module("send_esb_message")
    finally:
        signal.signal(signal.SIGINT, interrupt)  # the script resets SIGINT for its own process, not pytest's
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        entry.main(["data-tracker"])
    return caught.value.args[0]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings if option.startswith("--")}


def usage_lines() -> str:
    blocks = [b for b in fenced_blocks(section("Running it")) if "send_esb_message.py" in b]
    assert blocks, "README's 'Running it' has no usage block"
    return "\n".join(blocks)


def test_the_usage_names_every_option_of_the_parser_and_no_other(parser):
    usage = usage_lines()
    in_parser = options(parser)
    assert {"--dry-run", "--check", "--report", "--workers"} <= in_parser  # the parser object was really read
    in_readme = set(re.findall(r"--[a-z][a-z-]*", usage))
    assert not in_parser - in_readme, f"options missing from README's usage: {sorted(in_parser - in_readme)}"
    assert not in_readme - in_parser, f"README's usage names options the program lacks: {sorted(in_readme - in_parser)}"


def test_every_option_is_explained_under_running_it(parser):
    body = section("Running it")
    explained = set(re.findall(r"^- `(--[a-z-]+)", body, re.MULTILINE))
    missing = options(parser) - explained
    assert not missing, f"options without a '- `--option`' line under 'Running it': {sorted(missing)}"


# --- 2. the environment table names exactly the variables the program reads --------------------------------------

ENVIRONMENT_LIKE = re.compile(r"(^|\.)(env|environ|environment)$")
VARIABLE = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")


def _is_environment(node: ast.AST) -> bool:
    """`env`, `os.environ`, `self.env`...: a mapping of environment variables."""
    return ENVIRONMENT_LIKE.search(ast.unparse(node)) is not None


def _names(node: ast.AST, constants: dict[str, ast.AST]) -> list[str]:
    """Variable names held by an argument: a string, or a tuple/list of them (possibly a module constant)."""
    if isinstance(node, ast.Name) and node.id in constants:
        node = constants[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE.fullmatch(node.value):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [name for element in node.elts for name in _names(element, constants)]
    return []


def variables_read(source: str) -> set[str]:
    """The environment variables a module reads: `env.get("X")`, `env["X"]`, `os.getenv("X")`, a helper given
    the environment and a name (`_positive_number(env, "X", 30)`), and loops over names that read `env[name]`."""
    tree = ast.parse(source)
    constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
    found: set[str] = set()
    loop_names: dict[str, list[str]] = {}  # loop variable -> the names it runs over
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
            loop_names.setdefault(node.target.id, []).extend(_names(node.iter, constants))

    def key(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Name) and node.id in loop_names:
            return loop_names[node.id]
        return _names(node, constants)

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environment(node.value):
            found.update(key(node.slice))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "pop") and _is_environment(func.value):
                found.update(key(node.args[0]) if node.args else [])
            elif ast.unparse(func) in ("os.getenv", "getenv") and node.args:
                found.update(key(node.args[0]))
            elif any(_is_environment(arg) for arg in node.args):
                for arg in node.args:
                    found.update(key(arg))
    return found


def program_variables() -> set[str]:
    return set().union(*(variables_read(path.read_text(encoding="utf-8")) for path in PRODUCT))


def readme_variables() -> set[str]:
    names = set()
    for row in table_rows(section("Environment")):
        names.update(name for name in quoted(row[0]) if VARIABLE.fullmatch(name))
    return names


def test_code_spans():
    assert quoted("`A` and ``set `tz` in config.py`` / `B`") == ["A", "set `tz` in config.py", "B"]


def test_the_scanner_finds_each_way_of_reading_a_variable():
    source = '''
import os
REQUIRED = ("A_ONE", "A_TWO")
def load(env, flag):
    missing = [name for name in REQUIRED if not env.get(name)]
    for name in ("B_ONE",):
        check(env[name])
    return env.get("C_ONE", ""), env["C_TWO"], _number(env, "C_THREE", 30.0), os.environ.get("D_ONE"), \\
        os.getenv("D_TWO"), other.get("NOT_ENV"), flag or env.get("E_ONE", "")
'''
    assert variables_read(source) == {"A_ONE", "A_TWO", "B_ONE", "C_ONE", "C_TWO", "C_THREE", "D_ONE", "D_TWO",
                                      "E_ONE"}


def test_the_environment_table_names_exactly_the_variables_the_program_reads():
    read = program_variables()
    # the scan really saw the settings, the entry script and the log options
    assert {"KNACK_APP_ID", "ESB_TIMEOUT", "STATE_DIR", "METRICS_FILE", "LOG_FORMAT", "PROGRESS"} <= read
    documented = readme_variables()
    assert not read - documented, f"read by the program, missing from README's table: {sorted(read - documented)}"
    assert not documented - read, f"in README's table, never read by the program: {sorted(documented - read)}"


# --- 3. the runbook quotes messages the program prints ------------------------------------------------------------

# What the text log puts before a message (logs.py) and what the entry script and the summary put before theirs.
PREFIXES = sorted({f"{tag}: " for tag in (*_TAGS.values(), "WARNING", "ERROR")}
                  | {"configuration error: ", "stopped: ", "summary: "}, key=len, reverse=True)
WILDCARD = re.compile(r"\{[^{}]*\}|\.\.\.|…")


def program_strings() -> list[str]:
    """Every string literal of the program, an f-string's `{...}` parts each turned into a NUL; docstrings and
    comments left out (never printed)."""
    strings = []
    for path in PRODUCT:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            if isinstance(node, ast.JoinedStr):
                strings.append("".join(part.value if isinstance(part, ast.Constant) else "\0"
                                       for part in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
    return strings


def fragments(strings: list[str]) -> set[str]:
    """The fixed texts of the program's strings, cut at their placeholders."""
    return {fragment for text in strings for fragment in text.split("\0") if fragment}


def fixed_parts(message: str) -> list[str]:
    """The parts of a quoted message that must be in the program as written: the log's tag taken off,
    `{...}` and `...` are what varies."""
    for prefix in PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    return [part.strip() for part in WILDCARD.split(message) if re.search(r"[A-Za-z0-9]", part)]


def composed(part: str, pieces: set[str]) -> bool:
    """Whether the program can print `part`: it is in one fixed text, or it is the end of one, then whole fixed
    texts, then the start of another (what putting a string into another's placeholder, or adding two
    strings, prints)."""
    if any(part in piece for piece in pieces):
        return True
    # Joined only with prose, punctuation or a constant such as READY_TO_SEND: a name such as
    # 'already_delivered' is not message text.
    pieces = {piece for piece in pieces
              if " " in piece or not re.search(r"[A-Za-z]", piece) or re.fullmatch(r"[A-Z][A-Z_]+", piece)}
    # reachable[i]: part[:i] can be printed ending exactly where a fixed text ends
    reachable = [False] * (len(part) + 1)
    for i in range(1, len(part)):
        reachable[i] = any(piece.endswith(part[:i]) for piece in pieces)
    for i in range(1, len(part)):
        if reachable[i]:
            rest = part[i:]
            if any(piece.startswith(rest) for piece in pieces):
                return True
            for piece in pieces:
                if rest.startswith(piece) and len(piece) < len(rest):
                    reachable[i + len(piece)] = True
    return False


def missing_parts(message: str, strings: list[str]) -> list[str]:
    pieces = fragments(strings)
    return [part for part in fixed_parts(message) if not composed(part, pieces)]


def runbook_messages() -> list[str]:
    """The quoted lines of the runbook's message tables (those whose first column is `line` or `stopped:`)."""
    messages = []
    table_header = None
    for line in section("Runbook").splitlines():
        if not line.startswith("|"):
            table_header = None
            continue
        [first, *_] = table_rows(line)[0] if table_rows(line) else [""]
        if table_header is None:
            table_header = first
            continue
        if table_header in ("line", "`stopped:` reason"):
            messages += quoted(first)
    return messages


def test_the_message_matcher_fails_on_a_message_that_is_not_printed():
    strings = ["ESB answered a SOAP Fault (\0): \0; answer: \0", "Knack \0: \0", "no complete answer from \0"]
    assert missing_parts("FAILED: ESB answered a SOAP Fault ({http}): {fault}; answer: {start}", strings) == []
    assert missing_parts("FAILED: ESB answered a SOAP Fault (HTTP 500): TEXT", strings) == [
        "ESB answered a SOAP Fault (HTTP 500): TEXT"]
    assert missing_parts("FAILED: the ESB said no ({why})", strings) == ["the ESB said no ("]
    # one string put into another's placeholder
    assert missing_parts("Knack {what}: no complete answer from {host}", strings) == []
    assert missing_parts("Knack {what}: no answer from {host}", strings) == [": no answer from"]


def test_the_runbook_tables_are_read():
    messages = runbook_messages()
    assert len(messages) >= 40, messages
    assert any(m.startswith("FAILED: activity ") for m in messages)
    assert any(m.startswith("the ESB is not answering") for m in messages)
    assert any(m.startswith("missing environment variable(s)") for m in messages)


def test_every_message_the_runbook_quotes_is_printed_by_the_program():
    strings = program_strings()
    stale = {message: missing for message in runbook_messages() if (missing := missing_parts(message, strings))}
    assert not stale, "README quotes messages the program does not print (part not found in the code):\n" + \
        "\n".join(f"  {message!r}: {missing}" for message, missing in stale.items())


# --- 4. the sample log lines are the program's ------------------------------------------------------------------

LOG_LINE = re.compile(r"^\S+Z (?P<app>\S+)(?: record=\S+ activity=\S+ sr=\S+)? (?P<message>.*)$")


def sample_log() -> list[str]:
    [block] = [b for b in fenced_blocks(section("Logs")) if "summary:" in b]
    return block.splitlines()


# what a real line holds in place of a placeholder: quoted names, numbers (not 311, the city's system, which
# the program's text names), statuses such as READY_TO_SEND
VALUE = re.compile(r"'[^']*'|\b(?!311\b)\d[\d.,]*\b|\b[A-Z][A-Z_]*_[A-Z_]+\b")


def printed_by(message: str, strings: list[str]) -> bool:
    """Whether a real line's message could come from the program: its values (quoted names, numbers) taken for
    placeholders, the rest must be the program's fixed text, as for a quoted runbook line."""
    return missing_parts(VALUE.sub("{value}", message), strings) == []


def test_the_sample_log_lines_are_printed_by_the_program():
    strings = program_strings()
    assert not printed_by("FAILED: activity 'X' has no code in config.py activity_codes", strings)
    assert not printed_by("delivered to the ESB at last", strings)
    for line in sample_log():
        match = LOG_LINE.match(line)
        assert match, f"not a log line: {line!r}"
        if not match["message"].startswith("summary: "):
            assert printed_by(match["message"], strings), line


def test_the_sample_summary_has_the_keys_of_the_program_s_summary_in_order():
    [line] = [line for line in sample_log() if " summary: " in line]
    printed = RunReport(app="data-tracker", exit_code=1, knack_calls_remaining=24990, failed_ids=("a",),
                        held_ids=("b",)).summary_text()
    assert re.findall(r"(\w+)=", line.split(" summary: ")[1]) == re.findall(r"(\w+)=", printed), (line, printed)


# --- 5. the Makefile's targets, and what the product may not name -------------------------------------------------

def test_every_makefile_target_is_in_the_readme():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    [phony] = re.findall(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    targets = phony.split()
    assert {"demo", "test", "docker-smoke", "airflow-check"} <= set(targets)
    missing = [target for target in targets if f"make {target}" not in README]
    assert not missing, f"Makefile targets README does not mention: {missing}"


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_nothing_in_the_repository_names_our_build_machines():
    # built from parts so that this file does not name them either
    forbidden = ["../" + "shared", "/" + "work/", "docker" + "-engine"]
    offenders = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        offenders += [f"{path.relative_to(ROOT)}: {word}" for word in forbidden if word in text]
    assert not offenders, offenders
