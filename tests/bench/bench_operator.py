"""Benchmark: apply -> all rank pods Running, through the operator vs. creating the same objects directly.

    .venv/bin/python -m tests.bench.bench_operator [--repeats 3] [--out tests/bench/results/operator.md]

Starts its own local cluster (64 fake Ascend nodes x 8 NPUs; `--kubeconfig` reuses one) and the real operator
(`telechat-operator run`, a subprocess), then for each scenario, in the same run and on the same cluster:
- operator: create the TeleChatFinetune(s); the clock stops when every rank pod of every job is Running;
- baseline: create the very objects the operator would (ConfigMap, headless Service, rank pods, from the same
  builders) straight with the kubernetes client, sequentially and with 16 threads; same stop condition.
The baseline pods carry no `app.kubernetes.io/managed-by` label, so the operator's (server-side filtered) pod
watch never sees them. Ratios are operator / best baseline, medians over the repeats. Finally one 2-node and one
64-node job go through a whole lifecycle (Running -> ranks Succeeded -> merge -> Succeeded) and the operator's
own API request counter (`telechat_operator_api_requests_total`) gives the requests per job.
kwok never runs containers: "Running" is the phase kwok reports once the scheduler has bound the pod.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from telechat_operator import constants as c
from telechat_operator.builders.configmap import build_config_map
from telechat_operator.builders.pods import build_rank_pod
from telechat_operator.builders.service import build_service
from telechat_operator.spec import parse

from tests.cluster.controlplane import ClusterHandle
from tests.e2e.finetune_harness import OperatorProcess, finetune, install

REPO = Path(__file__).resolve().parents[2]
NODES = 64
NPUS = 8
POLL_SECONDS = 0.02


def job_body(name: str, nodes: int, devices: int) -> dict[str, Any]:
    body = finetune(name, nodes=nodes, devicesPerNode=devices)
    body["spec"]["parallel"] = {"dataParallel": nodes * devices, "modelParallel": 1, "pipelineStage": 1}
    body["spec"]["model"] = "telechat2-7b"
    return body


class Bench:
    def __init__(self, cluster: ClusterHandle, operator: OperatorProcess) -> None:
        self.cluster = cluster
        self.operator = operator
        api = cluster.api_client()
        api.configuration.connection_pool_maxsize = 32
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def namespace(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"metadata": {"name": name}})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # pods need the namespace's default ServiceAccount
            if self.core.list_namespaced_service_account(name).items:
                return name
            time.sleep(0.1)
        raise RuntimeError(f"no default ServiceAccount in {name}")

    def cleanup(self, namespace: str) -> None:
        """Delete the jobs, then the namespace; wait until the pods are gone (the next run needs the NPUs)."""
        self.cluster.kubectl(f"--namespace={namespace}", "delete", "telechatfinetunes", "--all", "--wait=true")
        self.core.delete_namespace(namespace)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not self.core.list_namespaced_pod(namespace).items:
                return
            time.sleep(0.2)
        raise RuntimeError(f"pods of {namespace} still there after 180s")

    def wait_running(self, namespace: str, expected: int, started: float) -> float:
        """Poll the pods' phases. Raw JSON, not the client's model classes: deserializing 100 pods into models took
        ~0.1 s of CPU per poll, which both coarsened the clock and competed with the cluster on 2 CPUs."""
        while True:
            response = self.core.list_namespaced_pod(namespace, _preload_content=False)
            pods = json.loads(response.data)["items"]
            running = sum(1 for pod in pods if (pod.get("status") or {}).get("phase") == "Running")
            if running >= expected:
                return time.monotonic() - started
            if time.monotonic() - started > 300:
                raise RuntimeError(f"{running}/{expected} pods Running after 300s in {namespace}")
            time.sleep(POLL_SECONDS)

    def via_operator(self, jobs: int, nodes: int, devices: int) -> float:
        namespace = self.namespace()
        bodies = [job_body(f"job{i}", nodes, devices) for i in range(jobs)]
        started = time.monotonic()
        for body in bodies:
            self.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.FINETUNE_PLURAL, body)
        elapsed = self.wait_running(namespace, jobs * nodes, started)
        self.cleanup(namespace)
        return elapsed

    def baseline(self, jobs: int, nodes: int, devices: int, threads: int) -> float:
        namespace = self.namespace()
        objects: list[dict[str, Any]] = []
        for i in range(jobs):
            body = copy.deepcopy(job_body(f"job{i}", nodes, devices))
            body["metadata"].update(namespace=namespace, uid="baseline", generation=1)
            spec = parse(body)
            objects += [build_config_map(spec), build_service(spec)]
            objects += [build_rank_pod(spec, rank, 1) for rank in range(nodes)]
        for obj in objects:  # no owner (it does not exist) and invisible to the operator's pod watch
            obj["metadata"].pop("ownerReferences")
            obj["metadata"]["labels"].pop(c.LABEL_MANAGED_BY)
            obj["metadata"]["labels"].pop(c.LABEL_OWNER_KIND)
        create: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ConfigMap": lambda o: self.core.create_namespaced_config_map(namespace, o),
            "Service": lambda o: self.core.create_namespaced_service(namespace, o),
            "Pod": lambda o: self.core.create_namespaced_pod(namespace, o),
        }
        started = time.monotonic()
        if threads == 1:
            for obj in objects:
                create[obj["kind"]](obj)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda o: create[o["kind"]](o), objects))
        elapsed = self.wait_running(namespace, jobs * nodes, started)
        self.cleanup(namespace)
        return elapsed

    def api_requests(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for line in self.operator.metrics().splitlines():
            match = re.match(r'telechat_operator_api_requests_total\{resource="([^"]+)",verb="([^"]+)"\} (\S+)', line)
            if match:
                counts[f"{match[2]} {match[1]}"] = float(match[3])
        return counts

    def lifecycle_requests(self, nodes: int, devices: int) -> dict[str, float]:
        """Operator API requests for one job from apply to Succeeded (ranks and merge pod ended via kwok)."""
        namespace = self.namespace()
        before = self.api_requests()
        self.custom.create_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.FINETUNE_PLURAL, job_body("life", nodes, devices)
        )
        self.wait_running(namespace, nodes, time.monotonic())
        self.wait_state(namespace, "life", "Running")
        self.annotate(namespace, "telechat.io/role=worker")
        self.wait_state(namespace, "life", "Merging")
        self.wait_running(namespace, 1, time.monotonic())  # the merge pod (ranks are Succeeded now)
        self.annotate(namespace, "telechat.io/role=merge")
        self.wait_state(namespace, "life", "Succeeded")
        time.sleep(2)  # let the last events settle
        after = self.api_requests()
        self.cleanup(namespace)
        return {key: after.get(key, 0) - before.get(key, 0) for key in after if after.get(key, 0) > before.get(key, 0)}

    def annotate(self, namespace: str, selector: str) -> None:
        self.cluster.kubectl(
            f"--namespace={namespace}", "annotate", "pods", f"--selector={selector}", "telechat.io/fake-phase=Succeeded"
        )

    def wait_state(self, namespace: str, name: str, state: str) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            obj = self.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.FINETUNE_PLURAL, name)
            if (obj.get("status") or {}).get("state") == state:
                return
            time.sleep(POLL_SECONDS)
        raise RuntimeError(f"{name} did not reach {state}")


SCENARIOS = [("one 2-node job", 1, 2, 8), ("one 16-node job", 1, 16, 8), ("one 64-node job", 1, 64, 8)]
SCENARIOS.append(("50 two-node jobs at once", 50, 2, 4))
TARGETS = {1: 1.25, 50: 1.5}
NOTES = """How to read it. The clock runs from the first create call to the poll that sees every rank pod Running
(kwok marks a pod Running once the scheduler binds it); it polls every 20 ms with raw JSON lists. (Before 2026-11-25
21:10 the poll was every 50 ms through the client's model classes, ~0.1 s of CPU per 100-pod list: the old 2-node
samples fell on 0.1 s steps.) The ratio is against the faster of the two baselines.

