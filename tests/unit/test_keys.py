from manager import keys


def test_issued_key_shape_and_hash() -> None:
    k = keys.issue()
    prefix, key_id, secret = k.secret_key.split("_", 2)
    assert prefix == "gtm" and key_id == k.id and len(secret) >= 40
    assert k.hash == keys.hash_key(k.secret_key) and k.secret_key not in k.hash
    assert keys.matches(k.secret_key, k.hash)
    assert not keys.matches(k.secret_key + "x", k.hash)


def test_key_id_parsing() -> None:
    assert keys.key_id("gtm_abcd1234_se_cr_et") == "abcd1234"
    assert keys.key_id("sk-openai-style") is None
    assert keys.key_id("gtm__x") is None


def test_keys_are_unique() -> None:
    assert len({keys.issue().secret_key for _ in range(200)}) == 200
