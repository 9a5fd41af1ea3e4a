"""Build the cluster's binaries from their pinned Go modules into a version-keyed cache.

A cache entry is `<cache>/bin/<component>-<version>-<key>/` where the key hashes the module's go.mod, go.sum and
the ldflags, so any pin change lands in a new entry. An entry counts only once it holds its completion marker:
builds go to a temporary directory, are run once (`--version`) and only then renamed into place, so a killed or
failed build leaves nothing that looks finished and is redone on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.cluster.components import COMPONENTS, Component
from tests.cluster.errors import ClusterError
from tests.cluster.procs import tail

MARKER_NAME = ".complete"


def cache_root() -> Path:
    """`$TELECHAT_CLUSTER_CACHE`, else `$XDG_CACHE_HOME/telechat-operator`, else `~/.cache/telechat-operator`."""
    override = os.environ.get("TELECHAT_CLUSTER_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "telechat-operator"


def cache_key(go_mod: bytes, go_sum: bytes, ldflags: str) -> str:
    """A short digest of everything that decides what the binary is."""
    digest = hashlib.sha256()
    for part in (go_mod, go_sum, ldflags.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:12]


def entry_dir(component: Component, root: Path | None = None) -> Path:
    module = component.module_path
    key = cache_key((module / "go.mod").read_bytes(), (module / "go.sum").read_bytes(), component.rendered_ldflags())
    return (root or cache_root()) / "bin" / f"{component.name}-{component.version()}-{key}"


def is_complete(entry: Path, binary_name: str) -> bool:
    """True only for an entry that finished: marker present and the binary beside it."""
    return (entry / MARKER_NAME).is_file() and (entry / binary_name).is_file()


def write_marker(directory: Path, info: dict[str, str]) -> None:
    (directory / MARKER_NAME).write_text(json.dumps(info, indent=2) + "\n")


def install_entry(staging: Path, entry: Path) -> None:
    """Move a verified staging directory into place; a stale, unfinished entry is removed first."""
    if entry.exists():
        shutil.rmtree(entry)
    os.rename(staging, entry)


def find_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ClusterError(
            "go",
            "the Go toolchain is not on PATH; it is needed to build etcd, Kubernetes, kwok and helm "
            "(install Go >= 1.26 from your distribution or go.dev and retry)",
        )
    return go


def build_component(component: Component, go: str, root: Path, log: Callable[[str], None]) -> Path:
    """Build one component into the cache unless a finished entry exists; return the binary's path."""
    entry = entry_dir(component, root)
    if is_complete(entry, component.name):
        return entry / component.name
    if entry.exists():
        log(f"{component.name}: removing unfinished build {entry}")
    log_path = root / "logs" / f"build-{component.name}-{component.version()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off"}
    command = [go, "build", "-trimpath", "-ldflags", component.rendered_ldflags()]
    command += ["-o", str(staging / component.name), component.package]
    log(f"{component.name}: building {component.module}@{component.version()} (log: {log_path})")
    started = time.monotonic()
    try:
        with log_path.open("w") as log_file:
            log_file.write(f"$ (cd {component.module_path} && {' '.join(command)})\n")
            log_file.flush()
            result = subprocess.run(
                command, cwd=component.module_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False
            )
            if result.returncode != 0:
                log_file.flush()
                problem = f"go build failed with exit code {result.returncode}"
                raise ClusterError(component.name, problem, log_path, tail(log_path, 10))
            check = subprocess.run(
                [str(staging / component.name), *component.version_args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=60,
                check=False,
            )
            log_file.write(f"$ {component.name} {' '.join(component.version_args)}\n{check.stdout}")
            if check.returncode != 0:
                raise ClusterError(component.name, "the built binary does not run", log_path)
        seconds = time.monotonic() - started
        write_marker(
            staging,
            {
                "component": component.name,
                "version": component.version(),
                "build_seconds": f"{seconds:.1f}",
                "reported": check.stdout.strip().splitlines()[0] if check.stdout.strip() else "",
            },
        )
        install_entry(staging, entry)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log(f"{component.name}: built in {seconds:.0f}s")
    return entry / component.name


def ensure_built(
    components: Iterable[Component] = COMPONENTS,
    root: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Every component's binary, building (sequentially: CI has 2 cores) only what the cache lacks."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    root = root or cache_root()
    components = list(components)
    go: str | None = None
    binaries: dict[str, Path] = {}
    for component in components:
        entry = entry_dir(component, root)
        if is_complete(entry, component.name):
            binaries[component.name] = entry / component.name
            continue
        go = go or find_go()
        binaries[component.name] = build_component(component, go, root, log)
    return binaries


def link_bin_dir(bin_dir: Path, binaries: dict[str, Path]) -> Path:
    """A directory of symlinks named after the components: one PATH entry for a shell or a test."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in binaries.items():
        link = bin_dir / name
        temporary = bin_dir / f".{name}.tmp-{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)
    return bin_dir
