"""Short-lived stream tokens (SPEC 7.4): what ``EventSource`` carries instead of a key.

A browser's ``EventSource`` cannot send headers, so the job's ``streamUrl`` carries
``?token=``: an HMAC-SHA256 over the job id, the tenant and an expiry time, signed
with ``STREAM_TOKEN_SECRET``. It opens that one job's stream for that tenant until it
expires (``STREAM_TOKEN_TTL_S``), and nothing else: no other job, no other route.

The token is ``<expiry>.<tenant, base64url>.<signature, base64url>``; the job id is
not in it, the URL's path supplies it, so a token moved to another job's URL fails.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

_DOMAIN = b"jobq-stream-token-v1"
"""Separates these signatures from any other use of the same secret."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class StreamTokens:
    """Issues and checks stream tokens with one secret."""

    secret: bytes
    ttl_s: int

    def _signature(self, job_id: str, tenant: str, expires: int) -> bytes:
        message = b"\n".join((_DOMAIN, job_id.encode(), tenant.encode(), str(expires).encode()))
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def _token(self, job_id: str, tenant: str, expires: int) -> str:
        signature = self._signature(job_id, tenant, expires)
        return f"{expires}.{_b64(tenant.encode())}.{_b64(signature)}"

    def issue(self, job_id: str, tenant: str, now: float | None = None) -> str:
        return self._token(job_id, tenant, int(now if now is not None else time.time()) + self.ttl_s)

    def verify(self, token: str, job_id: str, now: float | None = None) -> str | None:
        """The tenant the token was issued to, or ``None`` when it is forged, for
        another job, malformed or expired. Only the token exactly as issued passes:
        base64 leaves spare bits in a last character, so a token is compared as text,
        whole, with the one this job, tenant and expiry get, not by its decoded bytes."""
        parts = token.split(".")
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdecimal() and len(parts[0]) <= 12):
            return None
        expires = int(parts[0])
        try:
            tenant = _unb64(parts[1]).decode()
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(self._token(job_id, tenant, expires).encode(), token.encode()):
            return None
        if expires <= (now if now is not None else time.time()):
            return None
        return tenant


def stream_path(job_id: str) -> str:
    return f"/api/jobs/{job_id}/stream"


def stream_url(tokens: StreamTokens | None, job_id: str, tenant: str) -> str:
    """The job's stream URL, with a token when a secret is configured."""
    if tokens is None:
        return stream_path(job_id)
    return f"{stream_path(job_id)}?token={tokens.issue(job_id, tenant)}"