Where the operator's time goes (profiled with `TELECHAT_OPERATOR_TRACE=1`, which logs the wall clock of each step of
a pass, against a pod watch in the benchmark process; same cluster, 2026-11-25 21:00-21:08 UTC):
- one 2-node job: the job's ADDED event reaches the handler 1-6 ms after the create returns, the pass starts within
  1 ms, reading the job and its pods (concurrently) takes 2-7 ms, parsing and building the pods under 1 ms, the two
  pod POSTs (concurrent) 6-10 ms: the pods exist ~20 ms after the apply (the sequential baseline's first pod: ~17 ms).
  The ConfigMap and Service follow the pods, then the status patch; Events are posted off the pass's path.
- one 64-node job: 64 pod POSTs on 16 threads take ~0.3 s, like the threaded baseline's 66 creates; what is left is
  the scheduler and kwok binding 64 pods on 2 CPUs shared with the operator's own pod-watch processing.
- 50 jobs: the operator's clock includes creating the 50 TeleChatFinetunes one by one (1.2-1.8 s: the apiserver
  evaluates the CRD's CEL rules per create, and shares the 2 CPUs with the operator); the last job's pods are posted
  ~0.5 s after its ADDED event, behind the second pass of earlier jobs (their pods turned Running: status -> Running,
  Events), each a GET, a LIST and a PATCH.
Fixed after profiling: (1) the echo of the operator's own status write usually arrived before the PATCH response, so
the resourceVersion check missed it and every status write cost one more full pass (GET + LIST) in the middle of the
ramp; the expected (generation, status) is now recorded before the PATCH. (2) Rendering the MindFormers config took
7.5 ms of pure-Python YAML per job; libyaml's emitter writes the same bytes in 0.9 ms (a unit test checks equality).
Idempotency is unchanged: deterministic names, 409 = already exists, status derived from a fresh read.
The machine is shared (2 CPUs, other helpers' builds and tests; load averages above), so repeats vary by up to 2x.

Why targets still miss (run above). The operator's own path from the job's watch event to the last pod POST is
~20 ms for 2 nodes (profile above) and the 64-node job is within target. For 2- and 16-node jobs the baselines
finish in 0.03-0.25 s, so a fixed ~20 ms reaction (watch delivery, one read of the job and its pods) plus the
operator's follow-up writes (ConfigMap, Service, status, Events, each also echoed to its own watch), which compete
with the scheduler and kwok on the same 2 CPUs in the ~50 ms before the pods are bound, set the ratio: the raw
2-node operator samples range 0.04-0.20 s, the fastest equal to the baselines'. Fifty jobs are CPU-bound: in one
profiled run (user + system CPU seconds per process from /proc) the operator variant used apiserver 2.46, operator
1.06, benchmark client 0.80, kwok 0.36, etcd 0.31, controller-manager 0.28, scheduler 0.20 = 5.5 CPU-s in 2.75 s
on 2 CPUs; the threaded baseline apiserver 1.32, client 1.16, kwok 0.34, controller-manager 0.25, etcd 0.23,
scheduler 0.19 = 3.5 CPU-s in 1.73 s. The difference is the apiserver's work for 50 custom resources (CEL
validation on create, two status patches, a GET and a LIST per pass, Events, watch fan-out) and the operator's own
CPU. Going lower means fewer API calls per job (e.g. reads from a watch cache instead of fresh reads), which would
trade away the fresh-read argument the state machine's correctness rests on; not done."""


def run_bench(bench: Bench, repeats: int, only: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for title, jobs, nodes, devices in SCENARIOS:
        if only and only not in title:
            continue
        samples: dict[str, list[float]] = {"operator": [], "sequential": [], "threaded": []}
        for _ in range(repeats):  # interleaved, so drift in the machine's load hits every variant alike
            samples["sequential"].append(bench.baseline(jobs, nodes, devices, threads=1))
            samples["threaded"].append(bench.baseline(jobs, nodes, devices, threads=16))
            samples["operator"].append(bench.via_operator(jobs, nodes, devices))
        medians = {key: statistics.median(values) for key, values in samples.items()}
        best = min(medians["sequential"], medians["threaded"])
        row = {"scenario": title, "pods": jobs * nodes, **medians, "ratio": medians["operator"] / best}
        row["target"] = TARGETS[jobs]
        row["samples"] = samples
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict[str, Any]], lifecycles: dict[int, dict[str, float]], repeats: int) -> str:
    lines = [
        "# Operator benchmark: apply -> all rank pods Running",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m tests.bench.bench_operator --repeats {repeats}`"
        f" on {platform.machine()} ({_cpus()} CPUs, shared with other work), local cluster of {NODES} fake Ascend"
        f" nodes x {NPUS} NPUs (kwok; real apiserver, scheduler, controller-manager). Medians of {repeats} runs,"
        " seconds. Baselines create the same ConfigMap, Service and rank pods (same builders) with the kubernetes"
        " client, sequentially or with 16 threads; the ratio is operator / the faster baseline.",
        "",
        f"Load average (1, 5, 15 min) at the start: {LOAD_AT_START}; at the end: {_load()}.",
        "",
        "| scenario | rank pods | operator s | baseline sequential s | baseline 16 threads s | ratio | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        verdict = "ok" if row["ratio"] <= row["target"] else "MISSED"
        lines.append(
            f"| {row['scenario']} | {row['pods']} | {row['operator']:.2f} | {row['sequential']:.2f} | "
            f"{row['threaded']:.2f} | {row['ratio']:.2f}x | <= {row['target']}x {verdict} |"
        )
    lines += ["", "## API requests per job lifecycle (the operator's reconcilers; kopf's watch streams excluded)", ""]
    lines += ["| job | total | by verb and resource |", "|---|---:|---|"]
    for nodes, counts in lifecycles.items():
        detail = ", ".join(f"{key}: {int(value)}" for key, value in sorted(counts.items()))
        lines.append(f"| {nodes} nodes, apply -> Succeeded (with merge) | {int(sum(counts.values()))} | {detail} |")
    lines += ["", NOTES, "", "Raw samples (seconds):", ""]
    for row in rows:
        lines.append(
            f"- {row['scenario']}: " + "; ".join(f"{k} {[round(v, 2) for v in vs]}" for k, vs in row["samples"].items())
        )
    return "\n".join(lines) + "\n"


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


LOAD_AT_START = _load()


def _cpus() -> int:
    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kubeconfig", help="reuse a running local cluster (needs 64 nodes x 8 NPUs)")
    parser.add_argument("--out", default=str(REPO / "tests" / "bench" / "results" / "operator.md"))
    parser.add_argument("--only", help="run only the scenarios whose title contains this text (no lifecycle counts)")
    args = parser.parse_args(argv)
    global LOAD_AT_START
    LOAD_AT_START = _load()

    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        state = Path(tmp) / "cluster"
        if args.kubeconfig:
            kubeconfig = Path(args.kubeconfig)
        else:
            up = [sys.executable, "-m", "tests.cluster", "up", "--nodes", str(NODES), "--state-dir", str(state)]
            subprocess.run(up, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            kubeconfig = state / "kubeconfig"
        bin_dir = kubeconfig.parent / "bin"
        cluster = ClusterHandle(kubeconfig, bin_dir, kubeconfig.parent)
        operator = OperatorProcess(kubeconfig, Path(tmp) / "operator.log")
        try:
            install(cluster)
            operator.start()
            bench = Bench(cluster, operator)
            bench.via_operator(1, 2, 8)  # warm-up: imports, connections, scheduler caches
            rows = run_bench(bench, args.repeats, args.only)
            lifecycles = {} if args.only else {nodes: bench.lifecycle_requests(nodes, 8) for nodes in (2, 64)}
        finally:
            operator.stop()
            if not args.kubeconfig:
                down = [sys.executable, "-m", "tests.cluster", "down", "--state-dir", str(state)]
                subprocess.run(down, check=False, cwd=REPO, stdout=subprocess.DEVNULL)
    text = report(rows, lifecycles, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
