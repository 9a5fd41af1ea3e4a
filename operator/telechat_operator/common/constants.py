"""Every name the operator shares with the cluster, the CRD and the pods, in one place.

Pure data: no imports beyond the standard library. The CRD YAML under `crds/` repeats some of these (enums,
reserved env names, the name-length rule); `tests/unit/test_operator_crd.py` checks the two agree.
"""

from __future__ import annotations

# --- API identity --------------------------------------------------------------------------------------------
GROUP = "telechat.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FINETUNE_KIND = "TeleChatFinetune"
FINETUNE_PLURAL = "telechatfinetunes"
# `reportingController` of our Events and the field manager of our writes.
OPERATOR_NAME = "telechat-operator"

# --- Labels on every child object ----------------------------------------------------------------------------
# Server-side watch filter: the operator only watches pods carrying this label (set on every pod it creates, for
# every kind it manages), so a cluster with thousands of unrelated pods costs it nothing.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = OPERATOR_NAME
# The owning resource's kind, so one pod watch can route events to the right handler (finetune, inference).
LABEL_OWNER_KIND = "telechat.io/owner-kind"
# The owning TeleChatFinetune's name; selects all of a job's children.
LABEL_JOB_NAME = "telechat.io/job-name"
# Rank of the node (0..nodes-1); rank 0 hosts the msrun scheduler (the master address).
LABEL_NODE_RANK = "telechat.io/node-rank"
# Attempt number (1, 2, ...): part of the pod name, so a restarted operator never creates a pod twice.
LABEL_ATTEMPT = "telechat.io/attempt"
# What the pod does: ROLE_WORKER (a training rank) or ROLE_MERGE (the checkpoint merge).
LABEL_ROLE = "telechat.io/role"
ROLE_WORKER = "worker"
ROLE_MERGE = "merge"
ROLE_INITIALIZER = "initializer"  # the pod running `telechat2 preprocess` / `convert` before the ranks

# --- Annotations ---------------------------------------------------------------------------------------------
# Volcano gang scheduling: pods name their PodGroup here.
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
VOLCANO_SCHEDULER = "volcano"
VOLCANO_API_GROUP = "scheduling.volcano.sh"
VOLCANO_API_VERSION = "v1beta1"
VOLCANO_PODGROUP_PLURAL = "podgroups"

# --- Ascend hardware -----------------------------------------------------------------------------------------
ASCEND_RESOURCE = "huawei.com/Ascend910"
ALLOWED_DEVICES_PER_NODE = (1, 2, 4, 8, 16)
# Host paths every Ascend container mounts read-only (driver, DCMI library, npu-smi, install info).
ASCEND_DRIVER_MOUNTS: tuple[tuple[str, str, str], ...] = (
    # (volume name, host path, hostPath type)
    ("ascend-driver", "/usr/local/Ascend/driver", "Directory"),
    ("ascend-dcmi", "/usr/local/dcmi", "Directory"),
    ("ascend-npu-smi", "/usr/local/bin/npu-smi", "File"),
    ("ascend-install-info", "/etc/ascend_install.info", "File"),
)
# MindSpore workers share tensors through /dev/shm; the container default (64 MiB) is far too small.
SHM_VOLUME = "dshm"
SHM_MOUNT_PATH = "/dev/shm"

# --- Rendered config -----------------------------------------------------------------------------------------
CONFIG_VOLUME = "telechat-config"
CONFIG_MOUNT_DIR = "/etc/telechat"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_MOUNT_DIR}/{CONFIG_KEY}"
# Paths the operator mounts into every NPU pod: a user mount at or under one of them is refused (both CRDs' CEL
# rules list the same paths).
RESERVED_MOUNT_PATHS = (CONFIG_MOUNT_DIR, SHM_MOUNT_PATH, *(path for _, path, _ in ASCEND_DRIVER_MOUNTS))

# --- Containers ----------------------------------------------------------------------------------------------
TRAINER_CONTAINER = "trainer"
MERGE_CONTAINER = "merge"
# Containers of the initializer pod; they run side by side (independent inputs and outputs).
PREPROCESS_CONTAINER = "preprocess"
CONVERT_CONTAINER = "convert"
# Where the telechat2 commands write why they failed (the kubelet copies it into the container's terminated state;
# FallbackToLogsOnError takes the log tail when a crash wrote nothing).
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MASTER_PORT_NAME = "msrun"
# Rank 0's `telechat2 launch` serves every rank's training progress here (GET /progress, read-only JSON); the
# operator polls it (telechat_operator.progress). The same number as telechat2.progress.DEFAULT_PORT.
PROGRESS_PORT_NAME = "progress"
PROGRESS_PORT = 8119
PROGRESS_PATH = "/progress"

# --- Output layout (relative to spec.output.path) ------------------------------------------------------------
MSRUN_LOG_DIR = "msrun_log"
STRATEGY_DIR = "strategy"
CHECKPOINT_DIR = "checkpoint"
MERGED_DIR = "merged"
# `telechat2 convert`'s output when spec.checkpoint.huggingface is set without spec.checkpoint.load.
CONVERTED_DIR = "converted"

