"""Fixture builders for the TeleChatInference unit tests: bodies as the apiserver returns them (CRD defaults in)."""

from __future__ import annotations

import copy
from typing import Any

from telechat_operator.inference.spec import InferenceSpec, ResolvedCheckpoint, parse_inference

# What the CRD's defaults fill in on a minimal manifest.
CRD_DEFAULTS: dict[str, Any] = {
    "replicas": 1,
    "nodesPerReplica": 1,
    "npuMemSize": 8,
    "warmUp": True,
    "port": 1025,
    "service": {"type": "ClusterIP"},
    "backend": "telechat2",
}


def inference_body(name: str = "tc7b", namespace: str = "serving", **spec: Any) -> dict[str, Any]:
    """A TeleChatInference body; keyword arguments override spec fields (None removes one)."""
    merged: dict[str, Any] = {
        **copy.deepcopy(CRD_DEFAULTS),
        "model": "telechat2-7b",
        "image": "registry.local/telechat2-runtime:0.1.0",
        "checkpoint": {"path": "/models/telechat2-7b/telechat2_7b.ckpt"},
    }
    for key, value in spec.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatInference",
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3},
        "spec": merged,
    }


def inference_spec(**spec: Any) -> InferenceSpec:
    return parse_inference(inference_body(**spec))


def path_checkpoint(path: str = "/models/telechat2-7b/telechat2_7b.ckpt") -> ResolvedCheckpoint:
    return ResolvedCheckpoint(path=path, vocab_file="/models/telechat2-7b/tokenizer.model")
