"""Bearer API keys from `ARTSERVE_API_KEYS` (comma-separated) and/or a mounted secret file
named by `ARTSERVE_API_KEYS_FILE` (one key per line). Compared in constant time; never
logged. No keys at all means an open server (development only)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from serve_app.errors import AuthenticationError


class ApiKeys:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ApiKeys:
        env = dict(os.environ) if env is None else env
        keys = [k.strip() for k in env.get("ARTSERVE_API_KEYS", "").split(",")]
        if env.get("ARTSERVE_API_KEYS_FILE"):
            keys += [line.strip() for line in Path(env["ARTSERVE_API_KEYS_FILE"]).read_text().splitlines()]
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        given = token.strip().encode()
        # Compare against every key, always: the time taken says nothing about which matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.")
