"""The README documents every command's options with the defaults that --help shows."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")

# command -> (module holding build_parser(), the README heading of its section)
COMMANDS = {
    "python -m schemas.validate": ("schemas.validate", "## 2. The shard contract"),
    "python -m annotate.inspect": ("annotate.inspect", "## 3. inspect"),
    "python -m train.evaluate": ("train.evaluate", "## 5. evaluate"),
    "python -m train.report": ("train.report", "## 6. report"),
}


def section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else len(README)]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings]


def long_flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented_with_its_default(command):
    module_name, heading = COMMANDS[command]
    parser = importlib.import_module(module_name).build_parser()
    text = section(heading)
    assert command in text, f"README {heading!r} does not show how to run {command}"
    for action in options(parser):
        flag = long_flag(action)
        rows = [line for line in text.splitlines() if line.startswith(f"| `{flag}")]
        assert rows, f"README {heading!r} has no table row for {command} {flag}"
        default = action.default
        if default in (None, False, [], "", argparse.SUPPRESS) or isinstance(default, bool):
            continue
        assert any(str(default) in row for row in rows), f"README row of {command} {flag} does not show its default {default!r}: {rows}"


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["python annotate/run.py"])
def test_help_runs(command):
    args = command.split()[1:] + ["--help"]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command}")


def test_train_keys_match_help():
    """The README's train table is generated from the same dataclasses as `train/main.py --help`."""
    from train.config import _reference, markdown_reference

    assert markdown_reference() in README, "README's train table is stale: paste train.config.markdown_reference()"
    result = subprocess.run([sys.executable, "train/main.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for _, _, rows in _reference():
        for key, _, shown, _ in rows:
            assert re.search(rf"^\s+{re.escape(key)}\s.*= {re.escape(shown)}", result.stdout, re.M), key


def test_annotate_keys_match_help():
    """The README's annotate table is generated from AnnotateConfig, as `annotate/run.py --help` is."""
    from annotate.config import markdown_reference
    from data.config import leaves

    from annotate.config import AnnotateConfig

    assert markdown_reference() in section("## 1. annotate"), "README's annotate table is stale: paste annotate.config.markdown_reference()"
    result = subprocess.run([sys.executable, "annotate/run.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for key, f, _ in leaves(AnnotateConfig):
        flag = "--" + f.metadata.get("flag", key).replace("_", "-")
        assert re.search(rf"^\s+{re.escape(flag)}\s", result.stdout, re.M), flag


def test_scorer_options_documented():
    from annotate import scorers as registry

    for name in registry.available():
        for option in dataclasses.fields(registry.get(name).Options):
            assert f"{name}.{option.name}" in README, f"README does not document --scorer-option {name}.{option.name}"


def test_make_targets_in_readme():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M)
        assert f"make {target}" in README
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M), "CI must run the README's test command"
