"""requirements.lock agrees with pyproject.toml, pins everything exactly, and is what every installer uses."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

LOCK = REPO / "requirements.lock"


def lock_pins() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"requirements.lock:{number}: {line!r} is not an exact NAME==VERSION pin"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def project_requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return [(where, r) for where, r in out if canonicalize_name(r.name) != "sftgo"]  # sftgo[...]: the extras above


def test_every_pyproject_requirement_is_pinned_by_the_lock_within_its_range():
    pins = lock_pins()
    problems = []
    for where, req in project_requirements():
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"pyproject.toml {where}: {req} is not in requirements.lock")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"pyproject.toml {where}: {req} excludes the locked {req.name}=={pin}")
    assert not problems, "run 'make lock':\n" + "\n".join(problems)


def test_a_disagreement_is_found():
    """The check above can fail: a requirement the lock does not hold, and a range that excludes the pin."""
    pins = lock_pins()
    assert canonicalize_name("not-a-locked-package") not in pins
    transformers = pins[canonicalize_name("transformers")]
    assert not Requirement(f"transformers>{transformers}").specifier.contains(transformers)


def test_torch_is_the_cpu_build_of_the_makefile_version():
    makefile = (REPO / "Makefile").read_text()
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.MULTILINE).group(1)
    assert lock_pins()["torch"] == Version(f"{torch_version}+cpu")
    assert not [name for name in lock_pins() if name.startswith("nvidia-") or name == "triton"]  # no CUDA stack


def test_installers_use_the_lock():
    makefile = (REPO / "Makefile").read_text()
    setup = makefile[makefile.index("$(STAMP):"):makefile.index("# Resolve pyproject.toml")]
    assert '-c $(LOCK) -e ".[all]"' in setup  # every version the install takes is the lock's
    assert "--require-hashes -r requirements-models.txt" in setup
    for name in ("Dockerfile.annotate", "Dockerfile.train"):
        assert "requirements.lock" in (REPO / "docker" / name).read_text(), name
    readme = (REPO / "README.md").read_text()
    assert "requirements.lock" in readme and "make lock" in readme


def test_embedded_model_packages_are_pinned_by_version_and_hash():
    lines = [l for l in (REPO / "requirements-models.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert len(lines) == 2
    for line in lines:
        assert re.fullmatch(r"[a-z0-9\-]+==[0-9.]+ --hash=sha256:[0-9a-f]{64}", line), line
