"""Secret XML: safe parsing of untrusted documents and byte-exact libvirt formatting.

Parsing follows libvirt's virSecretDefParse (spec §1.3) check by check, with its error
classes and texts. Values are read with the same XPath expressions libvirt uses, so
"the first <uuid>", "string value includes text of nested elements" and "an empty
string counts as absent" behave exactly as there.

Errors as libvirt reports them: a document that is not well-formed gives libxml2's first
fatal error as VIR_ERR_XML_DETAIL `(definition_of_secret):LINE: MESSAGE` (the file path
instead of the name for a stored file), a schema failure libxml2's Relax-NG messages one
per line after "Unable to validate doc against PATH".

Safety: lxml parser without entity resolution, DTD loading or network; any DOCTYPE or
entity reference is refused; documents above MAX_XML_BYTES are refused before
libxml2 sees them. libxml2's messages name markup (tag, attribute, entity and encoding
names) but never text or attribute values; libvirt's extra context line and caret, which
quote the document (a value file passed by mistake, say), are left out.

Deliberate differences from libvirt (all invisible for documents libvirt round-trips):
- The root must be exactly `secret` without a namespace (libvirt compares only the
  local name, and under a default namespace would then silently find no children).
  The error names such a root as the document writes it: 'x:secret' with xmlns:x='urn:x'.
- No context line and caret after a well-formedness error (above); only the first line of
  libxml2's message (libxml2 2.9 appends the undecodable bytes on a second one).
- DOCTYPE/DTD, entity references and documents over MAX_XML_BYTES are refused.
- A str is parsed as the UTF-8 text it is: an XML encoding declaration in it is ignored.
- A text carriage return is written as `&#13;` (libvirt writes it raw, and libxml2 then
  reads it back as a newline), so format(parse(x)) is a fixed point.
- Characters XML 1.0 cannot carry are dropped when formatting (libvirt drops most
  C0 controls the same way), and an empty description is omitted.
"""
from __future__ import annotations

import importlib.resources
import re
import threading
from collections.abc import Callable

from lxml import etree

from secretbus.core import errors, uuids
from secretbus.core.model import SecretDef, UsageType

MAX_XML_BYTES = 1024 * 1024
SCHEMA_RESOURCE = "schemas/secret.rng"
DOCUMENT_NAME = "(definition_of_secret)"   # libvirt's name for a document given as a string
# libvirt formats every message into a 1024-byte buffer (VIR_ERROR_MAX_LENGTH); libxml2's
# messages quote names, which may be as long as the document.
_MAX_MESSAGE = 1022

# libvirt's texts for a <usage> element whose id child is missing or empty.
_MISSING_USAGE_ID = {
    UsageType.VOLUME: "volume usage specified, but volume path is missing",
    UsageType.CEPH: "Ceph usage specified, but name is missing",
    UsageType.ISCSI: "iSCSI usage specified, but target is missing",
    UsageType.TLS: "TLS usage specified, but name is missing",
    UsageType.VTPM: "vTPM usage specified, but name is missing",
}


# ---------------------------------------------------------------------------
# safe parser


def _new_parser(*, override_utf8: bool = False) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True, strip_cdata=True,
        # str input was re-encoded as UTF-8, whatever its XML declaration says.
        encoding="utf-8" if override_utf8 else None,
    )


_parsers = threading.local()


def _parser(override_utf8: bool) -> etree.XMLParser:
    """One parser per thread and kind: lxml parsers must not be shared across threads,
    and making one costs a third of parsing a small document (start-up parses thousands)."""
    cache = getattr(_parsers, "by_kind", None)
    if cache is None:
        cache = _parsers.by_kind = {}
    p = cache.get(override_utf8)
    if p is None:
        p = cache[override_utf8] = _new_parser(override_utf8=override_utf8)
    return p


