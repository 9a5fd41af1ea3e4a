"""What both kinds share: names and settings, spec parsing pieces, conditions, refusals, the launch contract.

Imports neither `finetune` nor `inference` (tests/unit/test_operator_layering.py holds it so)."""
