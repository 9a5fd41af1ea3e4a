"""Names the TeleChatInference controller shares with the cluster, the CRD and the serving pods.

Pure data. Shared names (API group, managed-by label, Ascend mounts, launch env contract) come from
`common.constants`; this module adds only what is specific to serving. The CRD under `crds/` repeats some of these
(reserved env and volume names, the name-length rule); `tests/unit/test_inference_crd.py` checks that the two agree.
"""

from __future__ import annotations

from telechat_operator.common import constants as c

# --- API identity --------------------------------------------------------------------------------------------
INFERENCE_KIND = "TeleChatInference"
INFERENCE_PLURAL = "telechatinferences"
INFERENCE_CRD_FILE = "telechat.io_telechatinferences.yaml"

# --- Labels --------------------------------------------------------------------------------------------------
# The owning TeleChatInference's name: selects all of its children.
LABEL_INFERENCE_NAME = "telechat.io/inference-name"
# "true" on pods that run the HTTP server (Deployment pods and group leaders): the Service and the scale
# subresource's selector (status.selector, what an HPA reads) select these.
LABEL_SERVING = "telechat.io/serving"
# Multi-node replicas: which group (replica index) and which rank in it (0 = leader).
LABEL_GROUP_INDEX = "telechat.io/group-index"
LABEL_WORKER_INDEX = "telechat.io/worker-index"
# Hash of everything a group pod is built from: a group whose hash differs is outdated and is rolled.
LABEL_TEMPLATE_HASH = "telechat.io/template-hash"
# Hash of the ConfigMap's data on the pod template: a config change changes the template, so pods roll.
ANNOTATION_CONFIG_HASH = "telechat.io/config-hash"
# Hash of the desired child (Deployment, Service, ConfigMap): unchanged hash -> no write.
ANNOTATION_SPEC_HASH = "telechat.io/spec-hash"
# The finetune whose checkpoint the pods serve (informational, on the pod template).
ANNOTATION_FROM_FINETUNE = "telechat.io/from-finetune"

ROLE_SERVER = "server"  # a Deployment pod: one whole replica
ROLE_LEADER = "leader"  # rank 0 of a multi-node group: runs msrun's scheduler and the HTTP server
ROLE_GROUP_WORKER = "worker"  # ranks 1.. of a multi-node group

# --- Containers, volumes, files ------------------------------------------------------------------------------
SERVER_CONTAINER = "server"
HTTP_PORT_NAME = "http"
PREDICT_CONFIG_KEY = "predict.yaml"
PREDICT_CONFIG_PATH = f"{c.CONFIG_MOUNT_DIR}/{PREDICT_CONFIG_KEY}"
MINDIE_CONFIG_KEY = "config.json"
MINDIE_HOME = "/usr/local/Ascend/mindie/latest/mindie-service"
MINDIE_CONFIG_PATH = f"{MINDIE_HOME}/conf/config.json"
MINDIE_DAEMON = f"{MINDIE_HOME}/bin/mindieservice_daemon"
# The TeleChatFinetune's output volume, mounted read-only into the serving pods of a fromFinetune inference.
FINETUNE_OUTPUT_VOLUME = "telechat-finetune-output"
# Volume names the operator adds to every serving pod; spec.volumes may not use them.
RESERVED_VOLUME_NAMES = (
    c.CONFIG_VOLUME,
    FINETUNE_OUTPUT_VOLUME,
    c.SHM_VOLUME,
    *(name for name, _, _ in c.ASCEND_DRIVER_MOUNTS),
)

# --- Serving -------------------------------------------------------------------------------------------------
DEFAULT_PORT = 1025
HEALTH_LIVE_PATH = "/v2/health/live"
HEALTH_READY_PATH = "/v2/health/ready"
# A model takes minutes to load: the startup probe allows this long before liveness starts counting.
STARTUP_TIMEOUT_SECONDS = 1800
PROBE_PERIOD_SECONDS = 10
# Multi-node groups: msrun's scheduler port on the leader.
GROUP_MASTER_PORT = c.DEFAULT_MASTER_PORT
GROUP_CLUSTER_TIMEOUT = c.DEFAULT_CLUSTER_TIMEOUT
GROUP_LOG_DIR = "/tmp/msrun_log"
# Prompt budget when spec.maxInputTokenLen is omitted: this fraction of maxSeqLen.
DEFAULT_INPUT_FRACTION = 0.75
# Paged-attention KV cache: block size (the seed's advice: keep 16) and a floor on the block count.
KV_BLOCK_SIZE = 16
# spec.maxBatchSize: requests decoded together per replica (the CRD's maximum says the same). Left out, `telechat2
# serve` keeps its own default (8) and MindIE's config.json keeps MINDIE_MAX_BATCH_SIZE.
MAX_BATCH_SIZE = 1024
MINDIE_MAX_BATCH_SIZE = 200

# --- Environment ---------------------------------------------------------------------------------------------
ENV_API_KEY = "TELECHAT_API_KEY"
ENV_INFERENCE_NAME = "TELECHAT_INFERENCE_NAME"
ENV_GROUP_INDEX = "TELECHAT_GROUP_INDEX"
ENV_GROUP_SIZE = "TELECHAT_GROUP_SIZE"
ENV_MINDIE_CONFIG = "MIES_CONFIG_JSON_PATH"
# Names a user may not set in spec.env (the CRD's CEL rule lists the same).
INFERENCE_RESERVED_ENV_NAMES = (
    ENV_API_KEY,
    ENV_INFERENCE_NAME,
    ENV_GROUP_INDEX,
    ENV_GROUP_SIZE,
    *c.RESERVED_ENV_NAMES,
)

# --- Naming --------------------------------------------------------------------------------------------------
# Group pod host names are `<name>-g<group>-<rank>`: with <= 1024 groups and <= 64 ranks a 40-character name
# leaves room (40 + 2 + 4 + 1 + 2 = 49 <= 63); the CRD's CEL rule enforces the same 40.
MAX_INFERENCE_NAME = 40

# --- Conditions and reasons ----------------------------------------------------------------------------------
COND_AVAILABLE = "Available"
COND_PROGRESSING = "Progressing"
COND_READY = "Ready"
INFERENCE_CONDITION_TYPES = (COND_AVAILABLE, COND_PROGRESSING, COND_READY)

REASON_WAITING_FOR_FINETUNE = "WaitingForFinetune"
REASON_FINETUNE_FAILED = "FinetuneFailed"
# spec.checkpoint.fromFinetune names a finetune of another model (size): its weights cannot load into spec.model.
REASON_MODEL_MISMATCH = "ModelMismatch"
REASON_INVALID_SPEC = c.REASON_INVALID_SPEC
REASON_CREATING = "Creating"
REASON_ROLLING = "RollingUpdate"
REASON_SCALING = "Scaling"
REASON_RECREATING_GROUP = "RecreatingGroup"
# The Deployment's ReplicaSet cannot create pods (admission refused them: a missing PriorityClass, a quota).
REASON_REPLICA_FAILURE = "ReplicaFailure"
# Multi-node groups that keep failing: recreated with exponential backoff, like the finetune's restarts.
REASON_GROUP_BACKOFF = "CrashLoopBackOff"
REASON_ROLLOUT_COMPLETE = "RolloutComplete"
REASON_ALL_READY = "AllReplicasReady"
REASON_NOT_READY = "ReplicasNotReady"
REASON_SCALED_TO_ZERO = "ScaledToZero"
REASON_MIN_AVAILABLE = "MinimumReplicasAvailable"
REASON_NONE_AVAILABLE = "NoReplicasAvailable"
