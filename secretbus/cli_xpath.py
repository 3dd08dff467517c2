"""`secret-dumpxml --xpath E [--wrap]` as virsh prints it (libxml2's node dump).

Only a node set is a result: elements print re-indented, attributes as ` name="value"`,
text nodes as their escaped text, one per line; `--wrap` puts them all in one `<nodes>`
element. Any other result type (string(), count(), ...) is virsh's "Incorrect xpath".
"""
from __future__ import annotations

import copy
from typing import Any
from xml.sax.saxutils import escape

from lxml import etree

# libxml2's escapes inside a double-quoted attribute value
_ATTR_ENTITIES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


class XPathFailure(Exception):
    """The expression cannot be used; the message is the error line to print."""


def _nodes(xml: str, expr: str) -> list:
    # The document is the service's own canonical output, never user input.
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    root = etree.fromstring(xml.encode("utf-8"), parser)
    try:
        res = root.xpath(expr)
    except etree.XPathError as e:
        raise XPathFailure(f"XPath error : {e} in '{expr}'") from None
    if not isinstance(res, list):
        raise XPathFailure(f"internal error: Incorrect xpath '{expr}'")
    return res


def _dump(node: Any) -> str:
    if isinstance(node, etree._Element):
        return etree.tostring(node, encoding="unicode", pretty_print=True, with_tail=False).rstrip("\n")
    if getattr(node, "is_attribute", False):
        return f' {node.attrname}="{escape(str(node), _ATTR_ENTITIES)}"'
    return escape(str(node))


def _wrapped(nodes: list) -> str:
    top = etree.Element("nodes")
    for n in nodes:
        if isinstance(n, etree._Element):
            child = copy.deepcopy(n)
            child.tail = None
            top.append(child)
        elif getattr(n, "is_attribute", False):
            top.set(n.attrname, str(n))
        elif len(top):
            top[-1].tail = (top[-1].tail or "") + str(n)
        else:
            top.text = (top.text or "") + str(n)
    return etree.tostring(top, encoding="unicode", pretty_print=True)


def select(xml: str, expr: str, wrap: bool) -> str:
    nodes = _nodes(xml, expr)
    if wrap:
        return _wrapped(nodes)
    return "".join(_dump(n) + "\n" for n in nodes)
