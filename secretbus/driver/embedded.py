"""The driver in the caller's own process (`secret:///embed?root=DIR`): the public API with no
bus and no daemon."""
from __future__ import annotations

from secretbus.core import errors
from secretbus.core.api import Connection, EventHandler, Secret, event_filter
from secretbus.core.model import SecretEvent
from secretbus.driver.driver import RewriteResult, SecretDriver


class EmbeddedConnection(Connection):
    def __init__(self, driver: SecretDriver, uri: str):
        self._driver: SecretDriver | None = driver
        self.uri = uri

    @property
    def driver(self) -> SecretDriver:
        if self._driver is None:
            raise errors.InvalidArg("the connection is closed")
        return self._driver

    def define_xml(self, xml: str, flags: int = 0) -> Secret:
        return Secret.from_def(self, self.driver.define_xml(xml, flags))

    def lookup_by_uuid(self, uuid: str) -> Secret:
        return Secret.from_def(self, self.driver.lookup_by_uuid(uuid))

    def lookup_by_usage(self, usage_type: int, usage_id: str) -> Secret:
        return Secret.from_def(self, self.driver.lookup_by_usage(usage_type, usage_id))

    def list_secrets(self, flags: int = 0) -> list[Secret]:
        return [Secret.from_def(self, d) for d in self.driver.list_secrets(flags)]

    def secret_xml_desc(self, uuid: str, flags: int = 0) -> str:
        return self.driver.get_xml_desc(uuid, flags)

    def secret_get_value(self, uuid: str, flags: int = 0, *, internal_call: bool = False) -> bytes:
        """`internal_call=True` is libvirt's VIR_SECRET_GET_VALUE_INTERNAL_CALL: the one
        way to read a private value, for a VM launcher that embeds the driver."""
        return self.driver.get_value(uuid, flags, internal_call=internal_call)

    def secret_set_value(self, uuid: str, value: bytes, flags: int = 0) -> None:
        self.driver.set_value(uuid, value, flags)

    def secret_undefine(self, uuid: str) -> None:
        self.driver.undefine(uuid)

    def subscribe(self, handler: EventHandler, event_id: int | None = None,
                  secret: Secret | str | None = None) -> int:
        wanted = event_filter(event_id, secret)

        def deliver(ev: SecretEvent) -> None:
            if wanted(ev):
                handler(Secret(self, ev.uuid, ev.usage_type, ev.usage_id), ev)
        return self.driver.subscribe(deliver)

    def unsubscribe(self, sub_id: int) -> None:
        self.driver.unsubscribe(sub_id)

    def rewrite_values(self) -> RewriteResult:
        return self.driver.rewrite_values()

    def is_alive(self) -> bool:
        return self._driver is not None

    def close(self) -> None:
        if self._driver is not None:
            self.driver.close()
            self._driver = None
