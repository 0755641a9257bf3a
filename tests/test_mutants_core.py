"""Tests that kill mutants ``make mutate`` found surviving in ``app/security.py`` and
``app/group_commit.py`` (docs/mutants.md). Pure functions are tested directly; group commit
runs against a real migrated SQLite database.
"""

from __future__ import annotations

import uuid

from app.security import callback_url, token_matches, webhook_token

SECRET = b"test-secret"
VIDEO = uuid.UUID(int=1)
# Callback URLs handed to hiapi before a deploy must still match after it, on every replica:
# the token's derivation is fixed (HMAC-SHA256 of "hiapi-callback:" + the id's 16 bytes).
KNOWN_TOKEN = "15fdb77274e19a3c9eb95d9d494e2af4dd5e3fcb"


def test_the_token_of_a_known_video_never_changes():
    assert webhook_token(SECRET, VIDEO) == KNOWN_TOKEN
    assert callback_url("http://127.0.0.1:8000", SECRET, VIDEO) == (
        f"http://127.0.0.1:8000/webhooks/hiapi/{VIDEO}/{KNOWN_TOKEN}"
    )


def test_a_token_that_is_not_ascii_is_refused_not_an_error():
    assert token_matches(SECRET, VIDEO, KNOWN_TOKEN) is True
    assert token_matches(SECRET, VIDEO, "é" * 40) is False
    assert token_matches(SECRET, VIDEO, KNOWN_TOKEN[:-1] + "é") is False
