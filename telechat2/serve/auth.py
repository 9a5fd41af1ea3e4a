"""Optional bearer-token auth: the token comes from a file (a mounted Kubernetes Secret) or TELECHAT_API_KEY.

The file is re-read when its modification time changes, so rotating the Secret needs no restart (the kubelet
swaps the mounted file in place). Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

API_KEY_ENV = "TELECHAT_API_KEY"


class ApiKeySource:
    """Where the expected token lives; `check(header)` says whether an Authorization header carries it."""

    def __init__(self, token: str | None = None, path: str | os.PathLike[str] | None = None) -> None:
        if (token is None) == (path is None):
            raise ValueError("give exactly one of token or path")
        self.path = Path(path) if path is not None else None
        self._token = token
        self._mtime: float | None = None
        self.current()  # fail at startup, not on the first request

    @classmethod
    def from_args(cls, api_key_file: str | None, environ: dict[str, str] | None = None) -> ApiKeySource | None:
        """--api-key-file wins over TELECHAT_API_KEY; neither means auth is off."""
        environ = dict(os.environ) if environ is None else environ
        if api_key_file:
            return cls(path=api_key_file)
        token = environ.get(API_KEY_ENV, "").strip()
        return cls(token=token) if token else None

    def current(self) -> str:
        if self.path is None:
            assert self._token is not None
            return self._token
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            if self._token is not None:
                return self._token  # keep the last good token while a Secret update is in flight
            raise ValueError(f"--api-key-file: cannot read {self.path}: {exc.strerror}") from exc
        if mtime != self._mtime:
            token = self.path.read_text(encoding="utf-8").strip()
            if not token:
                if self._token is not None:
                    return self._token
                raise ValueError(f"--api-key-file: {self.path} is empty")
            self._token, self._mtime = token, mtime
        return self._token  # type: ignore[return-value]

    def check(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode(), self.current().encode())