def _to_bytes(text: str | bytes, source: str) -> tuple[bytes, bool]:
    """Bytes for libxml2 and whether they came from a str (size-checked first)."""
    if isinstance(text, str):
        if len(text) > MAX_XML_BYTES:       # cheap early refusal: every char is >= 1 byte
            raise too_large()
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:          # lone surrogates cannot be XML
            raise errors.XMLError(f"failed to parse xml document '{source}': "
                                  "invalid character") from None
        from_str = True
    elif isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        from_str = False
    else:
        raise errors.InvalidArg("secret XML must be str or bytes")
    if len(data) > MAX_XML_BYTES:
        raise too_large()
    return data, from_str


def too_large() -> errors.SecretError:
    """The refusal of a document over MAX_XML_BYTES (the RPC front end gives it, too, for a
    define it reads past unbuffered)."""
    return errors.XMLError(f"secret XML document is larger than {MAX_XML_BYTES} bytes")


def _syntax_error(parser: etree.XMLParser, source: str) -> errors.SecretError:
    """libvirt's catchXMLError: the first fatal error of libxml2's log for this parse."""
    for entry in parser.error_log:
        if entry.level == etree.ErrorLevels.FATAL and entry.message:
            message = entry.message.strip().split("\n", 1)[0]
            return errors.XMLDetail(f"{source}:{entry.line}: {message}"[:_MAX_MESSAGE])
    return errors.XMLError(f"failed to parse xml document '{source}'")


def _parse_tree(data: bytes, from_str: bool, source: str) -> etree._Element:
    """Well-formedness (§1.3 step 1) plus the safety refusals; returns the root."""
    parser = _parser(from_str)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError:
        raise _syntax_error(parser, source) from None
    except (etree.LxmlError, ValueError, TypeError, UnicodeError):
        raise errors.XMLError(f"failed to parse xml document '{source}'") from None
    if root is None:
        raise errors.XMLError(f"failed to parse xml document '{source}'")
    docinfo = root.getroottree().docinfo
    # Entities can only be declared in a DTD, so refusing every DTD closes XXE,
    # parameter entities and expansion bombs regardless of libxml2's own limits.
    doctype = docinfo.doctype  # type: ignore[union-attr]  # lxml-stubs lack DocInfo.doctype
    if doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise errors.XMLError("DTD is not allowed in secret XML")
    if next(root.iter(etree.Entity), None) is not None:   # unreachable without a DTD; kept as a belt
        raise errors.XMLError("entity references are not allowed in secret XML")
    return root


# ---------------------------------------------------------------------------
# schema


_schema_lock = threading.Lock()
_schema: tuple[etree.RelaxNG, str] | None = None


def schema_path() -> str:
    """Where the packaged schema lives (used in the libvirt-style error text)."""
    return str(importlib.resources.files("secretbus.core").joinpath(SCHEMA_RESOURCE))


def _load_schema() -> tuple[etree.RelaxNG, str]:
    global _schema
    if _schema is None:
        resource = importlib.resources.files("secretbus.core").joinpath(SCHEMA_RESOURCE)
        try:
            doc = etree.fromstring(resource.read_bytes(), _new_parser())
            _schema = (etree.RelaxNG(doc), str(resource))
        except (OSError, etree.LxmlError) as exc:
            raise errors.InternalError(f"cannot load secret schema {resource}: "
                                       f"{type(exc).__name__}") from None
    return _schema


# From the first quote that opens a value (not an apostrophe inside a word) to the last
# quote: greedy, so a value that itself holds a quote is still redacted whole.
_QUOTED = re.compile(r"(?<![A-Za-z])'.*'", re.DOTALL)


def _schema_error_line(message: str) -> str:
    """One line of schema error detail as libvirt collects it (libxml2's text, newline-ended).

    The Relax-NG messages libvirt's schema produces name elements and attributes only; the
    few libxml2 messages that quote a value (datatype errors) get it redacted."""
    return _QUOTED.sub("'...'", message.strip()) + "\n"


