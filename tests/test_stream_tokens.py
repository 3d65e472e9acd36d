"""Stream tokens: bound to one job and one tenant, worthless after expiry or under another secret."""

from __future__ import annotations

import pytest

from handlers.stream_tokens import StreamTokens, stream_url

NOW = 1_800_000_000.0
TOKENS = StreamTokens(b"a-secret-of-enough-length", ttl_s=3600)


def test_a_token_opens_its_job_for_its_tenant_until_it_expires() -> None:
    """verify gives the tenant back for the job it was issued for, up to the expiry second."""
    token = TOKENS.issue("job-1", "alice", now=NOW)
    assert TOKENS.verify(token, "job-1", now=NOW) == "alice"
    assert TOKENS.verify(token, "job-1", now=NOW + 3599) == "alice"
    assert TOKENS.verify(token, "job-1", now=NOW + 3600) is None


def test_a_token_is_worthless_for_another_job_secret_or_tenant() -> None:
    """Another job id, another signing secret or an edited tenant part fails verification."""
    token = TOKENS.issue("job-1", "alice", now=NOW)
    assert TOKENS.verify(token, "job-2", now=NOW) is None
    assert StreamTokens(b"another-secret-entirely", 3600).verify(token, "job-1", now=NOW) is None
    bob = TOKENS.issue("job-1", "bob", now=NOW).split(".")[1]
    expires, _, signature = token.split(".")
    assert TOKENS.verify(f"{expires}.{bob}.{signature}", "job-1", now=NOW) is None
    later = str(int(expires) + 86_400)
    assert TOKENS.verify(f"{later}.{token.split('.', 1)[1]}", "job-1", now=NOW) is None


def test_only_the_token_as_issued_passes() -> None:
    """A token whose text differs from the issued one is refused, even where base64
    would decode both to the same bytes (the spare bits of a last character)."""
    token = TOKENS.issue("job-1", "alice", now=NOW)
    expires, tenant, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = alphabet[alphabet.index(signature[-1]) ^ 1]  # differs in a bit that carries nothing
    assert spare != signature[-1]
    for altered in (
        f"{expires}.{tenant}.{signature[:-1]}{spare}",
        f"0{expires}.{tenant}.{signature}",
        f"{expires}.{tenant}.{signature}=",
    ):
        assert TOKENS.verify(altered, "job-1", now=NOW) is None, altered


@pytest.mark.parametrize(
    "token",
    ["", "x", "1.2", "1.2.3.4", "abc.YWxpY2U.sig", "1" * 20 + ".YWxpY2U.c2ln", "1.!!!.???", "١٢.YQ.YQ"],
)
def test_malformed_tokens_are_refused_without_error(token: str) -> None:
    """Junk in the token parameter is refused (None), never an exception."""
    assert TOKENS.verify(token, "job-1", now=NOW) is None


def test_stream_url_carries_a_token_only_with_a_secret() -> None:
    """Without a secret the stream URL is the bare path; with one it carries a verifiable token."""
    assert stream_url(None, "job-1", "alice") == "/api/jobs/job-1/stream"
    url = stream_url(TOKENS, "job-1", "alice")
    assert url.startswith("/api/jobs/job-1/stream?token=")
    assert TOKENS.verify(url.split("token=", 1)[1], "job-1") == "alice"
