"""``API_KEYS_FILE`` lines as the README documents them: ``#`` starts a comment anywhere it
follows white space, and the first separator splits the name from the key."""

from __future__ import annotations

from pathlib import Path

from app.auth import ApiKeys

KEY_A = "a" * 20
KEY_B = "b" * 20


def test_a_comment_after_an_entry_is_not_part_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice {KEY_A}   # the web frontend\nbob:{KEY_B}\t# cron\n")
    keys = ApiKeys.load("", path)
    assert keys.names == ["alice", "bob"]
    assert keys.identify(f"Bearer {KEY_A}") == "alice"
    assert keys.identify(f"Bearer {KEY_B}") == "bob"


def test_a_hash_inside_a_key_is_part_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"carol {KEY_A}#x\n")
    keys = ApiKeys.load("", path)
    assert keys.identify(f"Bearer {KEY_A}#x") == "carol"
    assert keys.identify(f"Bearer {KEY_A}") is None


def test_a_space_separated_name_keeps_a_colon_in_its_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"dave {KEY_A}:{KEY_B}\n")
    keys = ApiKeys.load("", path)
    assert keys.names == ["dave"]
    assert keys.identify(f"Bearer {KEY_A}:{KEY_B}") == "dave"