def _validate(root: etree._Element) -> None:
    """§1.3 step 3. The lock also guards the validator's shared error log."""
    with _schema_lock:
        schema, path = _load_schema()
        if schema.validate(root):
            return
        detail = "".join(_schema_error_line(entry.message) for entry in schema.error_log)
    raise errors.XMLInvalidSchema(f"Unable to validate doc against {path}\n{detail}"[:_MAX_MESSAGE])


# ---------------------------------------------------------------------------
# parse


def _xpath(expr: str) -> Callable[[etree._Element], str | None]:
    """libvirt's virXPathString: string value of `expr`, with "" meaning absent."""
    compiled = etree.XPath(f"string({expr})", smart_strings=False)

    def get(node: etree._Element) -> str | None:
        value = compiled(node)
        return value if isinstance(value, str) and value else None
    return get


_EPHEMERAL = _xpath("./@ephemeral")
_PRIVATE = _xpath("./@private")
_UUID = _xpath("./uuid")
_DESCRIPTION = _xpath("./description")
_USAGE_TYPE = _xpath("./usage/@type")
_USAGE_ID = {u: _xpath(f"./usage/{u.child}") for u in UsageType if u.child}


def _yes_no(value: str | None, name: str) -> bool:
    if value is None or value == "no":
        return False
    if value == "yes":
        return True
    raise errors.XMLError(f"invalid value of '{name}'")


def _parse_uuid(root: etree._Element) -> str:
    text = _UUID(root)
    if text is None:
        return uuids.generate()
    canonical = uuids.parse_uuid(text)
    if canonical is None:
        raise errors.InternalError("malformed uuid element")
    return canonical


def _parse_usage(root: etree._Element) -> tuple[UsageType, str | None]:
    if root.find("usage") is None:
        return UsageType.NONE, None
    type_name = _USAGE_TYPE(root)
    if type_name is None:
        raise errors.XMLError("unknown secret usage type")
    usage = UsageType.from_xml_name(type_name)
    if usage is None:
        raise errors.ConfigUnsupported(f"unknown secret usage type {type_name}")
    if usage is UsageType.NONE:
        return usage, None
    usage_id = _USAGE_ID[usage](root)
    if usage_id is None:
        raise errors.InternalError(_MISSING_USAGE_ID[usage])
    return usage, usage_id


# Documents exactly in the canonical layout (what secretbus and libvirt write: every stored
# file) are read with one regular expression instead of libxml2, which halves start-up for
# large stores. Text may contain nothing that would need unescaping or that XML forbids, so
# the result is the one the full parser gives; anything else falls through to it.
_FAST_TEXT = rb"[^<>&\"'\r\x00-\x08\x0b\x0c\x0e-\x1f]+"
_FAST = re.compile(
    rb"<secret ephemeral='(yes|no)' private='(yes|no)'>\n"
    rb"  <uuid>([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})</uuid>\n"
    rb"(?:  <description>(" + _FAST_TEXT + rb")</description>\n)?"
    rb"(?:  <usage type='(volume|ceph|iscsi|tls|vtpm)'>\n"
    rb"    <(volume|name|target)>(" + _FAST_TEXT + rb")</\6>\n  </usage>\n)?"
    rb"</secret>\n")


def _parse_canonical(data: bytes) -> SecretDef | None:
    m = _FAST.fullmatch(data)
    if m is None:
        return None
    eph, priv, uuid, desc, utype, child, uid = m.groups()
    usage = UsageType.from_xml_name(utype.decode()) if utype else UsageType.NONE
    if usage is None or (utype and usage.child != child.decode()):
        return None
    try:
        description = desc.decode("utf-8") if desc is not None else None
        usage_id = uid.decode("utf-8") if uid is not None else None
    except UnicodeDecodeError:
        return None
    if any(t is not None and ("\ufffe" in t or "\uffff" in t) for t in (description, usage_id)):
        return None
    return SecretDef(uuid=uuid.decode(), ephemeral=eph == b"yes", private=priv == b"yes",
                     description=description, usage_type=usage, usage_id=usage_id)


