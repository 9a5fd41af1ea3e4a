"""tests/cluster/images.py without building anything: content keys cover exactly the inputs that make an image,
the command lines are the ones the build needs, a warm cache runs no tool, and the operator chart values pick the
local image. The real build is tests/unit/test_cluster_images_build.py (marked slow)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from tests.cluster import images
from tests.cluster.build import entry_dir, is_complete
from tests.cluster.components import COMPONENTS_BY_NAME
from tests.cluster.errors import ClusterError

REPO = Path(__file__).resolve().parents[2]
DOCKERIGNORE = (REPO / ".dockerignore").read_text()


# ---- .dockerignore and the build context ----


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "operator/telechat_operator/main.py", "telechat2/configs/telechat2-7b.yaml"],
)
def test_the_repository_dockerignore_sends_what_the_dockerfiles_copy(path: str) -> None:
    assert images.context_paths([path], DOCKERIGNORE) == [path]


@pytest.mark.parametrize(
    "path",
    [
        "tests/unit/test_x.py",
        "images/operator/Dockerfile",
        ".dockerignore",
        "charts/telechat-operator/values.yaml",
        "operator/telechat_operator/__pycache__/main.cpython-311.pyc",
        "telechat2/model.pyc",
        "telechat2/out/model.ckpt",
        "telechat2/out/rank_0/x.txt",
        "telechat2/data/train.mindrecord0",
        "telechat2/run.log",
        "operatorx/file.py",  # `!operator/` re-includes that directory only, not a name beginning with it
    ],
)
def test_the_repository_dockerignore_leaves_out_everything_else(path: str) -> None:
    assert images.context_paths([path], DOCKERIGNORE) == []


def test_dockerignore_last_matching_rule_wins_and_parents_count() -> None:
    rules = "docs\n!docs/keep.md\n*.tmp\n!important.tmp\n[ab].txt\nlogs/**/*.log\n"
    listed = ["docs/a.md", "docs/keep.md", "x.tmp", "important.tmp", "a.txt", "c.txt", "logs/1/2/x.log", "logs/x.log"]
    assert images.context_paths(listed, rules) == ["c.txt", "docs/keep.md", "important.tmp"]


def make_repo(tmp_path: Path) -> Path:
    """A git checkout shaped like the project's: the real Dockerfiles and .dockerignore, a few small files."""
    repo = tmp_path / "repo"
    for relative in ("images/operator/Dockerfile", "images/runtime/Dockerfile", ".dockerignore"):
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, repo / relative)
    files = {
        "pyproject.toml": "[project]\nname='x'\n",
        "README.md": "readme\n",
        "operator/telechat_operator/__init__.py": "",
        "telechat2/__init__.py": "",
        "tests/test_x.py": "def test(): pass\n",
        ".gitignore": "*.pyc\n",
    }
    for relative, text in files.items():
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        (repo / relative).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    return repo


def operator_key(repo: Path, root: Path) -> str:
    return images.plan_images(root, repo, ["operator"])["operator"].ref.key


def test_operator_key_changes_with_every_input_and_nothing_else(tmp_path: Path) -> None:
    repo, root = make_repo(tmp_path), tmp_path / "cache"
    first = operator_key(repo, root)
    assert operator_key(repo, root) == first, "the key must be deterministic"

    # Outside the build context (tests/, an ignored artefact, a gitignored file): same key.
    (repo / "tests" / "test_x.py").write_text("def test(): assert 1\n")
    (repo / "telechat2" / "model.ckpt").write_bytes(b"weights")
    (repo / "telechat2" / "cached.pyc").write_bytes(b"bytecode")
    assert operator_key(repo, root) == first

    # Each input in turn: a copied file's bytes, a new file in the context (untracked counts: docker sends it),
    # the Dockerfile, the base image's key.
    seen = {first}

    def changed() -> str:
        key = operator_key(repo, root)
        assert key not in seen
        seen.add(key)
        return key

    (repo / "operator" / "telechat_operator" / "__init__.py").write_text("VERSION = 2\n")
    changed()
    (repo / "telechat2" / "new.py").write_text("")
    changed()
    (repo / "telechat2" / "new.py").rename(repo / "telechat2" / "renamed.py")
    changed()
    with (repo / "images" / "operator" / "Dockerfile").open("a") as dockerfile:
        dockerfile.write("LABEL x=y\n")
    changed()
    (repo / ".dockerignore").write_text(DOCKERIGNORE + "!tests/\n")  # now tests/ is part of the context
    changed()


