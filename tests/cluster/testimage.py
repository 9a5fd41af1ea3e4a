"""A tiny busybox image for the real nodes' own checks (and their sandbox image until a pause image is given).

Built without any registry or container engine: Debian's static busybox (package busybox-static) as the only
layer, written as a docker-archive tar that `ctr images import` loads. The archive is keyed by the busybox
binary's hash, so a second run builds nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.errors import ClusterError

BUSYBOX = Path("/bin/busybox")
# The applets the checks use; each is a symlink to /bin/busybox in the image.
APPLETS = (
    "sh",
    "sleep",
    "nslookup",
    "wget",
    "ssl_client",
    "nc",
    "httpd",
    "cat",
    "echo",
    "hostname",
    "ls",
    "ip",
    "mkdir",
    "true",
)
REPOSITORY = "localhost/telechat-busybox"


@dataclass(frozen=True)
class ImageRef:
    """An image archive on disk and the name it is imported under."""

    name: str
    archive: Path


def _layer(busybox: bytes) -> bytes:
    """The layer tar: /bin/busybox, its applet links, /tmp and /etc/hostname-less /etc (deterministic mtimes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "etc", "tmp", "www"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(busybox)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(busybox))
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        page = b"telechat-busybox\n"
        info = tarfile.TarInfo("www/index.html")
        info.size = len(page)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(page))
    return buffer.getvalue()


def docker_archive(busybox: bytes, tag: str) -> tuple[bytes, str]:
    """(archive bytes, image name) of a one-layer image whose default command sleeps (a usable sandbox image)."""
    layer = _layer(busybox)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sleep", "2147483647"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    name = f"{REPOSITORY}:{tag}"
    manifest = [{"Config": config_name, "RepoTags": [name], "Layers": ["layer/layer.tar"]}]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, data in (
            (config_name, config_bytes),
            ("layer/layer.tar", layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), name


def ensure_busybox_image(cache: Path, busybox: Path = BUSYBOX) -> ImageRef:
    """The busybox image archive under `cache`, built only when the busybox binary changed."""
    try:
        binary = busybox.read_bytes()
    except OSError as error:
        raise ClusterError(
            "busybox", f"cannot read {busybox} ({error.strerror}); install Debian's busybox-static package"
        ) from error
    tag = hashlib.sha256(binary).hexdigest()[:12]
    archive = cache / f"telechat-busybox-{tag}.tar"
    name = f"{REPOSITORY}:{tag}"
    if not archive.is_file():
        data, name = docker_archive(binary, tag)
        cache.mkdir(parents=True, exist_ok=True)
        temporary = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
        temporary.write_bytes(data)
        os.replace(temporary, archive)
    return ImageRef(name, archive)
