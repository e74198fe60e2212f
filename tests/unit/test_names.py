import pytest

from manager import names
from manager.errors import InvalidInput
from manager.names import Role


def test_names_are_namespaced_by_instance_and_tenant() -> None:
    assert names.network("gtm", "companya") == "gtm-t-companya"
    assert names.volume("gtm", "companya") == "gtm-t-companya-data"
    assert names.engine("gtm", "companya") == "gtm-t-companya-engine"
    assert names.gateway("x", "a1") == "x-t-a1-gateway"


def test_labels_and_selector_agree() -> None:
    labels = names.labels("gtm", Role.ENGINE, "companya", spec_hash="abc")
    assert labels == {
        "org.gtm.managed": "true",
        "org.gtm.instance": "gtm",
        "org.gtm.role": "engine",
        "org.gtm.tenant": "companya",
        "org.gtm.spec-hash": "abc",
    }
    for item in names.selector("gtm", tenant="companya"):
        key, value = item.split("=")
        assert labels[key] == value


@pytest.mark.parametrize("name", ["companya", "team-7", "ab"])
def test_valid_names(name: str) -> None:
    assert names.validate_tenant_name(name) == name


@pytest.mark.parametrize("name", ["CompanyA", "a", "-x", "x-", "a_b", "1abc", "a" * 33, "a b"])
def test_invalid_names_say_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidInput, match="lowercase letters"):
        names.validate_tenant_name(name)
