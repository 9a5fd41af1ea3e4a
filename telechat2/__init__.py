"""TeleChat2 on MindSpore: model, configs, data, conversion, training, inference and the pod entrypoint.

Importing this package, or reading its configs (`telechat2.configs`), never imports MindSpore: the operator
uses the configs without carrying the framework.
"""

__version__ = "0.1.0"
