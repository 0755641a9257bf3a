"""``app.auth.ApiKeys``: the key parser (``API_KEYS`` and ``API_KEYS_FILE``) and the Bearer check.

Written to kill the mutants ``make mutate`` found surviving in ``app/auth.py`` (docs/mutants.md):
pure functions, tested directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.auth import OPEN_OWNER, ApiKeys, ApiKeysError

KEY_A = "a" * 16
KEY_B = "b-0123456789abcdef"


def test_no_keys_is_open_and_every_caller_is_the_open_owner():
    keys = ApiKeys.load("", None)
    assert keys.open is True
    assert keys.names == []
    assert keys.identify(None) == OPEN_OWNER == ""
    assert keys.identify("Bearer anything") == ""


def test_named_pairs_and_bare_keys_from_the_setting():
    keys = ApiKeys.load(f" alice:{KEY_A} , ,{KEY_B}", None)
    assert keys.open is False
    # A bare key is named after its position in the list (empty entries do not count).
    assert keys.names == ["alice", "key2"]
    assert keys.identify(f"Bearer {KEY_A}") == "alice"
    assert keys.identify(f"Bearer {KEY_B}") == "key2"


@pytest.mark.parametrize("sep", [":", " ", "\t"])
def test_each_separator_splits_name_from_key(sep: str):
    keys = ApiKeys.load(f"ops{sep}{KEY_A}", None)
    assert keys.names == ["ops"]
    assert keys.identify(f"Bearer {KEY_A}") == "ops"


def test_separator_with_empty_side_is_a_bare_key():
    # ":key" has no name: the whole entry is the key, named by position.
    keys = ApiKeys.load(f":{KEY_A}", None)
    assert keys.names == ["key1"]
    assert keys.identify(f"Bearer :{KEY_A}") == "key1"


def test_only_the_first_separator_splits():
    keys = ApiKeys.load(f"svc:{KEY_A}:tail", None)
    assert keys.identify(f"Bearer {KEY_A}:tail") == "svc"


def test_file_lines_comments_and_blank_lines(tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text(f"# operators\n\nalice {KEY_A}\n   # indented comment\n  bob:{KEY_B}  \n")
    keys = ApiKeys.load(f"carol:{'c' * 16}", path)
    # The setting's entries come first, then the file's.
    assert keys.names == ["carol", "alice", "bob"]
    assert keys.identify(f"Bearer {KEY_B}") == "bob"


def test_unreadable_file_is_a_config_error_naming_the_setting(tmp_path: Path):
    with pytest.raises(ApiKeysError, match=r"^API_KEYS_FILE cannot be read: No such file"):
        ApiKeys.load("", tmp_path / "missing")


def test_short_key_is_refused_sixteen_is_enough():
    with pytest.raises(ApiKeysError, match=r"^API key 'x' is shorter than 16 characters$"):
        ApiKeys.load("x:" + "k" * 15, None)
    assert ApiKeys.load("x:" + "k" * 16, None).names == ["x"]


def test_a_name_used_twice_is_refused():
    with pytest.raises(ApiKeysError, match=r"^API key name 'x' is used twice$"):
        ApiKeys.load(f"x:{KEY_A},x:{KEY_B}", None)


@pytest.mark.parametrize(
    "header",
    [None, "", KEY_A, f"Basic {KEY_A}", f"Bearer{KEY_A}", f"Bearer {KEY_B}", "Bearer "],
)
def test_anything_but_a_valid_bearer_is_nobody(header: str | None):
    keys = ApiKeys.load(f"alice:{KEY_A}", None)
    assert keys.identify(header) is None


def test_bearer_scheme_is_case_insensitive_and_key_is_stripped():
    keys = ApiKeys.load(f"alice:{KEY_A},bob:{KEY_B}", None)
    assert keys.identify(f"bearer {KEY_A}") == "alice"
    assert keys.identify(f"BEARER   {KEY_B}  ") == "bob"


def test_the_last_key_is_found_too():
    keys = ApiKeys.load(f"alice:{KEY_A},bob:{KEY_B}", None)
    assert keys.identify(f"Bearer {KEY_B}") == "bob"
    assert keys.identify(f"Bearer {KEY_A}") == "alice"
