"""A generic object dispatcher on dbus-fast's message-handler hook.

Messages are routed without exporting one dbus-fast ServiceInterface per object: objects
are *types* found from the path (10,000 secrets cost a dict lookup, not 10,000 objects).
Each type lists its interfaces as dbus_fast.introspection models; the same models answer
Introspect and give the signature every call is checked against. What a method does is
the `invoke` callback's business: this module knows nothing of secrets.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from dbus_fast import Message, MessageType
from dbus_fast.introspection import Interface

from secretbus.bus.introspection import in_signature, out_signature
from secretbus.bus.names import (
    INTROSPECT_IFACE,
    INVALID_ARGS,
    PEER_IFACE,
    UNKNOWN_METHOD,
    UNKNOWN_OBJECT,
)


class Declared(Protocol):
    """What a handler declares about the method it implements."""

    @property
    def iface(self) -> str: ...
    @property
    def member(self) -> str: ...
    @property
    def signature(self) -> str: ...


H = TypeVar("H", bound=Declared)


@dataclass(frozen=True)
class Entry(Generic[H]):
    """One callable method of an object type: its handler and the model's signatures."""

    handler: H
    in_sig: str
    out_sig: str


@dataclass
class ObjectType(Generic[H]):
    """A kind of object: its interfaces (standard ones included) and its method handlers.

    `introspect(path)` gives the child node names of the object at `path`, or None when no
    such object exists right now. `well_formed(path)` tells an unknown method on a real
    kind of object from a path that names no object at all.
    """

    interfaces: list[Interface]
    entries: dict[tuple[str, str], Entry[H]] = field(default_factory=dict)
    introspect: Callable[[str], list[str] | None] = lambda path: []
    well_formed: Callable[[str], bool] = lambda path: True
    _by_member: dict[str, Entry[H]] = field(default_factory=dict)

    @classmethod
    def build(cls, interfaces: Iterable[Interface], handlers: Iterable[H], **kw) -> ObjectType[H]:
        """Check each handler against the model; a handler the XML does not declare (or
        declares with another signature) is a programming error, found at start-up."""
        ifaces = list(interfaces)
        methods = {(i.name, m.name): m for i in ifaces for m in i.methods}
        obj = cls(ifaces, **kw)
        for h in handlers:
            m = methods.get((h.iface, h.member))
            if m is None:
                raise ValueError(f"{h.iface}.{h.member} is not in the interface XML")
            if in_signature(m) != h.signature:
                raise ValueError(f"{h.iface}.{h.member}: handler takes '{h.signature}', "
                                 f"the XML says '{in_signature(m)}'")
            entry = Entry(h, in_signature(m), out_signature(m))
            obj.entries[(h.iface, h.member)] = entry
            obj._by_member.setdefault(h.member, entry)   # calls that name no interface
        return obj

    def lookup(self, iface: str | None, member: str) -> Entry[H] | None:
        if iface is None:
            return self._by_member.get(member)
        return self.entries.get((iface, member))


Reply = Message | bool | None     # dbus-fast's handler protocol: reply, handled, not ours


def error(msg: Message, name: str, text: str) -> Message:
    return Message.new_error(msg, name, text)


class Dispatcher(Generic[H]):
    """Routes METHOD_CALLs: `locate(path)` names the object type (None: no object there);
    Introspect is answered here, Peer is left to dbus-fast, the rest goes to `invoke`
    once the object type, the method and the signature are known good."""

    def __init__(self, locate: Callable[[str], str | None], types: Mapping[str, ObjectType[H]],
                 invoke: Callable[[Message, Entry[H]], Reply],
                 render: Callable[[list[Interface], list[str]], str]):
        self._locate = locate
        self._types = types
        self._invoke = invoke
        self._render = render

    def on_message(self, msg: Message) -> Reply:
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        path, iface, member = msg.path or "", msg.interface, msg.member or ""
        kind = self._locate(path)
        if kind is None:
            if iface == PEER_IFACE:
                return None          # the library answers Ping / GetMachineId on any path
            return error(msg, UNKNOWN_OBJECT, f"no object at {path}")
        obj = self._types[kind]
        if iface == INTROSPECT_IFACE or (iface is None and member == "Introspect"):
            own = obj.lookup(INTROSPECT_IFACE, member)     # a type may answer it itself (access checks)
            if own is not None and msg.signature == own.in_sig:
                return self._invoke(msg, own)
            return self._introspect(msg, path, obj)
        if iface == PEER_IFACE:
            return None
        entry = obj.lookup(iface, member)
        if entry is None:
            return self._unknown(msg, path, obj)
        if msg.signature != entry.in_sig:
            return error(msg, INVALID_ARGS, f"{member} takes signature '{entry.in_sig}', not '{msg.signature}'")
        return self._invoke(msg, entry)

    def _introspect(self, msg: Message, path: str, obj: ObjectType[H]) -> Message:
        if msg.member != "Introspect":
            return error(msg, UNKNOWN_METHOD, f"{INTROSPECT_IFACE}.{msg.member} does not exist")
        if msg.signature != "":
            return error(msg, INVALID_ARGS, "Introspect takes no arguments")
        children = obj.introspect(path)
        if children is None:
            return error(msg, UNKNOWN_OBJECT, f"no object at {path}")
        return Message.new_method_return(msg, "s", [self._render(obj.interfaces, children)])

    @staticmethod
    def _unknown(msg: Message, path: str, obj: ObjectType[H]) -> Message:
        if not obj.entries:
            return error(msg, UNKNOWN_METHOD, f"{msg.interface}.{msg.member} does not exist at {path}")
        if not obj.well_formed(path):
            return error(msg, UNKNOWN_OBJECT, f"no object at {path}")
        return error(msg, UNKNOWN_METHOD,
                     f"{msg.interface}.{msg.member} with signature \"{msg.signature}\" could not be found")
