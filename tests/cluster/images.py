"""Container images for the real-node cluster, built on this machine without a registry or a container daemon.

Four images, each exported as a docker archive under `<cache>/images/` and named by a content hash of its inputs,
so a second run finds them and builds nothing:

- `base`: a Debian bookworm root file system with Python 3.11 (venv with its pip, CA certificates) made by
  mmdebstrap from the Debian mirror and imported with `buildah from scratch` + `buildah add`; it stands in for both
  public base images (python:3.11-slim-bookworm for the operator, the CANN image for the runtime: CPU stands in
  for the NPU).
- `pause`: the pod sandbox image containerd's `sandbox_image` points at (registry.k8s.io cannot be pulled), a
  static binary compiled here from images/pause/pause.c.
- `operator` and `runtime`: images/operator/Dockerfile and images/runtime/Dockerfile built by rootful buildah with
  the local base as their base-image build argument, from a staged copy of exactly the files that were hashed.

`import_images()` loads archives into a containerd's `k8s.io` namespace with `ctr images import`, skipping images
already there (each imported image carries a label holding its content key).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.build import cache_root
from tests.cluster.errors import ClusterError
from tests.cluster.procs import tail

REPO = Path(__file__).resolve().parents[2]
# Bump to invalidate every cached image (a change in how images are assembled that no input hash would see).
RECIPE_VERSION = "1"
IMAGE_NAMES = ("base", "pause", "operator", "runtime")

# The base root file system: what mmdebstrap installs (minbase: Essential packages and apt, no recommends).
BASE_REPOSITORY = "localhost/telechat-base"
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
# No python3-pip: the images install into virtual environments, whose pip comes from python3-venv's bundled wheel.
# libgomp1: MindSpore's libraries link OpenMP's runtime (the CANN image has it; a minbase has not).
BASE_PACKAGES = ("ca-certificates", "libgomp1", "passwd", "python3", "python3-venv")
# Merged /usr set up by mmdebstrap's hook instead of the usrmerge package (which would pull in all of Perl).
BASE_HOOKS = ("/usr/share/mmdebstrap/hooks/merged-usr",)
# Documentation (but the copyright files), manual pages and translations are dropped while unpacking.
BASE_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

PAUSE_REPOSITORY = "localhost/pause"
PAUSE_TAG = "3.10"  # the tag containerd's sandbox_image names; the content key is kept in a label and the archive name
PAUSE_SOURCE = REPO / "images" / "pause" / "pause.c"
PAUSE_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")

# Label set on imported images: its value is the content key, so a re-import happens exactly when content changed.
CONTENT_LABEL = "io.telechat.content-key"
# Debian packages the build and the import need (ctr comes with containerd), installed by ensure_debian_packages().
DEBIAN_PACKAGES = ("buildah", "mmdebstrap", "containerd", "gcc", "libc6-dev")


@dataclass(frozen=True)
class DockerfileImage:
    """An image built from a Dockerfile under images/ with the local base as its base-image build argument."""

    name: str
    repository: str
    dockerfile: str  # relative to the repository root, which is the build context
    base_arg: str


DOCKERFILE_IMAGES = {
    "operator": DockerfileImage(
        "operator", "localhost/telechat-operator", "images/operator/Dockerfile", "PYTHON_IMAGE"
    ),
    "runtime": DockerfileImage("runtime", "localhost/telechat-runtime", "images/runtime/Dockerfile", "CANN_IMAGE"),
}


@dataclass(frozen=True)
class ImageRef:
    """A built image: its name in containerd, the content key it was built from, and its archive in the cache."""

    name: str
    ref: str
    key: str
    archive: Path

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.rsplit(":", 1)[1]


@dataclass
class Recorder:
    """Every external command ensure_images() ran (the test that a warm cache builds nothing reads it)."""

    commands: list[list[str]] = field(default_factory=list)

    def programs(self) -> list[str]:
        return [Path(command[0]).name for command in self.commands]


# ---- content keys (pure) ----


def digest(parts: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over named parts, each length-prefixed so no two different part lists hash alike."""
    hasher = hashlib.sha256()
    for name, value in parts:
        for chunk in (name.encode(), value):
            hasher.update(len(chunk).to_bytes(8, "big"))
            hasher.update(chunk)
    return hasher.hexdigest()


