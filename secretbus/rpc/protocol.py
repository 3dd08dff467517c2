"""libvirt's remote protocol, the secret part, declared once as data (remote_protocol.x 9.0,
virnetprotocol.x, virkeepaliveprotocol.x; shared/research/libvirt-rpc.md §1–§2).

Procedure numbers are append-only upstream; the struct layouts below are the wire contract.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from secretbus.rpc.xdr import (
    DOUBLE,
    HYPER,
    INT,
    UHYPER,
    UINT,
    VOID,
    Array,
    CharArray,
    FixedOpaque,
    Opaque,
    Optional,
    String,
    Struct,
    Union,
    XdrType,
)

REMOTE_PROGRAM = 0x20008086
KEEPALIVE_PROGRAM = 0x6B656570
PROTOCOL_VERSION = 1

# Sizes (9.0; older trees had 16 MiB frames and 1 MiB strings).
MESSAGE_MAX = 33554432            # VIR_NET_MESSAGE_MAX: a frame, not counting the length word
HEADER_SIZE = 24                  # VIR_NET_MESSAGE_HEADER_MAX
REMOTE_STRING_MAX = 4194304
REMOTE_SECRET_VALUE_MAX = 65536
REMOTE_SECRET_LIST_MAX = 16384
REMOTE_AUTH_TYPE_LIST_MAX = 20
REMOTE_AUTH_SASL_DATA_MAX = 65536
REMOTE_CONNECT_IDENTITY_PARAMS_MAX = 20


class MsgType(enum.IntEnum):
    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5
    STREAM_HOLE = 6


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1
    CONTINUE = 2


class KeepAlive(enum.IntEnum):
    PING = 1
    PONG = 2


class AuthType(enum.IntEnum):
    NONE = 0
    SASL = 1
    POLKIT = 2


class Feature(enum.IntEnum):
    """VIR_DRV_FEATURE_* a client asks about (libvirt_internal.h); any other is answered 0."""

    FD_PASSING = 8                  # answered by libvirt's dispatcher (1) for every driver
    PROGRAM_KEEPALIVE = 10
    REMOTE_EVENT_CALLBACK = 14
    REMOTE_CLOSE_CALLBACK = 15


class Proc(enum.IntEnum):
    CONNECT_OPEN = 1
    CONNECT_CLOSE = 2
    CONNECT_GET_TYPE = 3
    CONNECT_GET_VERSION = 4
    CONNECT_GET_HOSTNAME = 59
    CONNECT_SUPPORTS_FEATURE = 60
    AUTH_LIST = 66
    AUTH_SASL_INIT = 67
    AUTH_SASL_START = 68
    AUTH_SASL_STEP = 69
    AUTH_POLKIT = 70
    CONNECT_GET_URI = 110
    CONNECT_NUM_OF_SECRETS = 139
    CONNECT_LIST_SECRETS = 140
    SECRET_LOOKUP_BY_UUID = 141
    SECRET_DEFINE_XML = 142
    SECRET_GET_XML_DESC = 143
    SECRET_SET_VALUE = 144
    SECRET_GET_VALUE = 145
    SECRET_UNDEFINE = 146
    SECRET_LOOKUP_BY_USAGE = 147
    CONNECT_IS_SECURE = 149
    CONNECT_GET_LIB_VERSION = 157
    CONNECT_LIST_ALL_SECRETS = 287
    CONNECT_REGISTER_CLOSE_CALLBACK = 360
    CONNECT_UNREGISTER_CLOSE_CALLBACK = 361
    CONNECT_SECRET_EVENT_REGISTER_ANY = 380
    CONNECT_SECRET_EVENT_DEREGISTER_ANY = 381
    SECRET_EVENT_LIFECYCLE = 382
    SECRET_EVENT_VALUE_CHANGED = 383
    CONNECT_SET_IDENTITY = 419


# -- common types -------------------------------------------------------------------
NONNULL_STRING = String(REMOTE_STRING_MAX)
REMOTE_STRING = Optional(NONNULL_STRING)
UUID = FixedOpaque(16)
NONNULL_SECRET = Struct("remote_nonnull_secret", ("uuid", UUID), ("usageType", INT), ("usageID", NONNULL_STRING))
REMOTE_SECRET = Optional(NONNULL_SECRET)
# remote_domain and remote_network appear in remote_error only, always absent here; their
# layouts are declared so that a client's error (or a capture) still decodes.
NONNULL_DOMAIN = Struct("remote_nonnull_domain", ("name", NONNULL_STRING), ("uuid", UUID), ("id", INT))
NONNULL_NETWORK = Struct("remote_nonnull_network", ("name", NONNULL_STRING), ("uuid", UUID))

REMOTE_ERROR = Struct(
    "remote_error",
    ("code", INT), ("domain", INT), ("message", REMOTE_STRING), ("level", INT),
    ("dom", Optional(NONNULL_DOMAIN)), ("str1", REMOTE_STRING), ("str2", REMOTE_STRING),
    ("str3", REMOTE_STRING), ("int1", INT), ("int2", INT), ("net", Optional(NONNULL_NETWORK)),
)

TYPED_PARAM_VALUE = Union("remote_typed_param_value", {
    1: INT, 2: UINT, 3: HYPER, 4: UHYPER, 5: DOUBLE, 6: INT, 7: NONNULL_STRING,
})
TYPED_PARAM = Struct("remote_typed_param", ("field", NONNULL_STRING), ("value", TYPED_PARAM_VALUE))


def _s(name: str, *fields: tuple[str, XdrType]) -> Struct:
    return Struct(name, *fields)


SASL_DATA = CharArray(REMOTE_AUTH_SASL_DATA_MAX)


@dataclass(frozen=True)
class ProcSpec:
    args: XdrType
    ret: XdrType


PROCS: dict[int, ProcSpec] = {
    Proc.AUTH_LIST: ProcSpec(VOID, _s("remote_auth_list_ret", ("types", Array(INT, REMOTE_AUTH_TYPE_LIST_MAX)))),
    Proc.AUTH_SASL_INIT: ProcSpec(VOID, _s("remote_auth_sasl_init_ret", ("mechlist", NONNULL_STRING))),
    Proc.AUTH_SASL_START: ProcSpec(
        _s("remote_auth_sasl_start_args", ("mech", NONNULL_STRING), ("nil", INT), ("data", SASL_DATA)),
        _s("remote_auth_sasl_start_ret", ("complete", INT), ("nil", INT), ("data", SASL_DATA))),
    Proc.AUTH_SASL_STEP: ProcSpec(
        _s("remote_auth_sasl_step_args", ("nil", INT), ("data", SASL_DATA)),
        _s("remote_auth_sasl_step_ret", ("complete", INT), ("nil", INT), ("data", SASL_DATA))),
    Proc.AUTH_POLKIT: ProcSpec(VOID, _s("remote_auth_polkit_ret", ("complete", INT))),
    Proc.CONNECT_OPEN: ProcSpec(_s("remote_connect_open_args", ("name", REMOTE_STRING), ("flags", UINT)), VOID),
    Proc.CONNECT_CLOSE: ProcSpec(VOID, VOID),
    Proc.CONNECT_GET_TYPE: ProcSpec(VOID, _s("remote_connect_get_type_ret", ("type", NONNULL_STRING))),
    Proc.CONNECT_GET_VERSION: ProcSpec(VOID, _s("remote_connect_get_version_ret", ("hv_ver", UHYPER))),
    Proc.CONNECT_GET_HOSTNAME: ProcSpec(VOID, _s("remote_connect_get_hostname_ret", ("hostname", NONNULL_STRING))),
    Proc.CONNECT_SUPPORTS_FEATURE: ProcSpec(_s("remote_connect_supports_feature_args", ("feature", INT)),
                                            _s("remote_connect_supports_feature_ret", ("supported", INT))),
    Proc.CONNECT_GET_URI: ProcSpec(VOID, _s("remote_connect_get_uri_ret", ("uri", NONNULL_STRING))),
    Proc.CONNECT_IS_SECURE: ProcSpec(VOID, _s("remote_connect_is_secure_ret", ("secure", INT))),
    Proc.CONNECT_GET_LIB_VERSION: ProcSpec(VOID, _s("remote_connect_get_lib_version_ret", ("lib_ver", UHYPER))),
    Proc.CONNECT_REGISTER_CLOSE_CALLBACK: ProcSpec(VOID, VOID),
    Proc.CONNECT_UNREGISTER_CLOSE_CALLBACK: ProcSpec(VOID, VOID),
    Proc.CONNECT_SET_IDENTITY: ProcSpec(
        _s("remote_connect_set_identity_args",
           ("params", Array(TYPED_PARAM, REMOTE_CONNECT_IDENTITY_PARAMS_MAX)), ("flags", UINT)), VOID),
    Proc.CONNECT_NUM_OF_SECRETS: ProcSpec(VOID, _s("remote_connect_num_of_secrets_ret", ("num", INT))),
    Proc.CONNECT_LIST_SECRETS: ProcSpec(
        _s("remote_connect_list_secrets_args", ("maxuuids", INT)),
        _s("remote_connect_list_secrets_ret", ("uuids", Array(NONNULL_STRING, REMOTE_SECRET_LIST_MAX)))),
    Proc.CONNECT_LIST_ALL_SECRETS: ProcSpec(
        _s("remote_connect_list_all_secrets_args", ("need_results", INT), ("flags", UINT)),
        _s("remote_connect_list_all_secrets_ret",
           ("secrets", Array(NONNULL_SECRET, REMOTE_SECRET_LIST_MAX)), ("ret", UINT))),
    Proc.SECRET_LOOKUP_BY_UUID: ProcSpec(_s("remote_secret_lookup_by_uuid_args", ("uuid", UUID)),
                                         _s("remote_secret_lookup_by_uuid_ret", ("secret", NONNULL_SECRET))),
    Proc.SECRET_LOOKUP_BY_USAGE: ProcSpec(
        _s("remote_secret_lookup_by_usage_args", ("usageType", INT), ("usageID", NONNULL_STRING)),
        _s("remote_secret_lookup_by_usage_ret", ("secret", NONNULL_SECRET))),
    Proc.SECRET_DEFINE_XML: ProcSpec(_s("remote_secret_define_xml_args", ("xml", NONNULL_STRING), ("flags", UINT)),
                                     _s("remote_secret_define_xml_ret", ("secret", NONNULL_SECRET))),
    Proc.SECRET_GET_XML_DESC: ProcSpec(
        _s("remote_secret_get_xml_desc_args", ("secret", NONNULL_SECRET), ("flags", UINT)),
        _s("remote_secret_get_xml_desc_ret", ("xml", NONNULL_STRING))),
    Proc.SECRET_SET_VALUE: ProcSpec(
        _s("remote_secret_set_value_args", ("secret", NONNULL_SECRET),
           ("value", Opaque(REMOTE_SECRET_VALUE_MAX)), ("flags", UINT)), VOID),
    Proc.SECRET_GET_VALUE: ProcSpec(
        _s("remote_secret_get_value_args", ("secret", NONNULL_SECRET), ("flags", UINT)),
        _s("remote_secret_get_value_ret", ("value", Opaque(REMOTE_SECRET_VALUE_MAX)))),
    Proc.SECRET_UNDEFINE: ProcSpec(_s("remote_secret_undefine_args", ("secret", NONNULL_SECRET)), VOID),
    Proc.CONNECT_SECRET_EVENT_REGISTER_ANY: ProcSpec(
        _s("remote_connect_secret_event_register_any_args", ("eventID", INT), ("secret", REMOTE_SECRET)),
        _s("remote_connect_secret_event_register_any_ret", ("callbackID", INT))),
    Proc.CONNECT_SECRET_EVENT_DEREGISTER_ANY: ProcSpec(
        _s("remote_connect_secret_event_deregister_any_args", ("callbackID", INT)), VOID),
}

# Messages the server sends (type MESSAGE).
LIFECYCLE_MSG = _s("remote_secret_event_lifecycle_msg", ("callbackID", INT), ("secret", NONNULL_SECRET),
                   ("event", INT), ("detail", INT))
VALUE_CHANGED_MSG = _s("remote_secret_event_value_changed_msg", ("callbackID", INT), ("secret", NONNULL_SECRET))
MESSAGES: dict[int, XdrType] = {
    Proc.SECRET_EVENT_LIFECYCLE: LIFECYCLE_MSG,
    Proc.SECRET_EVENT_VALUE_CHANGED: VALUE_CHANGED_MSG,
}

# libvirt's error domains (virerror.h) that this front end reports.
FROM_NONE = 0
FROM_XML = 5                    # virxml.c: the root element check, schema validation
FROM_RPC = 7
FROM_DOMAIN = 20                # libvirt-host.c's connection-level APIs report this one
FROM_SECRET = 30
FROM_ACCESS = 55
FROM_POLKIT = 60
ERR_LEVEL_ERROR = 2


def payload_type(prog: int, proc: int, msg_type: int, status: int) -> XdrType | None:
    """The XDR type of a frame's payload from its header; None when this module does not know it."""
    if msg_type == MsgType.REPLY and status == Status.ERROR:
        return REMOTE_ERROR         # any program's (virnetprotocol.x's virNetMessageError)
    if prog == KEEPALIVE_PROGRAM:
        return VOID
    if prog != REMOTE_PROGRAM:
        return None
    if msg_type == MsgType.MESSAGE:
        return MESSAGES.get(proc)
    spec = PROCS.get(proc)
    if spec is None:
        return None
    return spec.args if msg_type == MsgType.CALL else spec.ret if msg_type == MsgType.REPLY else None
