"""The real pipeline's pieces, shared by `bash tests/up.sh --real` and tests/e2e_real/test_pipeline.py.

On real nodes nothing is simulated: the operator runs in-cluster from its image (Helm chart), the images are loaded
into each real node's containerd, and a tiny TeleChatFinetune really trains on a MindRecord dataset made here from
jsonl (`telechat2 preprocess`) on a hostPath directory every node mounts (the nodes share this machine's disk).

    python -m tests.cluster.real_sample [--state-dir DIR] [--no-wait]   # what up.sh --real runs after `up`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.cluster import images, nodes
from tests.cluster.controlplane import DEFAULT_STATE_DIR, ClusterHandle

MOUNT = "/mnt/telechat"
SAMPLE_JOB = "telechat2-tiny-sample"
SHARED_DIR = "shared"  # under the cluster's state dir: the sample's hostPath
LINES = 160  # packed into 65-token rows: 30 steps per rank at batch 2 with 2 ranks (~7 s a step on a busy CPU)
PAIRS = [
    ("what is the capital of France", "Paris is the capital of France"),
    ("name a colour", "blue is a colour"),
    ("say hello", "hello there friend"),
    ("count to three", "one two three"),
]
# Where the rank and serving pods mount the host's Ascend driver (hostPath Directory/File, as on an Ascend node).
# Kept in step with telechat_operator.common.constants.ASCEND_DRIVER_MOUNTS (a unit test holds them equal); CPU stands
# in for the NPU here, so empty stand-ins are made on this machine.
DRIVER_PATHS: tuple[tuple[str, str], ...] = (
    ("/usr/local/Ascend/driver", "Directory"),
    ("/usr/local/dcmi", "Directory"),
    ("/usr/local/bin/npu-smi", "File"),
    ("/etc/ascend_install.info", "File"),
)
OPERATOR_ENV = [  # restarts after a failure come quickly in a demo/test; the defaults back off for minutes
    {"name": "TELECHAT_OPERATOR_BACKOFF_BASE_SECONDS", "value": "1"},
    {"name": "TELECHAT_OPERATOR_BACKOFF_MAX_SECONDS", "value": "5"},
]


def node_socket(state_dir: Path, index: int) -> str:
    return str(state_dir / nodes.NODES_DIR / nodes.node_name(index) / "containerd" / "containerd.sock")


def make_driver_stand_ins(paths: Iterable[tuple[str, str]] = DRIVER_PATHS) -> list[Path]:
    """Create the missing driver paths; returns what was created, deepest first (what `remove_stand_ins` takes)."""
    made: list[Path] = []
    for name, kind in paths:
        path = Path(name)
        if path.exists():
            continue
        missing = [p for p in [path, *path.parents] if not p.exists()]
        if kind == "Directory":
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# stand-in for the Ascend driver (telechat-operator real-node cluster; CPU only)\n")
        made += missing
    return made


def remove_stand_ins(made: Iterable[Path]) -> None:
    for path in made:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def prepare_data(root: Path, lines: int = LINES) -> Path:
    """tokenizer.model (tiny, trained here), chat.jsonl and train.mindrecord under root/data; root made writable
    for the pods. Idempotent: an existing dataset is kept."""
    from telechat2 import tokenizer as tk
    from telechat2.preprocess import preprocess

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    root.chmod(0o777)  # whatever user the runtime image runs as writes output/ here
    if (data / "train.mindrecord").is_file():
        return data
    tokenizer = tk.train_tiny_tokenizer(data / "tokenizer.model", vocab_size=512)
    jsonl = data / "chat.jsonl"
    with jsonl.open("w") as f:
        for i in range(lines):
            question, answer = PAIRS[i % len(PAIRS)]
            f.write(json.dumps({"input": f"<_user>{question}", "output": answer}) + "\n")
    preprocess(jsonl, tokenizer, 64, data / "train.mindrecord")
    return data


def import_into_nodes(state_dir: Path, count: int, refs: Mapping[str, images.ImageRef]) -> None:
    """Every real node needs the images its pods use; the imports run in parallel (disk-bound, not CPU-bound)."""
    with ThreadPoolExecutor(max_workers=max(count, 1)) as pool:
        list(pool.map(lambda i: images.import_images(node_socket(state_dir, i), refs), range(count)))


def operator_values(allowed_host_paths: Iterable[Path | str]) -> dict[str, Any]:
    """Chart values on top of images.operator_chart_values: on a real node, quick restarts, and the shared
    directory allowed as a hostPath (the operator refuses any other; TELECHAT_OPERATOR_ALLOWED_HOSTPATHS)."""
    return {
        "nodeSelector": {nodes.NODE_KIND_LABEL: nodes.REAL_NODE_KIND},
        "env": OPERATOR_ENV,
        "hostPaths": {"allowed": [str(path) for path in allowed_host_paths]},
    }


def install_operator(
    cluster: ClusterHandle, image: images.ImageRef, allowed_host_paths: Iterable[Path | str]
) -> images.OperatorRelease:
    return images.install_operator_chart(cluster, image, operator_values(allowed_host_paths), timeout=300)


def finetune_manifest(
    name: str, image: str, host_dir: Path, *, nodes_count: int = 2, save_steps: int = 5, backoff_limit: int = 2
) -> dict[str, Any]:
    """telechat2-tiny, `nodes_count` x 1 device, data parallel, on the real nodes, host_dir mounted at /mnt/telechat."""
    return {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatFinetune",
        "metadata": {"name": name},
        "spec": {
            "model": "telechat2-tiny",
            "image": image,
            "imagePullPolicy": "Never",  # no registry: the image was imported into the nodes
            "nodes": nodes_count,
            "devicesPerNode": 1,
            "parallel": {"dataParallel": nodes_count, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1},
            "dataset": {"path": f"{MOUNT}/data/train.mindrecord"},
            "output": {"path": f"{MOUNT}/output/{name}"},
            "training": {"epochs": 1, "batchSize": 2, "seqLength": 64, "saveSteps": save_steps},
            "volumes": [{"name": "shared", "hostPath": {"path": str(host_dir), "type": "Directory"}}],
            "volumeMounts": [{"name": "shared", "mountPath": MOUNT}],
            "nodeSelector": {nodes.NODE_KIND_LABEL: nodes.REAL_NODE_KIND},
            "runPolicy": {"backoffLimit": backoff_limit},
            "merge": {"enabled": True},
        },
    }


def inference_manifest(name: str, finetune: str, image: str) -> dict[str, Any]:
    """Serves the finetune's merged checkpoint with the tokenizer the dataset was made with."""
    return {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatInference",
        "metadata": {"name": name},
        "spec": {
            "model": "telechat2-tiny",
            "image": image,
            "imagePullPolicy": "Never",
            "checkpoint": {"fromFinetune": finetune},
            "vocabFile": f"{MOUNT}/data/tokenizer.model",
            "nodeSelector": {nodes.NODE_KIND_LABEL: nodes.REAL_NODE_KIND},
        },
    }


def condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def real_node_count(cluster: ClusterHandle) -> int:
    listed = cluster.kubectl("get", "nodes", f"--selector={nodes.NODE_KIND_LABEL}={nodes.REAL_NODE_KIND}", "-o=name")
    return len(listed.stdout.split())


def run_sample(
    cluster: ClusterHandle, *, wait: bool = True, timeout: float = 3600, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Images into the nodes, the operator by Helm, the sample finetune applied (and waited for unless wait=False)."""
    count = real_node_count(cluster)
    if count == 0:
        raise SystemExit("real_sample: the cluster has no real nodes (start it with `up --real`)")
    refs = images.ensure_images(["operator", "runtime"])
    log(f"real_sample: importing {', '.join(r.ref for r in refs.values())} into {count} real node(s)")
    import_into_nodes(cluster.state_dir, count, refs)
    shared = cluster.state_dir / SHARED_DIR
    prepare_data(shared)
    release = install_operator(cluster, refs["operator"], [shared])
    log(f"real_sample: operator {release.image} running in {release.namespace} (Helm release {release.release})")
    make_driver_stand_ins()
    body = finetune_manifest(SAMPLE_JOB, refs["runtime"].ref, shared, nodes_count=min(count, 2))
    cluster.kubectl("apply", "--namespace=default", "--filename=-", input=json.dumps(body))
    log(f"real_sample: applied TeleChatFinetune default/{SAMPLE_JOB} (output under {shared}/output/{SAMPLE_JOB})")
    if not wait:
        return body
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = json.loads(cluster.kubectl("get", "telechatfinetune", SAMPLE_JOB, "-n", "default", "-o=json").stdout)
        if condition(job, "Succeeded").get("status") == "True":
            log(f"real_sample: {SAMPLE_JOB} Succeeded; merged checkpoint {job['status'].get('checkpoint')}")
            return job
        if condition(job, "Failed").get("status") == "True":
            raise SystemExit(f"real_sample: {SAMPLE_JOB} failed: {condition(job, 'Failed').get('message')}")
        time.sleep(5)
    raise SystemExit(f"real_sample: {SAMPLE_JOB} did not finish in {timeout:.0f} s (kubectl describe telechatfinetune)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.real_sample", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, help="default: the directory of $KUBECONFIG, else .cluster/")
    parser.add_argument("--no-wait", action="store_true", help="apply the sample job and return")
    args = parser.parse_args(argv)
    kubeconfig = os.environ.get("KUBECONFIG")
    state = (args.state_dir or (Path(kubeconfig).parent if kubeconfig else DEFAULT_STATE_DIR)).resolve()
    if not (state / "kubeconfig").is_file():
        raise SystemExit(f"real_sample: no cluster in {state} (no kubeconfig); start one with `up --real`")
    cluster = ClusterHandle(state / "kubeconfig", state / "bin", state)
    run_sample(cluster, wait=not args.no_wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
