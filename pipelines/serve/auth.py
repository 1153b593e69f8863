"""API keys of the OpenAI endpoint: load them as sha256 digests, check a request's Bearer key in constant time.

    digests = load_api_keys(cfg.auth)                       # file lines and/or a comma-separated env var
    authorize(request.headers.get("authorization"), digests) # raises ApiError(401) without a valid key

Keys never live in ServeConfig (only where to find them), are never logged or echoed back, not even
masked. Does not: rate-limit, or know HTTP frameworks (the caller passes the header's value).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from pipelines.errors import ConfigError
from pipelines.serve.config import AuthSettings
from pipelines.serve.protocol import ApiError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_api_keys(auth: AuthSettings) -> list[bytes]:
    """sha256 digests of the configured API keys (file lines and/or a comma-separated env var)."""
    keys: list[str] = []
    if auth.api_keys_file:
        p = Path(auth.api_keys_file)
        if not p.is_file():
            raise ConfigError(f"auth.api_keys_file {str(p)!r} does not exist; create it with one key per line "
                              "or unset auth.api_keys_file")
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    if auth.api_keys_env:
        keys.extend(k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",") if k.strip())
    if auth.require_keys and not keys:
        raise ConfigError(f"auth.require_keys is true but no API key was found (auth.api_keys_file="
                          f"{auth.api_keys_file!r}, environment variable {auth.api_keys_env!r})")
    return [_digest(k) for k in dict.fromkeys(keys)]


def key_matches(token: str, digests: list[bytes]) -> bool:
    """Constant-time check of a presented key against every configured digest (no early exit)."""
    d = _digest(token)
    ok = False
    for ref in digests:
        ok |= hmac.compare_digest(d, ref)
    return ok


def authorize(header: str | None, digests: list[bytes]) -> None:
    """Raise a 401 ApiError unless `header` (the Authorization header) carries a configured key
    (nothing to check when no key is configured)."""
    if not digests:
        return
    header = header or ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(token, digests):
        # never echo the presented key, not even masked
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})

