"""Which binaries the local cluster needs, which pinned Go module each comes from, and how each is built.

Versions are not repeated here: each is read from the `require` line of its module's go.mod, so changing a pin
is a one-file change (plus `go mod tidy`), and the go.sum hash in the cache key makes it rebuild.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GOMOD_DIR = Path(__file__).resolve().parent / "gomod"


@dataclass(frozen=True)
class Component:
    """One binary: built by `go build <package>` inside `gomod/<module_dir>`."""

    name: str
    module_dir: str
    module: str
    package: str
    version_args: tuple[str, ...] = ("--version",)
    # ldflags templates; `{version}` is replaced by the pinned version, `{major}`/`{minor}` by its parts.
    ldflags: tuple[str, ...] = ()
    gomod_dir: Path = GOMOD_DIR

    @property
    def module_path(self) -> Path:
        return self.gomod_dir / self.module_dir

    def version(self) -> str:
        return pinned_version(self.module_path / "go.mod", self.module)

    def rendered_ldflags(self) -> str:
        """The -ldflags value: strip symbols, plus version stamps (k8s reports v0.0.0 without them)."""
        version = self.version()
        major, minor = _major_minor(version)
        stamps = [flag.format(version=version, major=major, minor=minor) for flag in self.ldflags]
        return " ".join(["-s", "-w", *stamps])


_KUBE_LDFLAGS = (
    "-X k8s.io/component-base/version.gitVersion={version}",
    "-X k8s.io/component-base/version.gitMajor={major}",
    "-X k8s.io/component-base/version.gitMinor={minor}",
    "-X k8s.io/component-base/version.gitTreeState=clean",
)


def _kube(name: str, version_args: tuple[str, ...] = ("--version",), module_dir: str = "kubernetes") -> Component:
    return Component(
        name=name,
        module_dir=module_dir,
        module="k8s.io/kubernetes",
        package=f"k8s.io/kubernetes/cmd/{name}",
        version_args=version_args,
        ldflags=_KUBE_LDFLAGS,
    )


# Build order: the Kubernetes binaries first (they share one Go build cache), then the small ones.
COMPONENTS: tuple[Component, ...] = (
    _kube("kube-apiserver"),
    _kube("kube-controller-manager"),
    _kube("kube-scheduler"),
    _kube("kubectl", ("version", "--client")),
    Component("etcd", "etcd", "go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/server/v3"),
    Component("kwok", "kwok", "sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok"),
    Component(
        "helm",
        "helm",
        "helm.sh/helm/v3",
        "helm.sh/helm/v3/cmd/helm",
        version_args=("version", "--short"),
        ldflags=("-X helm.sh/helm/v3/internal/version.version={version}",),
    ),
)

# The real-node mode's extra binaries, built only when real nodes are asked for (the fake-only path stays as fast).
# kubelet and kube-proxy come from their own module pinned to the same Kubernetes version as the control plane
# (a unit test holds the two pins equal), so adding them leaves the control plane's cache key unchanged.
NODE_COMPONENTS: tuple[Component, ...] = (
    _kube("kubelet", module_dir="kubernetes-node"),
    _kube("kube-proxy", module_dir="kubernetes-node"),
    Component(
        "coredns",
        "coredns",
        "github.com/coredns/coredns",
        "telechat.io/testcluster/coredns",
        version_args=("-version",),
    ),
)

COMPONENTS_BY_NAME = {component.name: component for component in (*COMPONENTS, *NODE_COMPONENTS)}


def pinned_version(go_mod: Path, module: str) -> str:
    """The version `go_mod` requires for `module`, from either a one-line or a block `require`."""
    pattern = re.compile(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", re.MULTILINE)
    match = pattern.search(go_mod.read_text())
    if match is None:
        raise ValueError(f"{go_mod}: no require line for {module}")
    return match.group(1)


def _major_minor(version: str) -> tuple[str, str]:
    match = re.match(r"v(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a semantic version: {version!r}")
    return match.group(1), match.group(2)
