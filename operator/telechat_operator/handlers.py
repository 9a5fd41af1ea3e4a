"""The kopf handler modules, one per custom resource kind; importing a module registers its handlers."""

from __future__ import annotations

import importlib

# Kind modules the operator loads at start.
HANDLER_MODULES = ("telechat_operator.finetune.handlers", "telechat_operator.inference.handlers")


def register_all() -> None:
    for module in HANDLER_MODULES:
        importlib.import_module(module)
