"""kopf handlers, one module per custom resource kind; importing a module registers its handlers."""

from __future__ import annotations

import importlib

# Kind modules the operator loads at start (the inference kind adds its module here).
HANDLER_MODULES = ("telechat_operator.handlers.finetune", "telechat_operator.handlers.inference")  # inference: helper-5


def register_all() -> None:
    for module in HANDLER_MODULES:
        importlib.import_module(module)
