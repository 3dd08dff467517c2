"""The interface model: the packaged introspection XML, parsed once with dbus_fast.introspection.

One model gives both the Introspect replies and the signatures the dispatcher checks, so
the XML files are the single source of truth. The files are kept in the form `node_xml`
writes (ElementTree's order and two-space indentation), so an Introspect reply carries each
interface exactly as shipped (tests/test_dispatch.py compares them).
"""
from __future__ import annotations

import functools
import importlib.resources
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from dbus_fast.introspection import Interface, Method, Node

from secretbus.bus.names import CONNECT_IFACE, SECRET_IFACE

DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
           ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')
FILES = {CONNECT_IFACE: "org.libvirt.Connect.xml", SECRET_IFACE: "org.libvirt.Secret.xml"}

# Introspectable, Peer, Properties, ObjectManager as dbus-fast defines them.
STANDARD: dict[str, Interface] = {i.name: i for i in Node.default().interfaces}


def file_text(iface: str) -> str:
    return importlib.resources.files("secretbus.bus").joinpath(f"interfaces/{FILES[iface]}").read_text()


def packaged(iface: str) -> Interface:
    """The interface `iface` from its packaged XML file."""
    (found,) = [i for i in Node.parse(file_text(iface)).interfaces if i.name == iface]
    return found


def in_signature(m: Method) -> str:
    return "".join(str(a.signature) for a in m.in_args)


def out_signature(m: Method) -> str:
    return "".join(str(a.signature) for a in m.out_args)


def node_xml(interfaces: Sequence[Interface], children: Sequence[str] = ()) -> str:
    """An Introspect reply: the interfaces of one object and the names of its children."""
    return _node_xml(tuple(interfaces), tuple(children))


@functools.lru_cache(maxsize=32)     # the replies repeat: same objects, same children
def _node_xml(interfaces: tuple[Interface, ...], children: tuple[str, ...]) -> str:
    root = ET.Element("node")
    for iface in interfaces:
        root.append(iface.to_xml())
    for name in children:
        ET.SubElement(root, "node", {"name": name})
    ET.indent(root, "  ")
    return DOCTYPE + ET.tostring(root, encoding="unicode", short_empty_elements=True) + "\n"