def parse_secret_xml(text: str | bytes, *, validate: bool = False,
                     source: str | None = None) -> SecretDef:
    """Parse untrusted secret XML; every failure is a `errors.SecretError`."""
    name = source if source is not None else DOCUMENT_NAME
    data, from_str = _to_bytes(text, name)
    if not validate:
        fast = _parse_canonical(data)
        if fast is not None:
            return fast
    return _parse_full(data, from_str, name, validate)


def _wrong_root(root: etree._Element) -> errors.SecretError:
    """libvirt's text; a namespace is named as the document declares it, since a bare
    'secret' would be confusing."""
    qname = etree.QName(root)
    if qname.namespace is None:
        return errors.XMLRootError(f"expecting root element of 'secret', not '{qname.localname}'")
    written = f"{root.prefix}:{qname.localname}" if root.prefix else qname.localname
    xmlns = f"xmlns:{root.prefix}" if root.prefix else "xmlns"
    return errors.XMLRootError(f"expecting root element of 'secret', not '{written}' "
                               f"with {xmlns}='{qname.namespace}'")


def _parse_full(data: bytes, from_str: bool, name: str, validate: bool) -> SecretDef:
    root = _parse_tree(data, from_str, name)
    if root.tag != "secret":
        raise _wrong_root(root)
    if validate:
        _validate(root)
    ephemeral = _yes_no(_EPHEMERAL(root), "ephemeral")
    private = _yes_no(_PRIVATE(root), "private")
    uuid = _parse_uuid(root)
    description = _DESCRIPTION(root)
    usage_type, usage_id = _parse_usage(root)
    return SecretDef(uuid=uuid, ephemeral=ephemeral, private=private,
                     description=description, usage_type=usage_type, usage_id=usage_id)


# ---------------------------------------------------------------------------
# format


def _xml_char(c: str) -> bool:
    o = ord(c)
    return (o >= 0x20 and o <= 0xD7FF) or o in (0x9, 0xA, 0xD) or \
        (0xE000 <= o <= 0xFFFD) or o >= 0x10000


# libvirt's virBufferEscapeString table, plus \r (see module docstring).
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;",
            "\r": "&#13;"}


# Any character escape_text changes: one of _ESCAPES, or one _xml_char refuses. Most texts
# (paths, names) have none, and a search is ~20× cheaper than the loop over their characters.
_CHANGED = re.compile("[&<>\"'\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def escape_text(text: str) -> str:
    """Escape element text like libvirt; drop characters XML 1.0 cannot carry."""
    if _CHANGED.search(text) is None:
        return text
    return "".join(_ESCAPES.get(c, c) for c in text if _xml_char(c))


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def format_secret_xml(d: SecretDef) -> str:
    """libvirt's virSecretDefFormat output, byte for byte (spec §1.2)."""
    uuid = uuids.parse_uuid(d.uuid) if isinstance(d.uuid, str) else None
    if uuid is None:
        raise errors.InternalError("malformed uuid element")
    out = [f"<secret ephemeral='{_yn(d.ephemeral)}' private='{_yn(d.private)}'>\n",
           f"  <uuid>{uuid}</uuid>\n"]
    description = escape_text(d.description) if d.description else ""
    if description:
        out.append(f"  <description>{description}</description>\n")
    usage = UsageType(d.usage_type)
    if usage is not UsageType.NONE:
        usage_id = escape_text(d.usage_id) if d.usage_id else ""
        if not usage_id:   # would write a file that no parser accepts back
            raise errors.InternalError(_MISSING_USAGE_ID[usage])
        child = usage.child
        out.append(f"  <usage type='{usage.xml_name}'>\n"
                   f"    <{child}>{usage_id}</{child}>\n"
                   "  </usage>\n")
    out.append("</secret>\n")
    return "".join(out)
