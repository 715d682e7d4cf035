import pytest

from serve_app.api.auth import ApiKeys
from serve_app.errors import AuthenticationError


def test_no_keys_means_open():
    keys = ApiKeys.from_env({})
    assert not keys
    keys.check(None)


def test_keys_from_env_and_file(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text("file-key\n\n")
    keys = ApiKeys.from_env({"ARTSERVE_API_KEYS": "a-key, b-key,", "ARTSERVE_API_KEYS_FILE": str(secret)})
    for good in ["Bearer a-key", "Bearer b-key", "bearer file-key", "Bearer  a-key "]:
        keys.check(good)


BAD_HEADERS = [None, "", "Bearer", "Bearer ", "Basic a-key", "a-key", "Bearer a-ke", "Bearer a-key2"]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_wrong_or_missing_key(header):
    keys = ApiKeys(["a-key"])
    with pytest.raises(AuthenticationError) as info:
        keys.check(header)
    assert info.value.status_code == 401 and "a-key" not in info.value.message
