"""Which authentication a unix peer gets under auth_unix_rw / auth_unix_ro (pure logic: the
session the server builds for a peer; the end-to-end tests are in test_remote_scram_unix.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from secretbus.rpc.server import RpcServer, socket_plan
from secretbus.rpc.serverconf import parse_serverconf
from secretbus.rpc.session import Peer

ROOT, USER = Peer(10, 0, 0, 1), Peer(11, 1000, 1000, 1)


def session_for(tmp: Path, text: str, *, system: bool, peer: Peer, readonly: bool = False):
    conf = parse_serverconf(text)
    server = RpcServer(None, system=system, plan=socket_plan(system, str(tmp)), conf=conf)  # type: ignore[arg-type]
    trusted = peer.uid == 0 if system else peer.uid == os.geteuid()
    return server._unix_session(peer, readonly, trusted)


@pytest.mark.parametrize("text,peer,readonly,authenticated,sasl", [
    ("", ROOT, False, True, False),                                   # polkit: root bypasses it
    ("", USER, False, False, False),                                  # ... others AUTH_POLKIT
    ('auth_unix_rw = "none"', USER, False, True, False),              # none: served (calls still checked)
    ('auth_unix_rw = "sasl"', ROOT, False, False, True),              # sasl: root too
    ('auth_unix_rw = "sasl"', USER, False, False, True),
    ('auth_unix_rw = "sasl"', USER, True, False, False),              # the ro socket has its own key
    ('auth_unix_ro = "sasl"', USER, True, False, True),
    ('auth_unix_ro = "none"', USER, True, True, False),
])
def test_system_instance_modes(tmp_path, text, peer, readonly, authenticated, sasl):
    s = session_for(tmp_path, text, system=True, peer=peer, readonly=readonly)
    assert (s.authenticated, s.sasl is not None, s.socket_readonly) == (authenticated, sasl, readonly)


@pytest.mark.parametrize("text", ["", 'auth_unix_rw = "none"', 'auth_unix_rw = "sasl"'])
def test_the_session_instance_never_serves_another_user(tmp_path, text):
    other = Peer(12, os.geteuid() + 1, 0, 1)
    s = session_for(tmp_path, text, system=False, peer=other)
    assert not s.authenticated and s.sasl is None          # AUTH_POLKIT refuses them there


def test_session_instance_own_user(tmp_path):
    me = Peer(13, os.geteuid(), 0, 1)
    assert session_for(tmp_path, "", system=False, peer=me).authenticated
    s = session_for(tmp_path, 'auth_unix_rw = "sasl"', system=False, peer=me)
    assert not s.authenticated and s.sasl is not None


def test_the_verifier_store_is_the_configured_one(tmp_path):
    s = session_for(tmp_path, f'auth_unix_rw = "sasl"\nsasl_verifier_file = "{tmp_path}/v.json"',
                    system=True, peer=USER)
    assert s.sasl is not None and s.sasl.store.path == tmp_path / "v.json"
