"""Deployment addresses are parsed by fedtune itself (Flower's parser is internal)."""

import pytest

from fedtune.deploy.address import DeployError, check_address


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:9092", ("127.0.0.1", 9092)), ("[::1]:9093", ("::1", 9093)),
    ("superlink.lan:65535", ("superlink.lan", 65535)), (" host:1 ", ("host", 1)),
])
def test_good_addresses_parse(address, expected):
    assert check_address(address, "--superlink") == expected


@pytest.mark.parametrize("address", ["127.0.0.1:\u00b2", "::1:9092", "[::1]",
                                     "[127.0.0.1]:9092", "host:-1", "host:65536", "a b:1",
                                     "host:port", "", "[]:1"])
def test_bad_addresses_are_refused_with_the_flag(address):
    with pytest.raises(DeployError, match="^--superlink: "):
        check_address(address, "--superlink")