def base_key() -> str:
    """What decides the base image: the mmdebstrap recipe (suite, mirror, packages, dpkg options)."""
    recipe = {
        "suite": BASE_SUITE,
        "mirror": BASE_MIRROR,
        "packages": sorted(BASE_PACKAGES),
        "dpkg": list(BASE_DPKG_OPTIONS),
        "command": mmdebstrap_command(Path("OUT")),
    }
    return digest([("recipe-version", RECIPE_VERSION.encode()), ("base", json.dumps(recipe, sort_keys=True).encode())])


def pause_key(source: bytes, compiler: str) -> str:
    """What decides the pause image: its C source, the compiler's version and flags, and its tag."""
    return digest(
        [
            ("recipe-version", RECIPE_VERSION.encode()),
            ("pause.c", source),
            ("compiler", compiler.encode()),
            ("cflags", " ".join(PAUSE_CFLAGS).encode()),
            ("ref", f"{PAUSE_REPOSITORY}:{PAUSE_TAG}".encode()),
        ]
    )


def dockerfile_key(
    dockerfile: bytes, context: Iterable[tuple[str, bytes]], base: str, build_args: Mapping[str, str]
) -> str:
    """What decides a Dockerfile image: the Dockerfile, every file of the build context (path and bytes, in path
    order), the base image's key and the build arguments."""
    parts = [("recipe-version", RECIPE_VERSION.encode()), ("Dockerfile", dockerfile), ("base-key", base.encode())]
    parts += [(f"arg:{name}", value.encode()) for name, value in sorted(build_args.items())]
    parts += [(f"file:{path}", content) for path, content in sorted(context)]
    return digest(parts)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match syntax plus `**`) as a regular expression on a slash path."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # `**/`: zero or more leading directories
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out += re.escape(char)
            else:
                body = pattern[i + 1 : end]
                out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def parse_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception `!...`, pattern) rules in file order, with Docker's cleaning of each pattern."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        if pattern == ".":
            continue
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def dockerignore_excludes(path: str, rules: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last rule matching it or a parent directory wins."""
    parents = path.split("/")
    candidates = ["/".join(parents[: i + 1]) for i in range(len(parents))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def context_paths(listed: Iterable[str], dockerignore: str) -> list[str]:
    """The files of the build context: the repository's files (as git lists them) that .dockerignore admits."""
    rules = parse_dockerignore(dockerignore)
    return sorted({path for path in listed if not dockerignore_excludes(path, rules)})


def image_ref(repository: str, key: str) -> str:
    return f"{repository}:{key[:12]}"


def archive_path(root: Path, name: str, key: str) -> Path:
    return root / "images" / f"{name}-{key[:12]}.tar"


# ---- command lines (pure) ----


def mmdebstrap_command(output: Path) -> list[str]:
    """mmdebstrap writing the base root file system as a tar (root mode: this runs as root, no user namespaces)."""
    command = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--quiet"]
    command.append("--include=" + ",".join(sorted(BASE_PACKAGES)))
    command += [f"--dpkgopt={option}" for option in BASE_DPKG_OPTIONS]
    command += ["--aptopt=APT::Install-Recommends false"]
    command += [f"--hook-dir={hook}" for hook in BASE_HOOKS]
    return [*command, BASE_SUITE, str(output), BASE_MIRROR]


def pause_compile_command(source: Path, output: Path) -> list[str]:
    return ["gcc", *PAUSE_CFLAGS, "-o", str(output), str(source)]


@dataclass(frozen=True)
class Buildah:
    """Rootful buildah with its own storage under the cache (never the host's /var/lib/containers)."""

    storage: Path
    driver: str = "overlay"
    program: str = "buildah"

    def command(self, *args: str) -> list[str]:
        return [
            self.program,
            f"--root={self.storage / 'root'}",
            f"--runroot={self.storage / 'runroot'}",
            f"--storage-driver={self.driver}",
            *args,
        ]

    def env(self) -> dict[str, str]:
        """TMPDIR under the cache: buildah keeps `RUN --mount=type=cache` directories (pip's wheels) there."""
        return {**os.environ, "TMPDIR": str(self.storage / "tmp"), "BUILDAH_ISOLATION": "chroot"}


HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def build_volumes(ca_bundle: Path | None) -> list[str]:
    """Read-only mounts for the RUN steps: the host's CA bundle over the image's, during the build only (this machine
    reaches PyPI through a TLS proxy with a CA of its own; Debian's pip trusts the system bundle). It changes how
    pip reaches PyPI, not what it installs, so it is not part of the key; the path exists in the image already, so
    no empty mount point is left behind."""
    return [] if ca_bundle is None else [f"{ca_bundle}:{HOST_CA_BUNDLE}:ro"]


def bud_command(
    buildah: Buildah,
    image: DockerfileImage,
    base_ref: str,
    ref: str,
    context: Path,
    volumes: Sequence[str] = (),
) -> list[str]:
    """`buildah bud` of one Dockerfile image: chroot isolation and the host network (pip reaches PyPI; no bridge, no
    iptables), never pulling (the base is local), docker format (an archive containerd imports as is)."""
    return buildah.command(
        "bud",
        "--isolation=chroot",
        "--network=host",
        "--pull=never",
        "--format=docker",
        *(f"--volume={volume}" for volume in volumes),
        f"--build-arg={image.base_arg}={base_ref}",
        f"--file={context / image.dockerfile}",
        f"--tag={ref}",
        str(context),
    )


def ctr_import_command(
    address: str, archive: Path, namespace: str = "k8s.io", snapshotter: str | None = None
) -> list[str]:
    command = ["ctr", f"--address={address}", f"--namespace={namespace}", "images", "import"]
    if snapshotter:
        command.append(f"--snapshotter={snapshotter}")
    return [*command, str(archive)]


def ctr_present_command(address: str, ref: ImageRef, namespace: str = "k8s.io") -> list[str]:
    """Lists `ref` only when containerd holds it with the same content key."""
    query = f'name=={ref.ref},labels."{CONTENT_LABEL}"=={ref.key}'
    return ["ctr", f"--address={address}", f"--namespace={namespace}", "images", "ls", "--quiet", query]


# ---- running things ----


Runner = Callable[[list[str], Path, "Mapping[str, str] | None", "Path | None"], str]


def _runner(recorder: Recorder | None) -> Runner:
    def run(command: list[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
        """Run a command appending its output to log_path; raise naming the program and the log when it fails."""
        if recorder is not None:
            recorder.commands.append(list(command))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log_file:
            log_file.write(f"$ {' '.join(command)}\n")
            log_file.flush()
            captured: list[str] = []
            try:
                # Streamed line by line into the log (a build runs for minutes) and kept for the caller.
                with subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=dict(env) if env else None,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    text=True,
                    errors="replace",
                    start_new_session=True,  # its own process group: an interruption stops all of it
                ) as process:
                    assert process.stdout is not None
                    try:
                        for line in process.stdout:
                            captured.append(line)
                            log_file.write(line)
                            log_file.flush()
                    except BaseException:  # interrupted: never leave a build running behind us
                        _stop_group(process)
                        raise
                    returncode = process.wait()
            except FileNotFoundError as error:
                raise ClusterError(Path(command[0]).name, f"not installed ({error})", log_path) from None
        if returncode != 0:
            problem = f"`{' '.join(command[:6])}...` failed with exit code {returncode}"
            raise ClusterError(Path(command[0]).name, problem, log_path, tail(log_path, 10))
        return "".join(captured)

    return run


def _stop_group(process: subprocess.Popen[str], grace: float = 30) -> None:
    """SIGTERM the command's process group (mmdebstrap and buildah then unmount what they mounted), SIGKILL what
    is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Status}", package], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


def ensure_debian_packages(
    packages: Iterable[str] = DEBIAN_PACKAGES, log: Callable[[str], None] | None = None, log_path: Path | None = None
) -> list[str]:
    """Install the Debian packages that are missing (apt-get update once first); return those installed."""
    log = log or _stderr
    missing = [package for package in packages if not _installed(package)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise ClusterError("apt-get", f"packages {' '.join(missing)} are missing and installing them needs root")
    log_path = log_path or cache_root() / "logs" / "apt-get.log"
    log(f"apt-get: installing {' '.join(missing)} (log: {log_path})")
    run = _runner(None)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = "-o=DPkg::Lock::Timeout=600"  # another engineer's or CI step's apt may hold the lock for a while
    run(["apt-get", lock, "update"], log_path, env)
    run(["apt-get", lock, "install", "--yes", "--no-install-recommends", *missing], log_path, env)
    return missing


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache (two test sessions may ask for the same images at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _git_files(repo: Path) -> list[str]:
    """Tracked and untracked-but-not-gitignored files that exist (what a `docker build` of the checkout sends)."""
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise ClusterError("git", f"cannot list the repository's files: {result.stderr.decode().strip()}")
    return [path for path in result.stdout.decode().split("\0") if path and (repo / path).is_file()]


def build_context(repo: Path = REPO) -> list[tuple[str, bytes]]:
    """(path, bytes) of every file in the build context of images/*/Dockerfile (the repository root)."""
    ignore = repo / ".dockerignore"
    paths = context_paths(_git_files(repo), ignore.read_text() if ignore.exists() else "")
    return [(path, (repo / path).read_bytes()) for path in paths]


def compiler_version() -> str:
    result = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError("gcc", "gcc is missing (Debian package gcc) and is needed to build the pause image")
    return result.stdout.splitlines()[0]


@dataclass(frozen=True)
class Planned:
    name: str
    ref: ImageRef
    context: list[tuple[str, bytes]] = field(default_factory=list)


def plan_images(root: Path, repo: Path = REPO, names: Iterable[str] = IMAGE_NAMES) -> dict[str, Planned]:
    """The ImageRef of each requested image (and of the base the Dockerfile images need), from the inputs alone."""
    wanted = set(names)
    unknown = wanted - set(IMAGE_NAMES)
    if unknown:
        raise ClusterError("images", f"unknown image(s) {sorted(unknown)}; known: {list(IMAGE_NAMES)}")
    if wanted & set(DOCKERFILE_IMAGES):
        wanted.add("base")
    plan: dict[str, Planned] = {}
    base = base_key()
    if "base" in wanted:
        plan["base"] = Planned(
            "base", ImageRef("base", image_ref(BASE_REPOSITORY, base), base, archive_path(root, "base", base))
        )
    if "pause" in wanted:
        key = pause_key(PAUSE_SOURCE.read_bytes(), compiler_version())
        plan["pause"] = Planned(
            "pause", ImageRef("pause", f"{PAUSE_REPOSITORY}:{PAUSE_TAG}", key, archive_path(root, "pause", key))
        )
    context = build_context(repo) if wanted & set(DOCKERFILE_IMAGES) else []
    for name, image in DOCKERFILE_IMAGES.items():
        if name not in wanted:
            continue
        args = {image.base_arg: plan["base"].ref.ref}
        key = dockerfile_key((repo / image.dockerfile).read_bytes(), context, base, args)
        plan[name] = Planned(
            name, ImageRef(name, image_ref(image.repository, key), key, archive_path(root, name, key)), context
        )
    return plan


def is_cached(ref: ImageRef) -> bool:
    """An archive counts once its metadata file (written after the archive was renamed into place) exists."""
    return ref.archive.is_file() and ref.archive.with_suffix(".json").is_file()


class _Builder:
    def __init__(self, root: Path, buildah: Buildah, run: Runner, log: Callable[[str], None]) -> None:
        self.root = root
        self.buildah = buildah
        self.run = run
        self.log = log
        self.logs = root / "logs"
        self.scratch = root / "images" / ".tmp"

    def clear_scratch(self) -> None:
        """Remove what a killed build left (root file systems, staged contexts, half-pushed archives); only called
        with the cache lock held, so no other build is using them."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        for stale in (self.root / "images").glob(".*.tar.tmp-*"):
            stale.unlink(missing_ok=True)
        self.scratch.mkdir(parents=True)

    def _bah(self, log_path: Path, *args: str) -> str:
        return self.run(self.buildah.command(*args), log_path, self.buildah.env(), None)

    def _export(self, ref: ImageRef, log_path: Path, started: float) -> None:
        """Push the image from buildah's storage into a docker archive, renamed into place only once complete."""
        ref.archive.parent.mkdir(parents=True, exist_ok=True)
        staging = ref.archive.with_name(f".{ref.archive.name}.tmp-{os.getpid()}")
        staging.unlink(missing_ok=True)
        try:
            self._bah(log_path, "push", "--quiet", ref.ref, f"docker-archive:{staging}:{ref.ref}")
            os.replace(staging, ref.archive)
        finally:
            staging.unlink(missing_ok=True)
        info = {
            "name": ref.name,
            "ref": ref.ref,
            "key": ref.key,
            "bytes": ref.archive.stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        ref.archive.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
        self.log(f"images: {ref.ref} built in {info['build_seconds']:.0f}s ({info['bytes'] / 2**20:.0f} MiB archive)")
        self._drop_older(ref, log_path)

    def _drop_older(self, ref: ImageRef, log_path: Path) -> None:
        """Remove older builds of the same repository from buildah's storage (a runtime is 3.6 GB; the archives
        are the cache, and `prune_archives()` removes stale ones)."""
        # All images, filtered here: `buildah images <repository>` looks the name up as <repository>:latest and
        # fails with "image not known". Cleaning up is best effort: the archive is already complete.
        try:
            listed = self._bah(log_path, "images", "--noheading", "--format={{.Name}}:{{.Tag}}")
        except ClusterError:
            return
        same_repository = {name for name in listed.split() if name.rpartition(":")[0] == ref.repository}
        for name in sorted(same_repository - {ref.ref}):
            with contextlib.suppress(ClusterError):
                self._bah(log_path, "rmi", "--force", name)
        with contextlib.suppress(ClusterError):
            self._bah(log_path, "rmi", "--prune")  # untagged leftovers (intermediate stages)

    def _in_storage(self, ref: ImageRef, log_path: Path) -> bool:
        try:
            self._bah(log_path, "inspect", "--type=image", "--format={{.FromImageID}}", ref.ref)
        except ClusterError:
            return False
        return True

    def ensure_in_storage(self, ref: ImageRef) -> None:
        """The base must be in buildah's storage for `FROM`; load it from its archive if the storage was wiped."""
        log_path = self.logs / f"images-{ref.name}.log"
        if not self._in_storage(ref, log_path):
            pulled = self._bah(log_path, "pull", "--quiet", f"docker-archive:{ref.archive}").split()
            if not pulled:
                raise ClusterError("buildah", f"pulling {ref.archive} printed no image id", log_path)
            self._bah(log_path, "tag", pulled[-1], ref.ref)  # the name the archive carries, whatever buildah read

    def from_scratch(self, ref: ImageRef, log_path: Path, fill: Callable[[str], None], config: list[str]) -> None:
        container = self._bah(log_path, "from", "--quiet", "scratch").strip()
        try:
            fill(container)
            self._bah(log_path, "config", *config, container)
            self._bah(log_path, "commit", "--quiet", "--format=docker", "--rm", container, ref.ref)
        except BaseException:
            with contextlib.suppress(ClusterError):
                self._bah(log_path, "rm", container)
            raise

    def build_base(self, ref: ImageRef) -> None:
        log_path = self.logs / "images-base.log"
        self.log(f"images: building {ref.ref} with mmdebstrap from {BASE_MIRROR} (log: {log_path})")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="base-", dir=self.scratch) as scratch:
            rootfs = Path(scratch) / "rootfs.tar"
            self.run(mmdebstrap_command(rootfs), log_path, None, None)
            self.from_scratch(
                ref,
                log_path,
                lambda container: self._bah(log_path, "add", "--quiet", container, str(rootfs), "/"),
                ["--cmd=/usr/bin/python3", "--env=LANG=C.UTF-8", f"--label={CONTENT_LABEL}={ref.key}"],
            )
        self._export(ref, log_path, started)

    def build_pause(self, ref: ImageRef) -> None:
        log_path = self.logs / "images-pause.log"
        self.log(f"images: building {ref.ref} from {PAUSE_SOURCE.relative_to(REPO)} (log: {log_path})")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="pause-", dir=self.scratch) as scratch:
            binary = Path(scratch) / "pause"
            self.run(pause_compile_command(PAUSE_SOURCE, binary), log_path, None, None)
            self.from_scratch(
                ref,
                log_path,
                lambda container: self._bah(log_path, "copy", "--quiet", container, str(binary), "/pause"),
                ['--entrypoint=["/pause"]', "--user=65535:65535", f"--label={CONTENT_LABEL}={ref.key}"],
            )
        self._export(ref, log_path, started)

    def build_dockerfile(self, planned: Planned, base: ImageRef, repo: Path) -> None:
        ref = planned.ref
        image = DOCKERFILE_IMAGES[planned.name]
        log_path = self.logs / f"images-{planned.name}.log"
        self.log(f"images: building {ref.ref} from {image.dockerfile} on {base.ref} (log: {log_path})")
        started = time.monotonic()
        self.ensure_in_storage(base)
        with tempfile.TemporaryDirectory(prefix=f"{planned.name}-", dir=self.scratch) as scratch:
            # Build from a copy of exactly the hashed files: the key always describes what went into the image.
            context = Path(scratch) / "context"
            for path, content in planned.context:
                target = context / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                target.chmod((repo / path).stat().st_mode & 0o777)
            (context / image.dockerfile).parent.mkdir(parents=True, exist_ok=True)
            (context / image.dockerfile).write_bytes((repo / image.dockerfile).read_bytes())
            dockerignore = repo / ".dockerignore"
            if dockerignore.exists():
                shutil.copyfile(dockerignore, context / ".dockerignore")
            ca_bundle = HOST_CA_BUNDLE if HOST_CA_BUNDLE.is_file() else None
            command = bud_command(self.buildah, image, base.ref, ref.ref, context, build_volumes(ca_bundle))
            self.run(command, log_path, self.buildah.env(), None)
        self._export(ref, log_path, started)


def default_buildah(root: Path | None = None) -> Buildah:
    """Storage under the cache; `TELECHAT_BUILDAH_DRIVER=vfs` where overlay mounts are not allowed."""
    storage = (root or cache_root()) / "buildah"
    return Buildah(storage, os.environ.get("TELECHAT_BUILDAH_DRIVER", "overlay"))


def ensure_images(
    names: Iterable[str] = IMAGE_NAMES,
    *,
    root: Path | None = None,
    repo: Path = REPO,
    log: Callable[[str], None] | None = None,
    recorder: Recorder | None = None,
    install_packages: bool = True,
) -> dict[str, ImageRef]:
    """Every requested image's ImageRef, building (sequentially: CI has 2 cores) only those whose archive is not in
    the cache. A warm cache runs no build tool at all: only git (to list the context) and gcc --version."""
    log = log or _stderr
    root = root or cache_root()
    names = list(names)
    if install_packages and "pause" in names and shutil.which("gcc") is None:
        ensure_debian_packages(log=log)  # the pause image's key names the compiler's version
    plan = plan_images(root, repo, names)
    missing = [planned for planned in plan.values() if not is_cached(planned.ref)]
    if missing:
        if install_packages:
            ensure_debian_packages(log=log)
        buildah = default_buildah(root)
        (buildah.storage / "tmp").mkdir(parents=True, exist_ok=True)
        builder = _Builder(root, buildah, _runner(recorder), log)
        with _locked(root / "images" / ".lock"):
            builder.clear_scratch()
            for planned in missing:  # plan order: base and pause before the Dockerfile images
                if is_cached(planned.ref):  # another process built it while we waited for the lock
                    continue
                if planned.name == "base":
                    builder.build_base(planned.ref)
                elif planned.name == "pause":
                    builder.build_pause(planned.ref)
                else:
                    builder.build_dockerfile(planned, plan["base"].ref, repo)
    return {name: plan[name].ref for name in names}


def prune_archives(
    keep: Mapping[str, ImageRef], root: Path | None = None, log: Callable[[str], None] | None = None
) -> list[Path]:
    """Delete this cache's archives of the four images other than `keep` (e.g. ensure_images()'s result); other
    worktrees' keys differ, so this is never automatic. Returns what was removed."""
    log = log or _stderr
    images_dir = (root or cache_root()) / "images"
    kept = {ref.archive for ref in keep.values()} | {ref.archive.with_suffix(".json") for ref in keep.values()}
    removed = []
    with _locked(images_dir / ".lock"):
        for name in IMAGE_NAMES:
            for path in sorted(images_dir.glob(f"{name}-*")):
                if (
                    path.suffix in (".tar", ".json")
                    and path not in kept
                    and re.fullmatch(rf"{name}-[0-9a-f]{{12}}", path.stem)
                ):
                    path.unlink()
                    removed.append(path)
    for path in removed:
        log(f"images: removed {path}")
    return removed


def import_images(
    containerd_address: str,
    refs: Mapping[str, ImageRef] | Iterable[ImageRef],
    *,
    namespace: str = "k8s.io",
    snapshotter: str | None = None,
    log: Callable[[str], None] | None = None,
    recorder: Recorder | None = None,
) -> list[ImageRef]:
    """Load each image's archive into the containerd at containerd_address unless it holds the same content already;
    return the images that were imported."""
    log = log or _stderr
    images = list(refs.values()) if isinstance(refs, Mapping) else list(refs)
    run = _runner(recorder)
    log_path = cache_root() / "logs" / "images-import.log"
    imported = []
    for ref in images:
        if not ref.archive.is_file():
            raise ClusterError(
                "images", f"{ref.ref}: archive {ref.archive} is missing (run `python -m tests.cluster images`)"
            )
        present = run(ctr_present_command(containerd_address, ref, namespace), log_path, None, None).split()
        if ref.ref in present:
            continue
        log(f"images: importing {ref.ref} into {containerd_address}")
        run(ctr_import_command(containerd_address, ref.archive, namespace, snapshotter), log_path, None, None)
        label = ["ctr", f"--address={containerd_address}", f"--namespace={namespace}", "images", "label"]
        run([*label, ref.ref, f"{CONTENT_LABEL}={ref.key}"], log_path, None, None)
        imported.append(ref)
    return imported


def image_info(ref: ImageRef) -> dict[str, Any]:
    """The metadata written beside an archive (size, build time)."""
    return json.loads(ref.archive.with_suffix(".json").read_text())


# ---- the operator chart installed from the built image ----

OPERATOR_CHART = REPO / "charts" / "telechat-operator"


@dataclass(frozen=True)
class OperatorRelease:
    release: str
    namespace: str
    image: str


def _host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: mappings merge key by key, anything else in `override` replaces."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def operator_chart_values(image: ImageRef | str, extra_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Values that run the operator from a locally imported image: pullPolicy Never (there is no registry to pull
    from, so a missing import shows as ErrImageNeverPull at once), on a real node of this machine's architecture
    (the fake kwok nodes are arm64 and run nothing). extra_values win."""
    ref = image.ref if isinstance(image, ImageRef) else image
    repository, _, tag = ref.rpartition(":")
    if not repository or "/" in tag:
        raise ValueError(f"image reference {ref!r} has no tag (expected repository:tag)")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": {"kubernetes.io/arch": _host_arch()},
    }
    return merge_values(values, extra_values or {})


def helm_install_args(
    release: str, namespace: str, values_file: Path, chart: Path = OPERATOR_CHART, timeout: str = "300s"
) -> list[str]:
    """`helm upgrade --install` (idempotent: a rerun upgrades) waiting for the Deployment to be available;
    --take-ownership because a test may have applied crds/ before the release."""
    return [
        *("upgrade", "--install", release, str(chart)),
        *("--namespace", namespace, "--create-namespace", "--take-ownership"),
        *("--values", str(values_file), "--wait", f"--timeout={timeout}"),
    ]


def install_operator_chart(
    cluster: Any,
    image_ref: ImageRef | str,
    extra_values: Mapping[str, Any] | None = None,
    *,
    release: str = "telechat-operator",
    namespace: str = "telechat-system",
    timeout: float = 300,
) -> OperatorRelease:
    """Install charts/telechat-operator into `cluster` (a ClusterHandle) running the operator from `image_ref`, and
    wait until its Deployment is available; on failure the error carries the operator pods' state and events."""
    import yaml

    values = operator_chart_values(image_ref, extra_values)
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    with tempfile.TemporaryDirectory(prefix="operator-values-") as scratch:
        values_file = Path(scratch) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values, sort_keys=True))
        args = helm_install_args(release, namespace, values_file, timeout=f"{int(timeout)}s")
        result = cluster.helm(*args, check=False, timeout=timeout + 60)
    if result.returncode != 0:
        selector = f"app.kubernetes.io/instance={release}"
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "wide", check=False).stdout
        events = cluster.kubectl(
            "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
        ).stdout.splitlines()[-15:]
        logs = cluster.kubectl("logs", "-n", namespace, "-l", selector, "--tail=20", check=False)
        details = f"{result.stderr.strip()}\npods:\n{pods}\nevents:\n" + "\n".join(events)
        details += f"\noperator log:\n{logs.stdout or logs.stderr}"
        raise ClusterError(
            "operator chart", f"`helm install {release}` with image {image} did not become ready", None, details
        )
    return OperatorRelease(release, namespace, image)


def uninstall_operator_chart(cluster: Any, installed: OperatorRelease, timeout: float = 120) -> None:
    cluster.helm(
        "uninstall",
        installed.release,
        "--namespace",
        installed.namespace,
        "--wait",
        f"--timeout={int(timeout)}s",
        check=False,
        timeout=timeout + 30,
    )