# --- Environment contract with `telechat2 launch` ------------------------------------------------------------
# The rank pods pass the msrun arguments on the command line; the same values also go in these variables so a
# process inside the pod (or a debugging shell) can read them.
ENV_WORKER_NUM = "TELECHAT_WORKER_NUM"
ENV_LOCAL_WORKER_NUM = "TELECHAT_LOCAL_WORKER_NUM"
ENV_NODE_RANK = "TELECHAT_NODE_RANK"
ENV_MASTER_ADDR = "TELECHAT_MASTER_ADDR"
ENV_MASTER_PORT = "TELECHAT_MASTER_PORT"
ENV_LOG_DIR = "TELECHAT_LOG_DIR"
ENV_CLUSTER_TIMEOUT = "TELECHAT_CLUSTER_TIMEOUT"
# `telechat2 launch` reads it (how long to wait for the master's name to resolve): owned by the launch contract too.
ENV_RESOLVE_TIMEOUT = "TELECHAT_RESOLVE_TIMEOUT"
# Informational: which job and attempt this process belongs to.
ENV_JOB_NAME = "TELECHAT_JOB_NAME"
ENV_ATTEMPT = "TELECHAT_ATTEMPT"
# Names a user may not set in spec.env: the operator owns them (TELECHAT_*) or msrun exports them to each worker.
RESERVED_ENV_NAMES = (
    ENV_WORKER_NUM,
    ENV_LOCAL_WORKER_NUM,
    ENV_NODE_RANK,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_LOG_DIR,
    ENV_CLUSTER_TIMEOUT,
    ENV_RESOLVE_TIMEOUT,
    ENV_JOB_NAME,
    ENV_ATTEMPT,
    "MS_ROLE",
    "MS_SCHED_HOST",
    "MS_SCHED_PORT",
    "MS_WORKER_NUM",
    "MS_NODE_ID",
    "MS_NODE_RANK",
    "MS_LOCAL_WORKER",
    "MS_TOPO_TIMEOUT",
    "RANK_ID",
    "RANK_SIZE",
    "RANK_TABLE_FILE",
)

# --- Naming --------------------------------------------------------------------------------------------------
# Pod host names are `<job>-rank-<r>` and must be DNS labels (<= 63 characters).
DNS_LABEL_MAX = 63
RANK_HOST_INFIX = "-rank-"
MAX_NODES = 1024
# Longest job name that still leaves room for the largest rank suffix with MAX_NODES nodes: 63 - 6 - 4 = 53.
MAX_JOB_NAME = DNS_LABEL_MAX - len(RANK_HOST_INFIX) - len(str(MAX_NODES - 1))

# --- Timing --------------------------------------------------------------------------------------------------
# How soon to look again while old pods are still terminating (their deletion events usually come first).
TEARDOWN_POLL_SECONDS = 2.0

# --- Policies ------------------------------------------------------------------------------------------------
RESTART_POLICY_EXIT_CODE = "ExitCode"
RESTART_POLICY_ON_FAILURE = "OnFailure"
RESTART_POLICY_NEVER = "Never"
RESTART_POLICIES = (RESTART_POLICY_EXIT_CODE, RESTART_POLICY_ON_FAILURE, RESTART_POLICY_NEVER)
DEFAULT_BACKOFF_LIMIT = 3
DEFAULT_MASTER_PORT = 8118
DEFAULT_CLUSTER_TIMEOUT = 300
DEFAULT_MERGE_PREFIX = "telechat2"
# Merge pod failures retried before the job fails with MergeFailed.
MERGE_BACKOFF_LIMIT = 2
# Pod `status.reason` values that mean the pod (or its node) went away, not that training failed.
RETRYABLE_POD_REASONS = frozenset(
    {"Evicted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated", "UnexpectedAdmissionError", "Preempting"}
)

# --- Conditions, states, reasons -----------------------------------------------------------------------------
COND_INITIALIZED = "Initialized"
COND_CREATED = "Created"
COND_RUNNING = "Running"
COND_RESTARTING = "Restarting"
COND_MERGING = "Merging"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_SUSPENDED = "Suspended"
# True while rank pods cannot start for a reason the user must fix (Unschedulable, ImagePullBackOff, ...).
COND_STALLED = "Stalled"
# False while the running attempt's pods were built from an older spec (edits wait for the next restart).
COND_SPEC_APPLIED = "SpecApplied"
CONDITION_TYPES = (
    COND_INITIALIZED,
    COND_CREATED,
    COND_RUNNING,
    COND_RESTARTING,
    COND_MERGING,
    COND_SUCCEEDED,
    COND_FAILED,
    COND_SUSPENDED,
    COND_STALLED,
    COND_SPEC_APPLIED,
)

# One-word `status.state` (printer column).
STATE_PENDING = "Pending"
STATE_INITIALIZING = "Initializing"
STATE_RUNNING = "Running"
STATE_RESTARTING = "Restarting"
STATE_MERGING = "Merging"
STATE_SUCCEEDED = "Succeeded"
STATE_FAILED = "Failed"
STATE_SUSPENDED = "Suspended"
TERMINAL_STATES = frozenset({STATE_SUCCEEDED, STATE_FAILED})

REASON_INVALID_SPEC = "InvalidSpec"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_MERGE_FAILED = "MergeFailed"
REASON_NON_RETRYABLE_EXIT = "NonRetryableExitCode"
REASON_POD_FAILED = "PodFailed"
# Failures after which every rank pod is kept (the running ones stopped, not deleted) for `kubectl logs` until
# ttlSecondsAfterFinished: the job ended because a rank failed, and every rank's log may tell why.
KEEP_PODS_REASONS = frozenset({REASON_BACKOFF_LIMIT, REASON_NON_RETRYABLE_EXIT, REASON_POD_FAILED, REASON_MERGE_FAILED})
# Pod `status.reason` the kubelet gives a pod ended by its `activeDeadlineSeconds` (how the operator stops a
# surviving rank without deleting it).
POD_DEADLINE_REASON = "DeadlineExceeded"
# Why a Pending pod cannot go on: container waiting reasons (init containers included) and the scheduler's
# PodScheduled=False reason. Each one surfaces as the job's Stalled condition.
BLOCKED_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
UNSCHEDULABLE_REASON = "Unschedulable"
REASON_INITIALIZER_FAILED = "InitializerFailed"
