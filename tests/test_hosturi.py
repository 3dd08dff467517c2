"""The host part of secret+tls:// and secret+tcp:// URIs: a password given in one is never echoed."""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from secretbus.core import errors
from secretbus.rpc.hosturi import host_endpoint

PASSWORD = "hunter2-not-shown"


@pytest.mark.parametrize("uri", [
    f"secret+tls://fred:{PASSWORD}@/system",             # no host: the host message shows the URI
    f"secret+tls://fred:{PASSWORD}@example.test:99999/system",   # bad port: so does that one
    f"secret+tcp://fred:{PASSWORD}@example.test/nowhere",
    f"secret+tcp://:{PASSWORD}@example.test/system",
])
def test_a_password_in_the_uri_is_refused_and_never_shown(uri):
    with pytest.raises(errors.InvalidArg, match="user name has no meaning") as e:
        host_endpoint(uri, urlsplit(uri), "TLS", 16514, "secret+tls")
    assert PASSWORD not in str(e.value)


def test_host_port_and_path_checks():
    u = "secret+tls://example.test/system"
    assert host_endpoint(u, urlsplit(u), "TLS", 16514, "secret+tls") == ("example.test", 16514)
    u = "secret+tcp://example.test:1234/session"
    assert host_endpoint(u, urlsplit(u), "TCP", 16509, "secret+tcp") == ("example.test", 1234)
    for bad, err in (("secret+tls:///system", errors.InvalidArg), ("secret+tls://h:x/system", errors.InvalidArg),
                     ("secret+tls://h/other", errors.InternalError)):
        with pytest.raises(err):
            host_endpoint(bad, urlsplit(bad), "TLS", 16514, "secret+tls")
