"""`RpcConnection`: the synchronous `Connection` API over libvirt's RPC protocol.

The same methods and exceptions as the D-Bus client's connection (`secretbus.bus.client`),
so `secretbus.open()` and the CLI work the same over either front end. Like it, it is
thread-safe: every call runs as a coroutine of `AsyncRpcClient` on a private event loop
thread ("secretbus-rpc") with a bounded wait; event handlers run on a second thread
("secretbus-rpc-events"), so they may call the connection.

Events are registered once per event id per connection (as libvirt's remote driver does)
and fanned out to the local subscribers; the server already filters them by `getattr`.
The server owns every API rule (flags, value size, read-only, private values); only what
the wire cannot carry is refused here, with the error the server would give.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from secretbus.core import errors
from secretbus.core.api import Connection, EventHandler, LostHandler, Secret, event_filter, tell_lost
from secretbus.core.clientargs import flags_u32, xml_document
from secretbus.core.loopthread import CLOSED, LoopThread
from secretbus.core.model import EventId, Lifecycle, SecretEvent, UsageType
from secretbus.core.uuids import canonical_uuid, parse_uuid
from secretbus.driver.rules import check_value
from secretbus.rpc import protocol as P
from secretbus.rpc.client import DEFAULT_KEEPALIVE, AsyncRpcClient, KeepAlive, Lost
from secretbus.rpc.transport import Transport

if TYPE_CHECKING:
    from secretbus.rpc.sasl_client import SaslLogin

log = logging.getLogger("secretbus.rpc.client")

_EVENT_PROCS = {P.Proc.SECRET_EVENT_LIFECYCLE: EventId.LIFECYCLE,
                P.Proc.SECRET_EVENT_VALUE_CHANGED: EventId.VALUE_CHANGED}


def _wire_handle(uuid: str) -> dict[str, Any]:
    # The server resolves a handle by its UUID only (as libvirtd does): no usage needed.
    return {"uuid": uuidlib.UUID(uuid).bytes, "usageType": 0, "usageID": ""}


class RpcConnection(Connection):
    """A connection to a secret server over libvirt RPC (secretbusd, or libvirt's own daemons).

    Open it with `RpcConnection.open()` (or `secretbus.open()` with a URI that chooses RPC);
    close it with `close()` or a `with` block.
    """

    def __init__(self, uri: str, transport: Transport, *, timeout: float, readonly: bool):
        self.uri = uri
        self.transport = transport
        self.readonly = readonly
        self.timeout = float(timeout)
        self._loop = LoopThread(self.timeout, "secretbus-rpc", kind="RPC", peer="the RPC server")
        self._client: AsyncRpcClient | None = None
        self._sub_lock = threading.Lock()
        self._subs: dict[int, tuple[EventHandler, Any, tuple[EventId, ...]]] = {}
        self._sub_ids = itertools.count(1)
        self._callbacks: dict[EventId, int] = {}       # server callbackID per event id
        # Events, then a loss of the connection (after the events it delivered), then None: stop.
        self._events: queue.SimpleQueue[SecretEvent | Lost | None] = queue.SimpleQueue()
        self._lost_handlers: list[LostHandler] = []
        self._dispatcher: threading.Thread | None = None
        self._login: SaslLogin | None = None

    # -- opening and closing --------------------------------------------------------
    @classmethod
    def open(cls, uri: str, transport: Transport, *, name: str | None, readonly: bool = False,
             timeout: float = 25.0, keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
             login: SaslLogin | None = None) -> RpcConnection:
        """Connect through `transport` and CONNECT_OPEN `name` (e.g. "secret:///system");
        `readonly` asks for VIR_CONNECT_RO (the server's -ro socket is read-only anyway);
        `login`: SASL credentials, if the server asks (default: libvirt's auth file)."""
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise errors.InvalidArg("timeout must be a positive number of seconds")
        conn = cls(uri, transport, timeout=timeout, readonly=readonly)
        conn._login = login
        conn._loop.start()
        try:
            conn._loop.submit(conn._connect(name, keepalive), 2 * conn.timeout + 1)
        except BaseException:
            conn.close()
            raise
        return conn

    def _no_reply(self) -> errors.OperationFailed:
        return errors.OperationFailed(f"no reply from {self.transport.describe()} within {self.timeout:g} s")

    async def _connect(self, name: str | None, keepalive: KeepAlive | None) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                client = await AsyncRpcClient.connect(self.transport, on_event=self._on_event)
            client.on_lost = self._on_lost
            self._client = client
            async with asyncio.timeout(self.timeout):
                await client.open(name, readonly=self.readonly, keepalive=keepalive, sasl=self._login)
        except TimeoutError:
            raise self._no_reply() from None

    def close(self) -> None:
        """CONNECT_CLOSE, then stop both threads. Idempotent."""
        with self._sub_lock:
            if self._loop.closed:
                return
            self._loop.closed = True
            self._subs = {}
        client = self._client
        if client is not None:
            wait = min(self.timeout, 5.0)
            try:
                self._loop.finish(client.close(wait=wait), wait + 2)
            except Exception:  # noqa: BLE001 - closing is best-effort
                log.debug("RPC connection did not shut down cleanly", exc_info=True)
        self._events.put(None)
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(5)
        self._loop.stop()

    def __repr__(self) -> str:
        return f"<RpcConnection {self.uri} {self.transport.describe()} {'closed' if self._loop.closed else 'open'}>"

    # -- plumbing -------------------------------------------------------------------
    def call(self, proc: int, args: Any = None) -> Any:
        """One procedure (protocol.Proc), its decoded return value; for callers that need a
        libvirt call this class has no method for (GET_LIB_VERSION, SET_IDENTITY, …)."""
        return self._loop.submit(self._call(proc, args))

    async def _call(self, proc: int, args: Any) -> Any:
        client = self._client
        if client is None:
            raise errors.OperationFailed(CLOSED)
        try:
            async with asyncio.timeout(self.timeout):
                return await client.call(proc, args)
        except TimeoutError:
            raise self._no_reply() from None

    def _handle(self, wire: dict[str, Any]) -> Secret:
        return Secret(self, str(uuidlib.UUID(bytes=wire["uuid"])), wire["usageType"], wire["usageID"])

    # -- connection level -------------------------------------------------------------
    def define_xml(self, xml: str | bytes, flags: int = 0) -> Secret:
        doc = xml_document(xml, P.REMOTE_STRING_MAX)
        ret = self.call(P.Proc.SECRET_DEFINE_XML, {"xml": doc, "flags": flags_u32(flags)})
        return self._handle(ret["secret"])

    def lookup_by_uuid(self, uuid: str) -> Secret:
        ret = self.call(P.Proc.SECRET_LOOKUP_BY_UUID, {"uuid": uuidlib.UUID(canonical_uuid(uuid)).bytes})
        return self._handle(ret["secret"])

    def lookup_by_usage(self, usage_type: int, usage_id: str) -> Secret:
        if not isinstance(usage_id, str):
            raise errors.arg_check("usageID", "virSecretLookupByUsage", "must not be NULL")
        if isinstance(usage_type, bool) or not isinstance(usage_type, int) or not -(2 ** 31) <= usage_type < 2 ** 31:
            # An int the wire cannot carry names no usage type: the answer for a usage no secret has.
            raise errors.NoSecret(f"no secret with matching usage '{usage_id}'")
        ret = self.call(P.Proc.SECRET_LOOKUP_BY_USAGE, {"usageType": usage_type, "usageID": usage_id})
        return self._handle(ret["secret"])

    def list_secrets(self, flags: int = 0) -> list[Secret]:
        ret = self.call(P.Proc.CONNECT_LIST_ALL_SECRETS, {"need_results": 1, "flags": flags_u32(flags)})
        return [self._handle(s) for s in ret["secrets"]]

    # -- secret level -------------------------------------------------------------------
    def secret_xml_desc(self, uuid: str, flags: int = 0) -> str:
        handle = _wire_handle(canonical_uuid(uuid))
        ret = self.call(P.Proc.SECRET_GET_XML_DESC, {"secret": handle, "flags": flags_u32(flags)})
        return str(ret["xml"])

    def secret_get_value(self, uuid: str, flags: int = 0, *, internal_call: bool = False) -> bytes:
        if internal_call:    # over RPC a private value needs an elevated identity (SET_IDENTITY)
            raise errors.InvalidArg("internal_call is only available on embedded connections")
        handle = _wire_handle(canonical_uuid(uuid))
        ret = self.call(P.Proc.SECRET_GET_VALUE, {"secret": handle, "flags": flags_u32(flags)})
        return bytes(ret["value"])

    def secret_set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        args = {"secret": _wire_handle(canonical_uuid(uuid)), "value": check_value(value), "flags": flags_u32(flags)}
        self.call(P.Proc.SECRET_SET_VALUE, args)

    def secret_undefine(self, uuid: str) -> None:
        self.call(P.Proc.SECRET_UNDEFINE, {"secret": _wire_handle(canonical_uuid(uuid))})

    # -- events ---------------------------------------------------------------------------
    def subscribe(self, handler: EventHandler, event_id: int | None = None,
                  secret: Secret | str | None = None) -> int:
        if not callable(handler):
            raise errors.InvalidArg("handler must be callable")
        if isinstance(secret, str):
            secret = parse_uuid(secret) or secret
        wanted = event_filter(event_id, secret)
        ids = (EventId(event_id),) if event_id is not None else tuple(EventId)
        with self._sub_lock:
            if self._loop.closed:
                raise errors.OperationFailed(CLOSED)
            added: list[EventId] = []
            try:
                for eid in ids:
                    if eid not in self._callbacks:
                        ret = self.call(P.Proc.CONNECT_SECRET_EVENT_REGISTER_ANY, {"eventID": int(eid), "secret": None})
                        self._callbacks[eid] = ret["callbackID"]
                        added.append(eid)
            except BaseException:
                self._deregister(added)      # all or nothing: no registration without a subscriber
                raise
            self._start_dispatcher()
            sub_id = next(self._sub_ids)
            self._subs = {**self._subs, sub_id: (handler, wanted, ids)}
        return sub_id

    def unsubscribe(self, sub_id: int) -> None:
        with self._sub_lock:
            if sub_id not in self._subs:
                raise errors.InvalidArg(f"callback {sub_id} is not registered")
            subs = dict(self._subs)
            del subs[sub_id]
            self._subs = subs
            still = {eid for _, _, ids in subs.values() for eid in ids}
            self._deregister([e for e in self._callbacks if e not in still])

    def _deregister(self, eids: list[EventId]) -> None:
        """Drop the server's registrations of `eids` (under _sub_lock; failures are logged)."""
        for eid in eids:
            cb = self._callbacks.pop(eid)
            try:
                self.call(P.Proc.CONNECT_SECRET_EVENT_DEREGISTER_ANY, {"callbackID": cb})
            except errors.SecretError:
                log.debug("could not deregister RPC event callback %d", cb, exc_info=True)

    def _on_event(self, proc: int, msg: dict[str, Any]) -> None:
        """Loop thread: an event MESSAGE for one of this connection's callbacks."""
        eid = _EVENT_PROCS.get(proc)    # type: ignore[call-overload]
        if eid is None or self._callbacks.get(eid) != msg["callbackID"]:
            return
        wire = msg["secret"]
        try:
            ev = SecretEvent(eid, str(uuidlib.UUID(bytes=wire["uuid"])), UsageType(wire["usageType"]),
                             wire["usageID"],
                             lifecycle=Lifecycle(msg["event"]) if eid == EventId.LIFECYCLE else None,
                             detail=msg.get("detail", 0))
        except ValueError:
            log.warning("RPC server sent an event with an unknown usage type or lifecycle value")
            return
        self._events.put(ev)

    def is_alive(self) -> bool:
        client = self._client
        return not self._loop.closed and client is not None and not client.closed

    def on_lost(self, handler: LostHandler) -> None:
        with self._sub_lock:
            self._lost_handlers.append(handler)
            self._start_dispatcher()

    def _on_lost(self, reason: Lost, _why: str) -> None:
        """Loop thread: the server's side ended (not our close()); told after its events."""
        if not self._loop.closed:
            self._events.put(reason)

    def _start_dispatcher(self) -> None:
        """(under _sub_lock)"""
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="secretbus-rpc-events", daemon=True)
            self._dispatcher.start()

    def _dispatch(self) -> None:
        while True:
            ev = self._events.get()
            if ev is None:
                return
            if isinstance(ev, Lost):
                tell_lost(self._lost_handlers, ev.value)
                continue
            for handler, wanted, _ in self._subs.values():
                if not wanted(ev):
                    continue
                try:
                    handler(Secret(self, ev.uuid, ev.usage_type, ev.usage_id), ev)
                except Exception:  # noqa: BLE001 - a handler's bug is logged, never propagated
                    log.exception("secret event handler failed")