def test_base_key_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    before = images.base_key()
    monkeypatch.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "curl"))
    with_curl = images.base_key()
    monkeypatch.setattr(images, "BASE_SUITE", "trixie")
    assert len({before, with_curl, images.base_key()}) == 3


def test_dockerfile_key_covers_base_and_build_args_not_their_order() -> None:
    context = [("a.py", b"1"), ("b.py", b"2")]
    key = images.dockerfile_key(b"FROM x", context, "base1", {"A": "1", "B": "2"})
    assert images.dockerfile_key(b"FROM x", list(reversed(context)), "base1", {"B": "2", "A": "1"}) == key
    assert images.dockerfile_key(b"FROM x", context, "base2", {"A": "1", "B": "2"}) != key
    assert images.dockerfile_key(b"FROM x", context, "base1", {"A": "1", "B": "3"}) != key
    # Length prefixes: moving bytes between a path and its content is a different input.
    assert images.dockerfile_key(b"FROM x", [("a.py1", b""), ("b.py", b"2")], "base1", {"A": "1", "B": "2"}) != key


def test_pause_key_follows_source_compiler_and_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    key = images.pause_key(b"int main(){}", "gcc 12")
    assert images.pause_key(b"int main(){return 0;}", "gcc 12") != key
    assert images.pause_key(b"int main(){}", "gcc 13") != key
    monkeypatch.setattr(images, "PAUSE_TAG", "3.11")
    assert images.pause_key(b"int main(){}", "gcc 12") != key


def test_refs_are_named_by_the_key(tmp_path: Path) -> None:
    plan = images.plan_images(tmp_path / "cache", make_repo(tmp_path), ["operator"])
    assert set(plan) == {"base", "operator"}, "the operator needs the base"
    for name, planned in plan.items():
        ref = planned.ref
        assert ref.tag == ref.key[:12] and len(ref.key) == 64
        assert ref.archive == tmp_path / "cache" / "images" / f"{name}-{ref.key[:12]}.tar"
    assert plan["operator"].ref.repository == "localhost/telechat-operator"
    assert plan["base"].ref.repository == "localhost/telechat-base"


def test_unknown_image_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="unknown image"):
        images.plan_images(tmp_path, REPO, ["operater"])


# ---- command lines ----


def test_mmdebstrap_command_makes_a_small_bookworm_tar_as_root() -> None:
    command = images.mmdebstrap_command(Path("/out/rootfs.tar"))
    assert command[0] == "mmdebstrap"
    assert command[-3:] == ["bookworm", "/out/rootfs.tar", "http://deb.debian.org/debian"]
    assert {"--variant=minbase", "--mode=root", "--format=tar"} <= set(command)
    included = next(arg for arg in command if arg.startswith("--include=")).split("=", 1)[1].split(",")
    assert {"python3", "python3-venv", "ca-certificates", "passwd", "libgomp1"} == set(included)
    assert "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr" in command
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in command


def test_bud_command_builds_offline_from_the_local_base(tmp_path: Path) -> None:
    buildah = images.Buildah(tmp_path / "storage", driver="vfs")
    image = images.DOCKERFILE_IMAGES["runtime"]
    command = images.bud_command(
        buildah, image, "localhost/telechat-base:abc", "localhost/telechat-runtime:def", tmp_path
    )
    assert command[:4] == [
        "buildah",
        f"--root={tmp_path / 'storage' / 'root'}",
        f"--runroot={tmp_path / 'storage' / 'runroot'}",
        "--storage-driver=vfs",
    ]
    assert command[4] == "bud"
    assert {"--isolation=chroot", "--pull=never", "--format=docker", "--network=host"} <= set(command)
    assert "--build-arg=CANN_IMAGE=localhost/telechat-base:abc" in command
    assert f"--file={tmp_path / 'images/runtime/Dockerfile'}" in command
    assert "--tag=localhost/telechat-runtime:def" in command
    assert command[-1] == str(tmp_path)
    assert buildah.env()["TMPDIR"] == str(tmp_path / "storage" / "tmp")
    volumes = images.build_volumes(Path("/host/ca.crt"))
    assert volumes == ["/host/ca.crt:/etc/ssl/certs/ca-certificates.crt:ro"]
    with_ca = images.bud_command(buildah, image, "b:1", "r:1", tmp_path, volumes)
    assert "--volume=/host/ca.crt:/etc/ssl/certs/ca-certificates.crt:ro" in with_ca
    assert with_ca.index("--volume=/host/ca.crt:/etc/ssl/certs/ca-certificates.crt:ro") < with_ca.index("--tag=r:1")
    assert images.build_volumes(None) == []


