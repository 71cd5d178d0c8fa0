"""The docs say what the code does: every option with the default --help shows, a generated option reference that
is current, links that resolve, a layout that names every module, and a README a newcomer reads in five minutes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"
README = (REPO / "README.md").read_text(encoding="utf-8")
README_MAX_LINES = 250


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# command -> (module holding build_parser(), the page and the heading of its section)
COMMANDS = {
    "python -m schemas.validate": ("schemas.validate", "shards.md", "## Checking a directory"),
    "python -m annotate.view": ("annotate.view", "annotate.md", "## inspect"),
    "python -m evaluation.run": ("evaluation.run", "evaluate.md", "## evaluate"),
    "python -m evaluation.report": ("evaluation.report", "evaluate.md", "## report"),
}


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings]


def long_flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented_with_its_default(command):
    module_name, page, heading = COMMANDS[command]
    parser = importlib.import_module(module_name).build_parser()
    text = section(doc(page), heading)
    where = f"docs/{page} {heading!r}"
    assert command in text, f"{where} does not show how to run {command}"
    for action in options(parser):
        flag = long_flag(action)
        rows = [line for line in text.splitlines() if line.startswith(f"| `{flag}")]
        assert rows, f"{where} has no table row for {command} {flag}"
        default = action.default
        if default in (None, False, [], "", argparse.SUPPRESS) or isinstance(default, bool):
            continue
        assert any(str(default) in row for row in rows), f"{where}: the row of {command} {flag} does not show its default {default!r}: {rows}"


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["python annotate/run.py"])
def test_help_runs(command):
    args = command.split()[1:] + ["--help"]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command}")


def test_options_reference_is_current():
    """docs/options.md is what `make docs` writes now: the same keys, types, defaults and help as --help."""
    from docs.gen_options import OUTPUT, options_markdown

    assert OUTPUT == DOCS / "options.md"
    assert OUTPUT.read_text(encoding="utf-8") == options_markdown(), "docs/options.md is stale: run `make docs`"


def test_train_keys_match_help():
    """docs/options.md's train table comes from the same dataclasses as `train/main.py --help`."""
    from train.config import _reference, markdown_reference

    assert markdown_reference() in doc("options.md"), "docs/options.md's train table is stale: run `make docs`"
    result = subprocess.run([sys.executable, "train/main.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for _, _, rows in _reference():
        for key, _, shown, _ in rows:
            assert re.search(rf"^\s+{re.escape(key)}\s.*= {re.escape(shown)}", result.stdout, re.M), key


def test_annotate_keys_match_help():
    """docs/options.md's annotate table comes from AnnotateConfig, as `annotate/run.py --help` does."""
    from annotate.config import AnnotateConfig, markdown_reference
    from data.config import leaves

    assert markdown_reference() in doc("options.md"), "docs/options.md's annotate table is stale: run `make docs`"
    result = subprocess.run([sys.executable, "annotate/run.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for key, f, _ in leaves(AnnotateConfig):
        flag = "--" + f.metadata.get("flag", key).replace("_", "-")
        assert re.search(rf"^\s+{re.escape(flag)}\s", result.stdout, re.M), flag


def test_scorer_options_documented():
    """Every scorer option is in options.md (generated) and described in annotate.md's scorer table."""
    from annotate import scorers as registry

    described = section(doc("annotate.md"), "## Scorer options")
    for name in registry.available():
        for option in dataclasses.fields(registry.get(name).Options):
            key = f"{name}.{option.name}"
            assert f"`{key}`" in doc("options.md"), f"docs/options.md lacks {key}: run `make docs`"
            assert f"`{key}`" in described, f"docs/annotate.md 'Scorer options' does not describe --scorer-option {key}"


def test_make_targets_in_readme():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M)
        assert re.search(rf"^make {target} ", README, re.M), f"README's quick start lacks `make {target}`"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M), "CI must run the README's test command"
    assert re.search(r"^docs:.*\n\t\$\(PY\) -m docs\.gen_options$", makefile, re.M), "Makefile: `make docs` runs docs/gen_options.py"


def test_readme_is_a_five_minute_read():
    lines = README.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into docs/"


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------

PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _anchor(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_anchor_rule():
    assert _anchor("Quick start (a fresh CPU machine, offline)") == "quick-start-a-fresh-cpu-machine-offline"
    assert _anchor("What the demo's answers mean") == "what-the-demos-answers-mean"
    assert _anchor("Importance from the data (`given`)") == "importance-from-the-data-given"
    assert _anchor("group_decision: step against micro_batch (issue 27)") == "group_decision-step-against-micro_batch-issue-27"


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [code](`x`)\n```\n[in a fence](nowhere.md)\n```\n")
    assert links(page) == ["#title", "missing.md"]
    assert "title" in anchors(page)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def test_layout_names_every_module():
    """docs/layout.md has a row for every module of the five layers, and names no file that is gone."""
    layout = doc("layout.md")
    modules = sorted(str(p.relative_to(REPO)) for layer in ("schemas", "data", "annotate", "train", "evaluation")
                     for p in (REPO / layer).rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing, "docs/layout.md has no row for: " + ", ".join(missing)
    named = set(re.findall(r"`((?:schemas|data|annotate|train|evaluation|bench|tests|docs)/[\w/.-]+\.(?:py|sh))`", layout))
    gone = sorted(p for p in named if not (REPO / p).exists())
    assert not gone, "docs/layout.md names files that do not exist: " + ", ".join(gone)


# ---------------------------------------------------------------------------------------------
# From the demo to your own data (issue 30)
# ---------------------------------------------------------------------------------------------


def _guide_commands() -> list[list[str]]:
    """Every command of docs/own-data.md's bash blocks, continuation lines joined, comments dropped."""
    import shlex

    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", doc("own-data.md"), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_the_own_data_guide_is_on_the_readmes_first_screen_and_its_commands_parse():
    """Every command the guide shows is accepted by the command's own parser (a renamed or misspelt option fails here)."""
    from annotate.config import load_config as annotate_config
    from annotate.view import build_parser as view_parser
    from train.config import load_config as train_config
    from train.config import validate
    from evaluation.run import build_parser as evaluate_parser
    from evaluation.report import build_parser as report_parser

    first_screen = "\n".join(README.splitlines()[:60])
    assert "](docs/own-data.md)" in first_screen, "the README's first screen must link docs/own-data.md"
    seen = set()
    for words in _guide_commands():
        program, argv = " ".join(words[:3] if words[1] == "-m" else words[:2]), words[3 if words[1] == "-m" else 2:]
        seen.add(program)
        if program == "python annotate/run.py":
            config, _ = annotate_config(argv)
            assert config.output, words
        elif program == "python train/main.py":
            validate(train_config([a for a in argv if a != "--dry-run"]))
        else:
            parser = {"python -m evaluation.run": evaluate_parser, "python -m evaluation.report": report_parser,
                      "python -m annotate.view": view_parser}[program]
            parser().parse_args(argv)
    assert {"python annotate/run.py", "python train/main.py", "python -m evaluation.run", "python -m evaluation.report"} <= seen
