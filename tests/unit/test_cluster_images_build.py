"""The images really built (or reused from the cache) by buildah, and run: the runtime imports telechat2 and
MindSpore, the operator's entrypoint starts as its non-root user, the pause binary runs. Then a second
ensure_images() must find everything cached and run no build tool.

Slow on a cold cache (mmdebstrap, then pip installing MindSpore into the runtime image); needs root (rootful
buildah, apt-get for the Debian packages), as CI has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import images

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="rootful buildah and apt-get need root"),
    pytest.mark.timeout(5400),
]


@pytest.fixture(scope="module")
def built() -> dict[str, images.ImageRef]:
    return images.ensure_images()


@pytest.fixture(scope="module")
def buildah() -> images.Buildah:
    return images.default_buildah()


def run_in(buildah: images.Buildah, ref: images.ImageRef, *command: str) -> subprocess.CompletedProcess[str]:
    """Run a command in a working container of `ref` (loaded from its archive if buildah's storage lacks it)."""

    def bah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            buildah.command(*args), capture_output=True, text=True, env=buildah.env(), timeout=600, check=check
        )

    if bah("inspect", "--type=image", ref.ref, check=False).returncode != 0:
        pulled = bah("pull", "--quiet", f"docker-archive:{ref.archive}").stdout.split()[-1]
        bah("tag", pulled, ref.ref)
    container = bah("from", "--quiet", "--pull=never", ref.ref).stdout.strip()
    try:
        return bah("run", "--isolation=chroot", container, "--", *command, check=False)
    finally:
        bah("rm", container, check=False)


@pytest.fixture(scope="module")
def config(buildah: images.Buildah, built: dict[str, images.ImageRef]) -> Iterator[dict[str, dict]]:
    def inspect(ref: images.ImageRef) -> dict:
        result = subprocess.run(
            buildah.command("inspect", "--type=image", ref.ref),
            capture_output=True,
            text=True,
            env=buildah.env(),
            timeout=120,
            check=False,
        )
        if result.returncode != 0:  # storage wiped: the archive is what counts
            run_in(buildah, ref, "/bin/true")
            return inspect(ref)
        return json.loads(result.stdout)["Docker"]["config"]

    yield {name: inspect(ref) for name, ref in built.items() if name != "pause"}


def test_runtime_image_imports_telechat2_and_mindspore(buildah: images.Buildah, built: dict) -> None:
    result = run_in(
        buildah, built["runtime"], "python3", "-c", "import telechat2, mindspore; print(mindspore.__version__)"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "2.7.2"
    launch = run_in(buildah, built["runtime"], "telechat2", "launch", "--help")
    assert launch.returncode == 0, launch.stderr


def test_operator_image_runs_its_entrypoint_as_non_root(buildah: images.Buildah, built: dict, config: dict) -> None:
    assert config["operator"]["User"] == "10001:10001"
    assert config["operator"]["Entrypoint"] == ["telechat-operator", "run"]
    result = run_in(buildah, built["operator"], "telechat-operator", "run", "--help")
    assert result.returncode == 0, result.stderr
    no_mindspore = run_in(buildah, built["operator"], "python3", "-c", "import mindspore")
    assert no_mindspore.returncode != 0, "the operator image must not carry MindSpore"


def test_base_image_is_bookworm_with_python_311(buildah: images.Buildah, built: dict) -> None:
    result = run_in(buildah, built["base"], "python3", "-c", "import sys, ssl, venv; print(sys.version_info[:2])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 11)"
    release = run_in(buildah, built["base"], "cat", "/etc/os-release")
    assert "VERSION_CODENAME=bookworm" in release.stdout


def test_pause_image_holds_only_the_static_binary(buildah: images.Buildah, built: dict) -> None:
    result = run_in(buildah, built["pause"], "/pause", "-v")
    assert result.returncode == 0, result.stderr
    assert "pause" in result.stdout


def test_a_second_ensure_images_builds_nothing(built: dict, capsys: pytest.CaptureFixture[str]) -> None:
    recorder = images.Recorder()
    started = time.monotonic()
    again = images.ensure_images(recorder=recorder)
    seconds = time.monotonic() - started
    assert again == built
    assert recorder.commands == [], f"a warm cache ran {recorder.programs()}"
    sizes = {name: images.image_info(ref)["bytes"] for name, ref in again.items()}
    with capsys.disabled():
        print(
            f"\nwarm ensure_images(): {seconds:.2f}s; archives (MiB): "
            + ", ".join(f"{name} {size / 2**20:.0f}" for name, size in sizes.items())
        )


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private containerd (own root, state and socket; CRI off), stopped at the end."""
    images.ensure_debian_packages(["containerd"])
    # A short path: the socket path must fit in sockaddr_un.
    home = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    socket = home / "containerd.sock"
    config = home / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{home / "root"}"\nstate = "{home / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n[ttrpc]\n  address = "{home / "ttrpc.sock"}"\n'
        f'[debug]\n  address = "{home / "debug.sock"}"\n'
    )
    log = (home / "containerd.log").open("wb")
    process = subprocess.Popen(
        ["containerd", f"--config={config}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert process.poll() is None, (home / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not create its socket within 60s"
            time.sleep(0.2)
        yield str(socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        subprocess.run(["umount", "--recursive", "--lazy", str(home / "state")], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_import_into_containerd_once_and_run_the_pause_sandbox(built: dict, containerd: str) -> None:
    small = [built["pause"], built["base"]]
    assert images.import_images(containerd, small) == small
    ctr = ["ctr", f"--address={containerd}", "--namespace=k8s.io"]
    listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
    assert {"localhost/pause:3.10", built["base"].ref} <= set(listed)
    assert images.import_images(containerd, small) == [], "already present with the same content: nothing imported"

    # The sandbox image runs under runc and stops on SIGTERM with status 0.
    subprocess.run([*ctr, "run", "--detach", "localhost/pause:3.10", "sandbox"], check=True, timeout=120)
    try:
        tasks = subprocess.run([*ctr, "tasks", "ls"], capture_output=True, text=True, check=True).stdout
        assert "sandbox" in tasks and "RUNNING" in tasks
        subprocess.run([*ctr, "tasks", "kill", "--signal=SIGTERM", "sandbox"], check=True)
        deadline = time.monotonic() + 30
        while "STOPPED" not in subprocess.run([*ctr, "tasks", "ls"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "pause did not stop on SIGTERM"
            time.sleep(0.2)
    finally:
        subprocess.run([*ctr, "tasks", "delete", "--force", "sandbox"], capture_output=True, check=False)
        subprocess.run([*ctr, "containers", "delete", "sandbox"], capture_output=True, check=False)