def test_ctr_commands_use_the_given_socket_and_namespace() -> None:
    ref = images.ImageRef("pause", "localhost/pause:3.10", "k" * 64, Path("/c/pause.tar"))
    assert images.ctr_import_command("/run/n1/containerd.sock", ref.archive, snapshotter="native") == [
        "ctr",
        "--address=/run/n1/containerd.sock",
        "--namespace=k8s.io",
        "images",
        "import",
        "--snapshotter=native",
        "/c/pause.tar",
    ]
    present = images.ctr_present_command("/s.sock", ref)
    assert present[-1] == f'name==localhost/pause:3.10,labels."{images.CONTENT_LABEL}"=={"k" * 64}'


# ---- what runs, with a fake runner ----


class FakeRunner:
    """Stands in for every external command: records it, and makes the files buildah push would write."""

    def __init__(self, present: set[str] | None = None) -> None:
        self.commands: list[list[str]] = []
        self.present = present or set()

    def __call__(
        self, command: list[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> str:
        self.commands.append(command)
        if "push" in command:
            Path(command[-1].split(":")[1]).write_bytes(b"archive")
        if "from" in command:
            return "working-container\n"
        if "inspect" in command:
            raise ClusterError("buildah", "no such image")
        if "pull" in command:
            return "abc123\n"
        if command[0] == "ctr" and "ls" in command:
            name = command[-1].split(",")[0].removeprefix("name==")
            return name + "\n" if name in self.present else ""
        return ""

    def programs(self) -> list[str]:
        return [
            c[0] if c[0] != "buildah" else f"buildah {next(a for a in c[1:] if not a.startswith('--'))}"
            for c in self.commands
        ]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    runner = FakeRunner()
    monkeypatch.setattr(images, "_runner", lambda recorder: runner)
    return runner


def test_cold_cache_builds_each_image_once_and_a_warm_cache_runs_nothing(fake: FakeRunner, tmp_path: Path) -> None:
    repo, root = make_repo(tmp_path), tmp_path / "cache"
    refs = images.ensure_images(["base", "operator"], root=root, repo=repo, install_packages=False)
    programs = fake.programs()
    assert programs.count("mmdebstrap") == 1 and programs.count("buildah bud") == 1
    assert programs.count("buildah push") == 2
    assert programs.index("mmdebstrap") < programs.index("buildah bud"), "the base is built before what uses it"
    bud = next(c for c in fake.commands if "bud" in c)
    assert f"--build-arg=PYTHON_IMAGE={refs['base'].ref}" in bud
    # The build context is a staged copy of the hashed files, not the checkout.
    assert bud[-1] != str(repo) and not Path(bud[-1]).exists(), "the staged context is removed after the build"
    for ref in refs.values():
        assert images.is_cached(ref)
        assert images.image_info(ref)["key"] == ref.key

    fake.commands.clear()
    again = images.ensure_images(["base", "operator"], root=root, repo=repo, install_packages=False)
    assert again == refs
    assert fake.commands == [], "a warm cache must not run buildah or mmdebstrap"


def test_an_archive_without_its_metadata_is_rebuilt(fake: FakeRunner, tmp_path: Path) -> None:
    """A build killed between writing the archive and its metadata leaves nothing that counts as finished."""
    root = tmp_path / "cache"
    refs = images.ensure_images(["base"], root=root, install_packages=False)
    refs["base"].archive.with_suffix(".json").unlink()
    fake.commands.clear()
    images.ensure_images(["base"], root=root, install_packages=False)
    assert "mmdebstrap" in fake.programs()


def test_a_failed_build_leaves_no_archive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing(command: list[str], log_path: Path, env: object = None, cwd: object = None) -> str:
        if "push" in command:
            Path(command[-1].split(":")[1]).write_bytes(b"half")
            raise ClusterError("buildah", "push failed", log_path)
        return "c\n"

    monkeypatch.setattr(images, "_runner", lambda recorder: failing)
    with pytest.raises(ClusterError, match="push failed"):
        images.ensure_images(["base"], root=tmp_path, install_packages=False)
    assert list((tmp_path / "images").glob("*.tar")) == []
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [".lock", ".tmp"]
    assert list((tmp_path / "images" / ".tmp").iterdir()) == []


def test_a_build_first_removes_what_a_killed_build_left(fake: FakeRunner, tmp_path: Path) -> None:
    stale_dir = tmp_path / "images" / ".tmp" / "runtime-abc" / "context"
    stale_dir.mkdir(parents=True)
    stale_push = tmp_path / "images" / ".runtime-0123.tar.tmp-999"
    stale_push.write_bytes(b"half")
    images.ensure_images(["pause"], root=tmp_path, install_packages=False)
    assert not stale_dir.parent.exists() and not stale_push.exists()


def test_import_skips_images_containerd_already_holds(fake: FakeRunner, tmp_path: Path) -> None:
    archives = {}
    for name in ("pause", "base"):
        archives[name] = images.ImageRef(name, f"localhost/{name}:1", name * 8, tmp_path / f"{name}.tar")
        archives[name].archive.write_bytes(b"x")
    fake.present = {"localhost/pause:1"}
    imported = images.import_images("/n1.sock", archives)
    assert imported == [archives["base"]]
    imports = [c for c in fake.commands if "import" in c]
    assert imports == [images.ctr_import_command("/n1.sock", archives["base"].archive)]
    label = fake.commands[-1]
    assert label[-3:] == ["label", "localhost/base:1", f"{images.CONTENT_LABEL}={'base' * 8}"]


def test_import_of_a_missing_archive_names_the_command_to_run(tmp_path: Path) -> None:
    ref = images.ImageRef("runtime", "localhost/telechat-runtime:1", "k", tmp_path / "gone.tar")
    with pytest.raises(ClusterError, match="python -m tests.cluster images"):
        images.import_images("/n1.sock", [ref])


def test_runner_failure_names_the_program_and_its_log(tmp_path: Path) -> None:
    run = images._runner(images.Recorder())
    log = tmp_path / "x.log"
    with pytest.raises(ClusterError) as failure:
        run(["sh", "-c", "echo broken-thing >&2; exit 3"], log)
    assert failure.value.component == "sh" and failure.value.log_path == log
    assert "broken-thing" in str(failure.value) and "exit code 3" in str(failure.value)
    with pytest.raises(ClusterError, match="not installed"):
        run(["/nonexistent/buildah", "bud"], log)


# ---- the operator chart from the local image ----


def test_operator_chart_values_pin_the_local_image_and_merge_extras() -> None:
    ref = images.ImageRef("operator", "localhost/telechat-operator:0123456789ab", "k", Path("/x.tar"))
    values = images.operator_chart_values(ref, {"operator": {"verbose": True}, "image": {"pullPolicy": "IfNotPresent"}})
    assert values["image"] == {
        "repository": "localhost/telechat-operator",
        "tag": "0123456789ab",
        "pullPolicy": "IfNotPresent",
    }
    assert values["operator"] == {"verbose": True}
    assert values["nodeSelector"]["kubernetes.io/arch"] in ("amd64", "arm64")
    assert images.operator_chart_values("registry:5000/op:v1")["image"]["repository"] == "registry:5000/op"
    assert images.operator_chart_values("localhost/op:v1")["image"]["pullPolicy"] == "Never"
    with pytest.raises(ValueError, match="no tag"):
        images.operator_chart_values("registry:5000/op")


def test_helm_install_args_are_idempotent_and_wait(tmp_path: Path) -> None:
    args = images.helm_install_args("tco", "telechat-system", tmp_path / "v.yaml")
    assert args[:4] == ["upgrade", "--install", "tco", str(images.OPERATOR_CHART)]
    assert {"--create-namespace", "--wait", "--take-ownership"} <= set(args)
    assert args[args.index("--values") + 1] == str(tmp_path / "v.yaml")


class FakeCluster:
    def __init__(self, helm_code: int) -> None:
        self.helm_code = helm_code
        self.values: dict = {}

    def helm(self, *args: str, check: bool = True, timeout: float = 0) -> subprocess.CompletedProcess[str]:
        self.values = yaml.safe_load(Path(args[args.index("--values") + 1]).read_text())
        return subprocess.CompletedProcess(args, self.helm_code, "", "Error: context deadline exceeded")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 0) -> subprocess.CompletedProcess[str]:
        output = "tco-abc 0/1 ErrImageNeverPull" if args[0] == "get" and args[1] == "pods" else ""
        return subprocess.CompletedProcess(args, 0, output, "")


def test_install_operator_chart_passes_the_values_and_explains_a_failure() -> None:
    ok = FakeCluster(0)
    installed = images.install_operator_chart(ok, "localhost/telechat-operator:abc", {"replicaCount": 1})
    assert installed == images.OperatorRelease(
        "telechat-operator", "telechat-system", "localhost/telechat-operator:abc"
    )
    assert ok.values["image"]["tag"] == "abc" and ok.values["replicaCount"] == 1
    with pytest.raises(ClusterError, match="operator chart") as failure:
        images.install_operator_chart(FakeCluster(1), "localhost/telechat-operator:abc")
    assert "ErrImageNeverPull" in str(failure.value) and "context deadline exceeded" in str(failure.value)


def test_the_chart_renders_the_local_image(tmp_path: Path) -> None:
    entry = entry_dir(COMPONENTS_BY_NAME["helm"])
    if not is_complete(entry, "helm"):
        pytest.skip(f"helm is not built ({entry}): run python -m tests.cluster build")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(images.operator_chart_values("localhost/telechat-operator:0123456789ab")))
    result = subprocess.run(
        [str(entry / "helm"), "template", "tco", str(images.OPERATOR_CHART), "--values", str(values)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": "/tmp", "KUBECONFIG": "/dev/null"},
    )
    assert result.returncode == 0, result.stderr
    deployment = next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "localhost/telechat-operator:0123456789ab"
    assert pod["containers"][0]["imagePullPolicy"] == "Never"
    assert pod["nodeSelector"] == {
        "kubernetes.io/arch": images.operator_chart_values("a:b")["nodeSelector"]["kubernetes.io/arch"]
    }


def test_an_interrupted_command_stops_its_whole_process_group(tmp_path: Path) -> None:
    """A KeyboardInterrupt (SIGTERM of `python -m tests.cluster images`) must not leave mmdebstrap running."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; echo started; wait"

    run = images._runner(None)

    def interrupt_when_started() -> None:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # A process started in the background by a non-interactive shell inherits SIGINT ignored: install Python's
    # default handler for this test so the signal really raises KeyboardInterrupt, as it does at a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run(["sh", "-c", script], tmp_path / "x.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the command's child survived the interruption"
        time.sleep(0.1)


def test_prune_keeps_the_current_archives_and_what_is_not_ours(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    current = images.ImageRef(
        "runtime", "localhost/telechat-runtime:aaaaaaaaaaaa", "a" * 64, images_dir / "runtime-aaaaaaaaaaaa.tar"
    )
    names = [
        "runtime-aaaaaaaaaaaa.tar",
        "runtime-aaaaaaaaaaaa.json",
        "runtime-bbbbbbbbbbbb.tar",
        "runtime-bbbbbbbbbbbb.json",
        "telechat-busybox-cccccccccccc.tar",
        "runtime-notes.txt",
    ]
    for name in names:
        (images_dir / name).write_text("x")
    removed = images.prune_archives({"runtime": current}, root=tmp_path, log=lambda message: None)
    assert sorted(p.name for p in removed) == ["runtime-bbbbbbbbbbbb.json", "runtime-bbbbbbbbbbbb.tar"]
    assert sorted(p.name for p in images_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [
            "runtime-aaaaaaaaaaaa.tar",
            "runtime-aaaaaaaaaaaa.json",
            "telechat-busybox-cccccccccccc.tar",
            "runtime-notes.txt",
        ]
    )


def test_older_builds_of_the_repository_are_dropped_after_a_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Like buildah: `buildah images NAME` looks NAME up as NAME:latest ("image not known" for a repository whose
    images all have other tags), so the old builds are found by listing everything and filtering by repository."""
    repo, root = make_repo(tmp_path), tmp_path / "cache"
    stored = ["localhost/telechat-base:old111", "localhost/other:1", "localhost/telechat-base-extra:x"]
    runner = FakeRunner()

    def buildah_like(
        command: list[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: object = None
    ) -> str:
        if command[0] == "buildah" and "images" in command:
            positional = [a for a in command[command.index("images") + 1 :] if not a.startswith("--")]
            if positional:
                raise ClusterError("buildah", f"Error: {positional[0]}: image not known", log_path)
            return "\n".join([*stored, *(c[-1].split("=", 1)[1] for c in runner.commands if "--tag" in " ".join(c))])
        return runner(command, log_path, env, cwd)

    monkeypatch.setattr(images, "_runner", lambda recorder: buildah_like)
    refs = images.ensure_images(["base"], root=root, repo=repo, install_packages=False)
    assert images.is_cached(refs["base"])
    removed = [c[-1] for c in runner.commands if "rmi" in c and "--force" in c]
    assert removed == ["localhost/telechat-base:old111"]
