"""The one error type the tooling raises for faults a user must act on."""

from __future__ import annotations

from pathlib import Path


class ClusterError(RuntimeError):
    """A fault naming the component at fault and, when there is one, the log that explains it."""

    def __init__(self, component: str, problem: str, log_path: Path | None = None, details: str = "") -> None:
        self.component = component
        self.problem = problem
        self.log_path = log_path
        message = f"{component}: {problem}"
        if log_path is not None:
            message += f" (log: {log_path})"
        if details.strip():
            message += "\n" + "\n".join(f"    {line}" for line in details.strip().splitlines())
        super().__init__(message)
