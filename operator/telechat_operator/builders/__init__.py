"""Pure builders: a resolved spec in, Kubernetes object dicts out. No API client is imported here."""
