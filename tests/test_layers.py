"""Imports run down the layers only: schemas <- data <- annotate / train <- evaluation (annotate and train apart).

Every import counts, the lazy ones inside functions too.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("schemas", "data", "annotate", "train", "evaluation", "bench")
ALLOWED = {
    "schemas": {"schemas"},
    "data": {"schemas", "data"},
    "annotate": {"schemas", "data", "annotate"},
    "train": {"schemas", "data", "train"},
    "evaluation": {"schemas", "data", "train", "evaluation"},
}


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in OURS}
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_reaches_up_or_across(layer):
    wrong = [f"{path.relative_to(REPO)}:{line} imports {package}"
             for path in sorted((REPO / layer).rglob("*.py"))
             for package, line in sorted(_imported_packages(path)) if package not in ALLOWED[layer]]
    assert not wrong, "\n".join(wrong)


# The one form of sys.path edit, for files run as scripts without installing the repo (python train/main.py,
# deepspeed train/main.py, ray job submit -- python annotate/run.py, python bench/study.py): the checkout goes
# first, so its code is what runs, and the file's own folder leaves, so bench/train.py cannot shadow the train
# package nor a module of train/ a library's.
SYS_PATH_BLOCK = ('if not __package__:  # run as a file: this checkout, not the file\'s folder, leads sys.path (tests/test_layers.py)\n'
                  '    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]\n')
SCRIPTS = {"annotate/run.py", "train/main.py", "bench/annotate.py", "bench/ce_memory.py", "bench/evaluate.py",
           "bench/known_truth_study.py", "bench/study.py", "bench/train.py"}


def test_sys_path_is_edited_only_by_scripts_and_only_one_way():
    editing = {str(path.relative_to(REPO)) for package in OURS + ("docs",) if (REPO / package).is_dir()
               for path in (REPO / package).rglob("*.py") if "sys.path" in path.read_text(encoding="utf-8")}
    assert editing == SCRIPTS
    for script in sorted(SCRIPTS):
        text = (REPO / script).read_text(encoding="utf-8")
        assert text.count(SYS_PATH_BLOCK) == 1 and text.count("sys.path") == SYS_PATH_BLOCK.count("sys.path"), script


def test_no_module_shadows_the_standard_library_or_an_installed_package():
    """A package module named like ``inspect`` or ``evaluate`` breaks whoever runs a file of its folder."""
    import importlib.metadata
    import sys

    installed = {name for dist in importlib.metadata.distributions() for name in (dist.read_text("top_level.txt") or "").split()}
    clashes = [f"{path.relative_to(REPO)}: {'the standard library' if path.stem in sys.stdlib_module_names else 'an installed package'}"
               for package in ("schemas", "data", "annotate", "train", "evaluation") if (REPO / package).is_dir()
               for path in sorted((REPO / package).rglob("*.py")) if path.stem in set(sys.stdlib_module_names) | installed]
    assert not clashes, clashes


@pytest.mark.parametrize("script", ["annotate/run.py", "train/main.py", "bench/study.py"])
def test_scripts_run_as_files_from_any_folder(script, tmp_path):
    """Run as a file from another working directory, without PYTHONPATH: the imports resolve."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (script, result.stderr[-2000:])
    assert "usage:" in result.stdout


def test_console_scripts_are_each_steps_main(capsys):
    """``sftgo-annotate`` ... ``sftgo-migrate`` (pyproject's [project.scripts]) call the same main() as the files."""
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(scripts) == {"sftgo-annotate", "sftgo-train", "sftgo-evaluate", "sftgo-report", "sftgo-validate", "sftgo-view", "sftgo-migrate"}
    for name, target in scripts.items():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as exited:
            getattr(importlib.import_module(module), function)(["--help"])
        assert exited.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name


def test_installed_console_script_runs(tmp_path):
    """The installed command (make setup's editable install) answers as the module does: 1 and INVALID for a missing directory."""
    import subprocess
    import sys

    command = Path(sys.executable).parent / "sftgo-validate"
    if not command.exists():
        pytest.skip("sftgo is not installed in this interpreter's environment (make setup installs it)")
    result = subprocess.run([str(command), str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{tmp_path / 'nope'}: no such directory" in result.stdout + result.stderr


def test_installed_console_scripts_name_themselves_in_their_usage():
    """``sftgo-train --help`` says ``usage: sftgo-train``, not the ``python train/main.py`` its module prints."""
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    if not (Path(sys.executable).parent / "sftgo-validate").exists():
        pytest.skip("sftgo is not installed in this interpreter's environment (make setup installs it)")
    for name in scripts:
        result = subprocess.run([str(Path(sys.executable).parent / name), "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {name} "), (name, result.stdout[:200], result.stderr[-500:])
