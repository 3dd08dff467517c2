"""`secretbus [-c URI] <command>`: virsh's secret commands, same options and messages.

Values never reach argv of another process, a log or an error message: they go from
the input (file, terminal, stdin) to the connection and from the connection to stdout.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import os
import signal
import sys
import threading
import time
from pathlib import Path

from secretbus.core import errors
from secretbus.core.model import VALUE_MAX, EventId, Lifecycle, ListFlags, UsageType
from secretbus.store.codec import ValueFileError, strict_b64decode

DEFINE_FILE_LIMIT = 10 * 1024 * 1024   # virsh reads at most 10 MiB of XML


class CommandError(Exception):
    """A failure already phrased as virsh would print it (one or more lines)."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = lines


def _err(msg: str) -> None:
    sys.stderr.write(f"error: {msg}\n")


def _print(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")


# -- helpers -------------------------------------------------------------------------
def _lookup(conn, arg: str):
    try:
        return conn.lookup_by_uuid(arg)
    except errors.SecretError as e:
        raise CommandError(f"failed to get secret '{arg}'", errors.display(e)) from None


def _decode_b64(data: bytes) -> bytes:
    # Whitespace (wrapped lines from base64(1), a trailing newline) is fine; anything
    # else is refused, where virsh would silently skip it and store garbage.
    try:
        return strict_b64decode(b"".join(data.split()))
    except ValueFileError:
        raise CommandError("Failed to set secret value", "secret value is not valid base64") from None


def _safe_cell(text: str) -> str:
    """vsh tables print control characters as \\xNN so columns stay aligned."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """virsh's vshTable layout: ' cell' + padding to the column width + 2 spaces."""
    table = [[_safe_cell(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(r: list[str]) -> str:
        parts = []
        for i, cell in enumerate(r):
            parts.append(" " + cell)
            if i < len(r) - 1:
                parts.append(" " * (widths[i] - len(cell) + 2))
        return "".join(parts) + "\n"
    out = [line(table[0]), "-" * sum(w + 3 for w in widths) + "\n"]
    out += [line(r) for r in table[1:]]
    return "".join(out)


def _read_value_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(VALUE_MAX * 2 + 1)
    except OSError as e:
        raise CommandError(f"Failed to read '{path}': {e.strerror}") from None
    if len(data) > VALUE_MAX * 2:
        raise CommandError(f"file '{path}' is too large for a secret value")
    return data


def _read_interactive() -> bytes:
    if sys.stdin.isatty():
        text = getpass.getpass("Enter new value for secret:")
    else:
        # Scripted use: one line from stdin, never echoed anywhere.
        sys.stderr.write("Enter new value for secret:")
        sys.stderr.flush()
        text = sys.stdin.readline()
        sys.stderr.write("\n")
        if text.endswith("\n"):
            text = text[:-1]
    return text.encode("utf-8")


# -- commands ------------------------------------------------------------------------
def cmd_define(conn, a) -> int:
    try:
        size = os.path.getsize(a.file)
        if size > DEFINE_FILE_LIMIT:
            raise CommandError(f"Failed to read file '{a.file}' to buffer: file too large")
        with open(a.file, "rb") as f:
            xml = f.read()
    except OSError as e:
        raise CommandError(f"Failed to read file '{a.file}' to buffer: {e.strerror}") from None
    try:
        s = conn.define_xml(xml, 1 if a.validate else 0)
    except errors.SecretError as e:
        raise CommandError(f"Failed to set attributes from {a.file}", errors.display(e)) from None
    _print(f"Secret {s.uuid} created")
    _print()
    return 0


def cmd_dumpxml(conn, a) -> int:
    s = _lookup(conn, a.secret)
    xml = s.xml_desc()
    if a.xpath:
        xml = _xpath(xml, a.xpath, a.wrap)
    sys.stdout.write(xml)
    return 0


def _xpath(xml: str, expr: str, wrap: bool) -> str:
    from lxml import etree
    # The document is our own formatted output, so the default parser is safe here.
    doc = etree.fromstring(xml.encode())
    try:
        res = doc.xpath(expr)
    except etree.XPathError as e:
        raise CommandError(f"Failed to evaluate XPath '{expr}': {e}") from None
    if not isinstance(res, list):
        return f"{res}\n"
    parts = [etree.tostring(r, encoding="unicode").strip() if isinstance(r, etree._Element) else str(r)
             for r in res]
    if wrap:
        return "<nodes>\n" + "".join(f"  {p}\n" for p in parts) + "</nodes>\n"
    return "".join(p + "\n" for p in parts)


def cmd_set_value(conn, a) -> int:
    b64 = a.base64 if a.base64 is not None else a.base64_pos
    pairs = [("file", a.file is not None, "base64", b64 is not None),
             ("plain", a.plain, "base64", b64 is not None),
             ("interactive", a.interactive, "base64", b64 is not None),
             ("interactive", a.interactive, "plain", a.plain),
             ("interactive", a.interactive, "file", a.file is not None)]
    for n1, v1, n2, v2 in pairs:
        if v1 and v2:
            raise CommandError(f"Options --{n1} and --{n2} are mutually exclusive")
    s = _lookup(conn, a.secret)
    if b64 is not None:
        _err("Passing secret value as command-line argument is insecure!")
        value = _decode_b64(b64.encode("ascii", "replace"))
    elif a.file is not None:
        raw = _read_value_file(a.file)
        value = raw if a.plain else _decode_b64(raw)
    elif a.interactive:
        value = _read_interactive()
    else:
        raise CommandError("Input secret value is missing")
    try:
        s.set_value(value)
    except errors.SecretError as e:
        raise CommandError("Failed to set secret value", errors.display(e)) from None
    finally:
        value = b""
    _print("Secret value set")
    _print()
    return 0


def cmd_get_value(conn, a) -> int:
    s = _lookup(conn, a.secret)
    try:
        value = s.get_value()
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    out = sys.stdout.buffer
    sys.stdout.flush()
    try:
        out.write(value if a.plain else base64.b64encode(value) + b"\n")
        out.flush()
    except OSError:
        raise CommandError("failed to write secret") from None
    return 0


def cmd_undefine(conn, a) -> int:
    s = _lookup(conn, a.secret)
    try:
        s.undefine()
    except errors.SecretError as e:
        raise CommandError(f"Failed to delete secret {a.secret}", errors.display(e)) from None
    _print(f"Secret {a.secret} deleted")
    _print()
    return 0


def cmd_list(conn, a) -> int:
    flags = 0
    for opt, bit in (("ephemeral", ListFlags.EPHEMERAL), ("no_ephemeral", ListFlags.NO_EPHEMERAL),
                     ("private", ListFlags.PRIVATE), ("no_private", ListFlags.NO_PRIVATE)):
        if getattr(a, opt):
            flags |= bit
    try:
        secrets = conn.list_secrets(flags)
    except errors.SecretError as e:
        raise CommandError("Failed to list secrets", errors.display(e)) from None
    rows = []
    for s in sorted(secrets, key=lambda s: s.uuid.lower()):
        usage = "Unused" if s.usage_type == UsageType.NONE else f"{s.usage_type.xml_name} {s.usage_id}"
        rows.append([s.uuid, usage])
    sys.stdout.write(format_table(["UUID", "Usage"], rows))
    _print()
    return 0


_EVENT_NAMES = {"lifecycle": EventId.LIFECYCLE, "value-changed": EventId.VALUE_CHANGED}


def cmd_event(conn, a) -> int:
    if a.list:
        for name in _EVENT_NAMES:
            _print(name)
        return 0
    if not a.event:
        raise CommandError("either --list or --event <type> is required")
    if a.event not in _EVENT_NAMES:
        raise CommandError(f"unknown event type {a.event}")
    target = _lookup(conn, a.secret) if a.secret else None
    count = 0
    done = threading.Event()
    lock = threading.Lock()

    def handler(secret, ev) -> None:
        nonlocal count
        with lock:
            if done.is_set():
                return
            prefix = time.strftime("%Y-%m-%d %H:%M:%S.000+0000: ", time.gmtime()) if a.timestamp else ""
            if ev.event_id == EventId.LIFECYCLE:
                what = "Defined" if ev.lifecycle == Lifecycle.DEFINED else "Undefined"
                _print(f"{prefix}event 'lifecycle' for secret {ev.uuid}: {what}")
            else:
                _print(f"{prefix}event 'value-changed' for secret {ev.uuid}")
            sys.stdout.flush()
            count += 1
            if not a.loop:
                done.set()

    sub = conn.subscribe(handler, _EVENT_NAMES[a.event], target)
    interrupted = threading.Event()

    def on_sigint(*_: object) -> None:
        interrupted.set()
        done.set()
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        done.wait(a.timeout if a.timeout else None)
    finally:
        signal.signal(signal.SIGINT, old)
        try:
            conn.unsubscribe(sub)
        except errors.SecretError:
            pass
    timed_out = not done.is_set()
    if timed_out:
        _print("event loop timed out")
    elif interrupted.is_set():
        _print("event loop interrupted")
    _print(f"events received: {count}")
    return 0 if count else 1


def cmd_init_encryption(conn_unused, a) -> int:
    from secretbus.store.keys import init_encryption
    kw = {"with_key": a.with_key, "raw": a.raw}
    if a.key_path:
        kw["key_path"] = Path(a.key_path)
    try:
        path = init_encryption(**kw)
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    _print(f"Encryption key created at {path}")
    return 0


def cmd_rewrite_values(conn, a) -> int:
    try:
        done, total, skipped = conn.rewrite_values()
    except errors.SecretError as e:
        raise CommandError("Failed to rewrite secret values", errors.display(e)) from None
    _print(f"Rewrote {done} of {total} persistent secret values")
    if skipped:
        _err(f"{skipped} secrets could not be loaded and were not rewritten (the log says why)")
    return 0 if done == total and not skipped else 1


# -- argument parsing ----------------------------------------------------------------
class _Commands:
    """Sub-command parsers, each parsed with parse_intermixed_args so that options and
    positionals mix as in virsh (`secret-set-value UUID --file F BASE64`)."""

    def __init__(self) -> None:
        self.parsers: dict[str, argparse.ArgumentParser] = {}

    def add_parser(self, name: str, help: str) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"secretbus {name}", description=help)
        p.set_defaults(command_help=help)
        self.parsers[name] = p
        return p


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    sub = _Commands()

    c = sub.add_parser("secret-define", help="define or modify a secret from an XML file")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--validate", action="store_true", help="validate the XML against the schema")
    c.set_defaults(func=cmd_define)

    c = sub.add_parser("secret-dumpxml", help="secret attributes in XML")
    c.add_argument("secret", metavar="SECRET")
    c.add_argument("--xpath", help="xpath expression to filter the XML document")
    c.add_argument("--wrap", action="store_true", help="wrap xpath results in a common root element")
    c.set_defaults(func=cmd_dumpxml)

    c = sub.add_parser("secret-set-value", help="set a secret value")
    c.add_argument("secret", metavar="SECRET")
    c.add_argument("base64_pos", nargs="?", metavar="BASE64", help="base64-encoded value (insecure)")
    c.add_argument("--base64", help="base64-encoded value (insecure)")
    c.add_argument("--file", help="read the value from a file")
    c.add_argument("--plain", action="store_true", help="read the file as raw bytes, not base64")
    c.add_argument("--interactive", action="store_true", help="read the value from the terminal")
    c.set_defaults(func=cmd_set_value)

    c = sub.add_parser("secret-get-value", help="Output a secret value")
    c.add_argument("secret", metavar="SECRET")
    c.add_argument("--plain", action="store_true", help="write the raw value, not base64")
    c.set_defaults(func=cmd_get_value)

    c = sub.add_parser("secret-undefine", help="undefine a secret")
    c.add_argument("secret", metavar="SECRET")
    c.set_defaults(func=cmd_undefine)

    c = sub.add_parser("secret-list", help="list secrets")
    for opt in ("ephemeral", "no-ephemeral", "private", "no-private"):
        c.add_argument(f"--{opt}", action="store_true", help=f"list {opt.replace('-', ' ')} secrets")
    c.set_defaults(func=cmd_list)

    c = sub.add_parser("secret-event", help="Secret Events")
    c.add_argument("--secret", help="filter by secret UUID")
    c.add_argument("--event", help="which event type to wait for (lifecycle, value-changed)")
    c.add_argument("--loop", action="store_true", help="loop until timeout or interrupt")
    c.add_argument("--timeout", type=int, help="timeout seconds")
    c.add_argument("--list", action="store_true", help="list valid event types")
    c.add_argument("--timestamp", action="store_true", help="show timestamp for each printed event")
    c.set_defaults(func=cmd_event)

    c = sub.add_parser("init-encryption", help="create the sealed encryption key (once)")
    c.add_argument("--key-path", help="where to put the key "
                   "(default /var/lib/libvirt/secrets/secrets-encryption-key)")
    c.add_argument("--with-key", help="systemd-creds --with-key= (host, tpm2, host+tpm2, auto, ...)")
    c.add_argument("--raw", action="store_true", help="write a raw 0600 key file (hosts without systemd)")
    c.set_defaults(func=cmd_init_encryption, no_connection=True)

    c = sub.add_parser("rewrite-values", help="re-write every persistent value under the current "
                       "scheme and key (the service must not be running for system/session)")
    c.set_defaults(func=cmd_rewrite_values, direct_driver=True)
    listing = "\n".join(f"  {n:<18} {p.get_default('command_help')}" for n, p in sub.parsers.items())
    p = argparse.ArgumentParser(prog="secretbus", description="libvirt-compatible secret service client",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + listing)
    p.add_argument("-c", "--connect", metavar="URI", help="connection URI (default: $SECRETBUS_DEFAULT_URI, "
                   "else secret:///system for root and secret:///session otherwise)")
    p.add_argument("command", metavar="<command>", choices=sorted(sub.parsers))
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p, sub.parsers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    top, commands = build_parser()
    a = top.parse_args(argv)
    sub = commands[a.command].parse_intermixed_args(a.args)
    sub.connect, sub.command = a.connect, a.command
    return sub


def _open(uri: str | None, direct_driver: bool):
    from secretbus.uri import default_uri, open_connection, open_driver, parse_uri
    if direct_driver:
        uri = uri or default_uri()
        return open_driver(parse_uri(uri), uri)
    return open_connection(uri)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from secretbus.core.logsetup import setup_cli_logging
    from secretbus.procsec import no_core_dumps
    setup_cli_logging()
    no_core_dumps()
    conn = None
    try:
        if not getattr(a, "no_connection", False):
            try:
                conn = _open(a.connect, getattr(a, "direct_driver", False))
            except errors.SecretError as e:
                raise CommandError("failed to connect to the hypervisor", errors.display(e)) from None
        return a.func(conn, a)
    except CommandError as e:
        sys.stdout.flush()
        for line in e.lines:
            _err(line)
        return 1
    except errors.SecretError as e:
        sys.stdout.flush()
        _err(errors.display(e))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if conn is not None:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
