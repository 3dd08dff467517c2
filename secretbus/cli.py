"""`secretbus [-c URI] [-q] <command>`: virsh's secret commands, same options and messages.

Values never reach argv of another process, a log or an error message: they go from
the input (file, terminal, stdin) to the connection and from the connection to stdout.
As in virsh, every command that ran ends its output with a blank line unless --quiet.
"""
from __future__ import annotations

import base64
import errno
import getpass
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from secretbus.cli_options import CommandDef, Kind, Opt, UsageError, format_help, parse
from secretbus.cli_output import Output, OutputLost, guard_std_fds
from secretbus.core import errors
from secretbus.core.model import VALUE_MAX, VERSION, EventId, Lifecycle, ListFlags, UsageType
from secretbus.core.uuids import invalid_uuid, parse_uuid
from secretbus.store.codec import ValueFileError, strict_b64decode

DEFINE_FILE_LIMIT = 10 * 1024 * 1024   # virsh reads at most 10 MiB of XML
TIMEOUT_MAX = 2**31 // 1000 - 1        # virsh keeps the timeout in ms in an int


class CommandError(Exception):
    """A failure already phrased as virsh would print it (one or more lines)."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = lines


_out = Output()


def _err(msg: str) -> None:
    try:
        sys.stderr.write(f"error: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass    # stderr is gone too; the exit status still tells


def _print(msg: str = "") -> None:
    _out.print(msg + "\n")


def _extra(msg: str = "") -> None:
    """Informational output that --quiet hides (vshPrintExtra)."""
    _out.extra(msg + "\n")


# -- helpers -------------------------------------------------------------------------
def _req(a, name: str) -> str | None:
    """vshCommandOptStringReq: a given option must not be empty."""
    value = getattr(a, name.replace("-", "_"))
    if value == "":
        raise CommandError(f"Failed to get option '{name}': Option argument is empty")
    return value


def _required(a, name: str) -> str:
    """An option the grammar made mandatory: present, and not empty."""
    value = _req(a, name)
    assert value is not None, name
    return value


def _lookup(conn, a, name: str = "secret"):
    arg = _required(a, name)
    if parse_uuid(arg) is None:
        # libvirt's client library refuses it before any call, with this text and no prefix.
        raise CommandError(f"failed to get secret '{arg}'", invalid_uuid().message)
    try:
        return conn.lookup_by_uuid(arg)
    except errors.SecretError as e:
        raise CommandError(f"failed to get secret '{arg}'", errors.display(e)) from None


def _read_file(path: str, limit: int) -> bytes:
    """virFileReadAll: its two messages, and EOVERFLOW's text when over the limit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CommandError(f"Failed to open file '{path}': {e.strerror}") from None
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise CommandError(f"Failed to read file '{path}': {e.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise CommandError(f"Failed to read file '{path}': {os.strerror(errno.EOVERFLOW)}")
    return b"".join(chunks)


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


def format_table(header: list[str], rows: list[list[str]], with_header: bool = True) -> str:
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
    out = [line(table[0]), "-" * sum(w + 3 for w in widths) + "\n"] if with_header else []
    out += [line(r) for r in table[1:]]
    return "".join(out)


def _read_interactive() -> bytes:
    try:
        if sys.stdin.isatty():
            text = getpass.getpass("Enter new value for secret:")
        else:
            # Scripted use: one line from stdin, never echoed anywhere.
            sys.stderr.write("Enter new value for secret:")
            sys.stderr.flush()
            text = sys.stdin.readline()
            sys.stderr.write("\n")
            if not text:
                raise EOFError
            if text.endswith("\n"):
                text = text[:-1]
    except EOFError:
        # Nothing at all was read: storing an empty value would silently wipe the old one.
        raise CommandError("Failed to read secret: end of input before any value") from None
    return text.encode("utf-8")


# -- commands ------------------------------------------------------------------------
def cmd_define(conn, a) -> int:
    path = _required(a, "file")
    xml = _read_file(path, DEFINE_FILE_LIMIT)
    try:
        s = conn.define_xml(xml, 1 if a.validate else 0)
    except errors.SecretError as e:
        raise CommandError(f"Failed to set attributes from {path}", errors.display(e)) from None
    _extra(f"Secret {s.uuid} created")
    return 0


def cmd_dumpxml(conn, a) -> int:
    s = _lookup(conn, a)
    xpath = _req(a, "xpath")
    xml = s.xml_desc()
    if xpath is not None:
        from secretbus.cli_xpath import XPathFailure, select
        try:
            xml = select(xml, xpath, a.wrap)
        except XPathFailure as e:
            raise CommandError(str(e)) from None
    _out.print(xml)
    return 0


_EXCLUSIVE = (("file", "base64"), ("plain", "base64"), ("interactive", "base64"),
              ("interactive", "plain"), ("interactive", "file"))


def cmd_set_value(conn, a) -> int:
    for n1, n2 in _EXCLUSIVE:
        if getattr(a, n1) not in (None, False) and getattr(a, n2) not in (None, False):
            raise CommandError(f"Options --{n1} and --{n2} are mutually exclusive")
    s = _lookup(conn, a)
    b64, path = _req(a, "base64"), _req(a, "file")
    if b64 is not None:
        _err("Passing secret value as command-line argument is insecure!")
        value = _decode_b64(b64.encode("ascii", "replace"))
    elif path is not None:
        raw = _read_file(path, VALUE_MAX * 2)
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
    _extra("Secret value set")
    return 0


def cmd_get_value(conn, a) -> int:
    s = _lookup(conn, a)
    try:
        value = s.get_value()
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    try:
        # No newline of its own: the command's trailing blank line ends it (virsh).
        _out.write(value if a.plain else base64.b64encode(value))
        _out.flush()
    except OutputLost:
        _out.lost_reported = True
        raise CommandError("failed to write secret") from None
    finally:
        value = b""
    return 0


def cmd_undefine(conn, a) -> int:
    s = _lookup(conn, a)
    try:
        s.undefine()
    except errors.SecretError as e:
        raise CommandError(f"Failed to delete secret {a.secret}", errors.display(e)) from None
    _extra(f"Secret {a.secret} deleted")
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
    _out.print(format_table(["UUID", "Usage"], rows, with_header=not _out.quiet))
    return 0


_EVENT_NAMES = {"lifecycle": EventId.LIFECYCLE, "value-changed": EventId.VALUE_CHANGED}


def _timeout(a) -> int | None:
    """vshCommandOptTimeoutToMs: a whole number of seconds, at least 1."""
    if a.timeout is None:
        return None
    if not re.fullmatch(r"[ \t\n\v\f\r]*[+-]?[0-9]+", a.timeout) or not 0 < int(a.timeout) <= TIMEOUT_MAX:
        raise CommandError(f"Numeric value '{a.timeout}' for <timeout> option is malformed or out of range")
    return int(a.timeout)


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}+0000: "


def cmd_event(conn, a) -> int:
    if a.list:
        for name in _EVENT_NAMES:
            _print(name)
        return 0
    event = _req(a, "event")
    if event is None:
        raise CommandError("either --list or --event <type> is required")
    if event not in _EVENT_NAMES:
        raise CommandError(f"unknown event type {event}")
    timeout = _timeout(a)
    target = _lookup(conn, a) if a.secret is not None else None
    count = 0
    done = threading.Event()
    lock = threading.Lock()

    def handler(secret, ev) -> None:
        nonlocal count
        with lock:
            if done.is_set():
                return
            prefix = _timestamp() if a.timestamp else ""
            try:
                if ev.event_id == EventId.LIFECYCLE:
                    what = "Defined" if ev.lifecycle == Lifecycle.DEFINED else "Undefined"
                    _print(f"{prefix}event 'lifecycle' for secret {ev.uuid}: {what}")
                else:
                    _print(f"{prefix}event 'value-changed' for secret {ev.uuid}")
                _out.flush()
            except OutputLost:
                done.set()      # nobody is reading any more: stop waiting
                return
            count += 1
            if not a.loop:
                done.set()

    lost: list[str] = []

    def on_lost(reason: str) -> None:
        # virsh's close callback (virshCatchDisconnect), then its event loop ends
        with lock:
            _out.flush()
            _err(f"Disconnected from {a.connect_uri or conn.uri} due to {reason}")
            lost.append(reason)
            done.set()

    conn.on_lost(on_lost)
    sub = conn.subscribe(handler, _EVENT_NAMES[event], target)
    interrupted = threading.Event()

    def on_sigint(*_: object) -> None:
        interrupted.set()
        done.set()
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        done.wait(timeout)
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
    if lost:
        # what virsh says next, as deregistering its callback fails on the closed connection
        raise CommandError("internal error: client socket is closed")
    return 0 if count else 1


def cmd_init_encryption(conn_unused, a) -> int:
    from secretbus.store.keys import init_encryption
    kw = {"with_key": _req(a, "with-key"), "raw": a.raw}
    if _req(a, "key-path"):
        kw["key_path"] = Path(a.key_path)
    try:
        path = init_encryption(**kw)
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    _print(f"Encryption key created at {path}")
    return 0


FLEET_ACTIONS = ("init", "join", "approve", "status", "leave", "revoke", "rotate", "publish")


def _instance_paths(parsed, a):
    """The local instance a fleet, rotate-key or sasl-passwd command acts on, with its
    secretbusd.conf named by --config (DESIGN §11), as `secretbusd --config` names it."""
    from secretbus.store.paths import InstancePaths
    paths = InstancePaths.for_kind(parsed.kind, parsed.root)
    return paths.with_server_conf(a.config) if _req(a, "config") else paths


def cmd_fleet(conn_unused, a) -> int:
    from secretbus.fleet import admin
    from secretbus.store.conf import load_instance_conf
    from secretbus.uri import default_uri, parse_uri
    if a.action not in FLEET_ACTIONS:
        raise CommandError(f"unknown fleet action '{a.action}' ({', '.join(FLEET_ACTIONS)})")
    needs_host = a.action in ("approve", "revoke")
    if needs_host and not _req(a, "target"):
        raise CommandError(f"fleet {a.action} needs the id of a host (as 'fleet join' printed it)")
    if not needs_host and a.action != "publish" and a.target is not None:
        raise CommandError(f"unexpected data '{a.target}'")
    wait = None
    if a.wait is not None:
        if a.action != "join":
            raise CommandError("--wait is for 'fleet join'")
        if not re.fullmatch(r"[0-9]+", a.wait.strip()) or int(a.wait) > TIMEOUT_MAX:
            raise CommandError(f"Numeric value '{a.wait}' for <wait> option is malformed or out of range")
        wait = int(a.wait)

    def note(text: str) -> None:
        # join's stdout is its host id alone (DESIGN §11): everything else goes to stderr.
        try:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def announce(host_id: str) -> None:
        _print(host_id)
        _out.flush()        # before waiting: the operator needs it for 'fleet approve'
    try:
        parsed = parse_uri(a.connect_uri or default_uri())
        paths = _instance_paths(parsed, a)
        conf = load_instance_conf(paths)
        if a.action == "init":
            lines = admin.init(paths, conf, raw=a.raw, with_key=_req(a, "with-key"),
                               copy_from=Path(a.from_file) if _req(a, "from-file") else None)
        elif a.action == "join":
            _out.quiet = True   # (no trailing blank line either)
            approved = admin.join(paths, conf, announce=announce, note=note, raw=a.raw,
                                  with_key=_req(a, "with-key"), wait=wait)
            return 0 if approved or wait is None else 1
        elif a.action == "approve":
            lines = admin.approve(paths, conf, a.target)
        elif a.action == "revoke":
            lines = admin.revoke(paths, conf, a.target)
        elif a.action == "leave":
            lines = admin.leave(paths, conf)
        elif a.action == "rotate":
            lines = admin.rotate(paths, conf)
        elif a.action == "publish":
            from secretbus import cli_fleet
            lines, refused = cli_fleet.publish(paths, a.target)
            for line in lines:
                _print(line)
            _report(refused)
            return 1 if refused else 0
        else:
            lines = admin.status(paths, conf)
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    for line in lines:
        _print(line)
    return 0


def cmd_rotate_key(conn_unused, a) -> int:
    from secretbus import cli_rotate
    from secretbus.store.conf import load_instance_conf
    from secretbus.uri import default_uri, parse_uri
    try:
        parsed = parse_uri(a.connect_uri or default_uri())
        paths = _instance_paths(parsed, a)
        timeout = float(_req(a, "timeout") or 60)
        lines = cli_rotate.rotate_key(paths, load_instance_conf(paths), key_path=_req(a, "key-path"),
                                      with_key=_req(a, "with-key"), timeout=timeout, say=_print)
    except ValueError:
        raise CommandError(f"invalid --timeout '{a.timeout}'") from None
    except errors.SecretError as e:
        raise CommandError("Failed to rotate the encryption key", errors.display(e)) from None
    for line in lines:
        _print(line)
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


def cmd_ssh_bridge(conn_unused, a) -> int:
    """The remote end of secret+ssh:// (secretbus.rpc.sshbridge): URI as virt-ssh-helper's."""
    from secretbus.core.model import InstanceKind
    from secretbus.rpc import sshbridge
    from secretbus.rpc.paths import choose_socket
    from secretbus.uri import parse_uri
    uri = _required(a, "uri")
    try:
        parsed = parse_uri(uri)
        if parsed.kind is InstanceKind.EMBED:
            raise errors.InvalidArg(f"ssh-bridge needs secret:///system or secret:///session, not '{uri}'")
        readonly = bool(a.readonly or a.top_readonly)
        path = parsed.socket or choose_socket(parsed.kind is InstanceKind.SYSTEM, readonly, parsed.mode)
        sshbridge.run(path)
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    return 0


def cmd_audit(conn_unused, a) -> int:
    from secretbus import cli_audit
    secret = None
    if _req(a, "secret"):
        secret = parse_uuid(a.secret)
        if secret is None:
            raise CommandError(f"invalid secret UUID '{a.secret}'")
    q = cli_audit.Query(since=_req(a, "since"), secret=secret, directory=_req(a, "directory"), file=_req(a, "file"))
    try:
        records = cli_audit.read_records(q)
    except cli_audit.AuditReadError as e:
        raise CommandError(str(e)) from None
    _print(format_table(cli_audit.HEADER, [cli_audit.row(r) for r in records]).rstrip("\n"))
    return 0


def cmd_sasl_passwd(conn_unused, a) -> int:
    """secretbusd's SASL verifier store (rpc/sasl.py): set or delete USER's SCRAM verifier."""
    from secretbus.rpc import sasl
    from secretbus.rpc.serverconf import load_serverconf
    from secretbus.uri import default_uri, parse_uri
    try:
        if _req(a, "file"):
            path = Path(a.file)
        else:
            # The store the server reads: secretbusd.conf's sasl_verifier_file, else beside it.
            paths = _instance_paths(parse_uri(a.connect_uri or default_uri()), a)
            conf = load_serverconf(paths.server_conf_file, required=paths.server_conf_named)
            path = conf.verifier_path(paths.server_conf_file.parent)
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    store = sasl.VerifierStore(path)
    try:
        if a.delete:
            if not store.delete(a.user):
                raise CommandError(f"no SASL user '{a.user}' in {path}")
            _print(f"SASL user {a.user} deleted")
            return 0
        if sys.stdin.isatty():
            password = getpass.getpass(f"Password for {a.user}: ")
            if getpass.getpass("Again: ") != password:
                raise CommandError("the passwords do not match")
        else:
            password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise CommandError("an empty password is not allowed")
        store.set(a.user, password)
    except errors.SecretError as e:
        raise CommandError(errors.display(e)) from None
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    _print(f"SASL user {a.user} set in {path}")
    return 0


# -- command table -------------------------------------------------------------------
S, B, N = Kind.STRING, Kind.BOOL, Kind.NUMBER
_SECRET = Opt("secret", S, "secret UUID", required=True)


COMMANDS: dict[str, tuple[CommandDef, object, dict[str, bool]]] = {}


def _command(name: str, help: str, desc: str, opts: tuple[Opt, ...], func, **flags: bool) -> None:
    COMMANDS[name] = (CommandDef(name, help, desc, opts), func, flags)


_command("secret-define", "define or modify a secret from an XML file", "Define or modify a secret.",
         (Opt("file", S, "file containing secret attributes in XML", required=True),
          Opt("validate", B, "validate the XML against the schema")), cmd_define)
_command("secret-dumpxml", "secret attributes in XML",
         "Output attributes of a secret as an XML dump to stdout.",
         (_SECRET, Opt("xpath", S, "xpath expression to filter the XML document", named_only=True),
          Opt("wrap", B, "wrap xpath results in an common root element")), cmd_dumpxml)
_command("secret-event", "Secret Events", "List event types, or wait for secret events to occur",
         (Opt("secret", S, "filter by secret name or uuid"),
          Opt("event", S, "which event type to wait for"),
          Opt("loop", B, "loop until timeout or interrupt, rather than one-shot"),
          Opt("timeout", N, "timeout seconds"),
          Opt("list", B, "list valid event types"),
          Opt("timestamp", B, "show timestamp for each printed event")), cmd_event)
_command("secret-get-value", "Output a secret value", "Output a secret value to stdout.",
         (_SECRET, Opt("plain", B, "get value without converting to base64")), cmd_get_value)
_command("secret-list", "list secrets", "Returns a list of secrets",
         (Opt("ephemeral", B, "list ephemeral secrets"), Opt("no-ephemeral", B, "list non-ephemeral secrets"),
          Opt("private", B, "list private secrets"), Opt("no-private", B, "list non-private secrets")),
         cmd_list)
_command("secret-set-value", "set a secret value", "Set a secret value.",
         (_SECRET, Opt("file", S, "read secret from file", named_only=True),
          Opt("plain", B, "read the secret from file without converting from base64"),
          Opt("interactive", B, "read the secret from the terminal"),
          Opt("base64", S, "base64-encoded secret value")), cmd_set_value)
_command("secret-undefine", "undefine a secret", "Undefine a secret.", (_SECRET,), cmd_undefine)
_command("init-encryption", "create the sealed encryption key (once)",
         "Create the key that encrypts secret values at rest, sealed with systemd-creds.",
         (Opt("key-path", S, "where to put the key (default /var/lib/libvirt/secrets/secrets-encryption-key)",
              named_only=True),
          Opt("with-key", S, "systemd-creds --with-key= (host, tpm2, host+tpm2, auto, ...)", named_only=True),
          Opt("raw", B, "write a raw 0600 key file (hosts without systemd)")),
         cmd_init_encryption, no_connection=True)
# The secretbusd.conf that holds fleet mode's keys (DESIGN §11), as `secretbusd --config` names it.
_CONFIG = Opt("config", S, "the secretbusd.conf with the fleet_* keys (default /etc/secretbus/secretbusd.conf; "
              "session: ~/.config/secretbus/, embedded: ROOT/etc/), as given to secretbusd --config",
              named_only=True)
_command("fleet", "fleet mode: init, join, approve HOST, status, leave, revoke HOST, rotate, publish [UUID]",
         "Fleet mode (docs/fleet.md): 'init' creates the fleet key on the first host (sealed with systemd-creds) "
         "and registers it for the cluster; 'join' makes this host's key pair, publishes it and prints its "
         "id, and picks up the fleet key once approved; 'approve HOST' (on an enrolled host) wraps the fleet "
         "key for that host; 'revoke HOST' deletes its records; 'leave' this host's; 'rotate' makes a new "
         "fleet key for the approved hosts and re-seals every secret; 'status' shows the cluster, the key, "
         "etcd and the hosts; 'publish' moves the secrets this host had before fleet mode (or the one named) "
         "into the fleet (the service must be stopped).",
         (Opt("action", S, ", ".join(FLEET_ACTIONS), required=True),
          Opt("target", S, "approve, revoke: the host id; publish: a secret's UUID (default: every local secret)"),
          Opt("wait", N, "join: wait this many seconds for the approval", named_only=True),
          Opt("with-key", S, "systemd-creds --with-key= (host, tpm2, host+tpm2, auto, ...); init, join: also "
              "for the fleet keys this host picks up later", named_only=True),
          Opt("raw", B, "write a raw 0600 key file (hosts without systemd)"),
          Opt("from-file", S, "seal a copy of the first host's fleet key (a raw 32-byte file) instead of "
              "creating one", named_only=True),
          _CONFIG),
         cmd_fleet, no_connection=True)
_command("audit", "show the audit records of value reads",
         "Show the journal's records of secret value reads (allowed and denied), oldest first.",
         (Opt("since", S, "records since this time (journalctl --since: \"2025-01-31 10:00\", \"-1h\", today)",
              named_only=True),
          Opt("secret", S, "only the records of this secret UUID", named_only=True),
          Opt("directory", S, "read the journal files in this directory (journalctl --directory)",
              named_only=True),
          Opt("file", S, "read this journal file (journalctl --file)", named_only=True)),
         cmd_audit, no_connection=True)
_command("sasl-passwd", "set or delete a SASL user's password (secretbusd's SCRAM verifiers)",
         "Set USER's SCRAM-SHA-256 verifier (salted keys, never the password) for auth_tls = \"sasl\", "
         "reading the password from the terminal (twice) or one line of stdin; --delete removes USER.",
         (Opt("user", S, "SASL user name", required=True),
          Opt("delete", B, "delete the user"),
          Opt("file", S, "the verifier store (default: the server's, secretbusd.conf's sasl_verifier_file "
              "or sasl-verifiers.json beside it)", named_only=True),
          Opt("config", S, "the secretbusd.conf that names it (as given to secretbusd --config)", named_only=True)),
         cmd_sasl_passwd, no_connection=True)
_command("rotate-key", "replace the encryption key, the service running or not",
         "Replace the key that encrypts values at rest by a new one, online: the running service re-encrypts "
         "every value on a reload (SIGHUP), each value readable throughout, then the new key takes the key "
         "file's name. Crash-safe at every step; run it again to finish an interrupted rotation.",
         (Opt("key-path", S, "the sealed credential the service loads (default "
              "/var/lib/libvirt/secrets/secrets-encryption-key; a raw key in secret.conf is found there)",
              named_only=True),
          Opt("with-key", S, "systemd-creds --with-key= for the new sealed key (host, tpm2, ...)", named_only=True),
          Opt("timeout", S, "seconds to wait for the service to re-encrypt (default 60)", named_only=True),
          _CONFIG),
         cmd_rotate_key, no_connection=True)
_command("ssh-bridge", "relay stdin/stdout to the local RPC socket (remote end of secret+ssh://)",
         "Copy standard input and output to and from this host's libvirt RPC socket for URI, as libvirt's "
         "virt-ssh-helper does: the command a secret+ssh:// client runs on the remote host.",
         (Opt("uri", S, "connection URI (secret:///system, secret:///session; socket=, mode=)", required=True),
          Opt("readonly", B, "use the read-only socket (also: secretbus -r ssh-bridge URI)")),
         cmd_ssh_bridge, no_connection=True, raw_stdio=True)
_command("rewrite-values", "re-write every persistent value under the current scheme and key",
         "Re-write every persistent value under the current scheme and key "
         "(the service must not be running for system/session).", (), cmd_rewrite_values,
         direct_driver=True)


# -- the command line ----------------------------------------------------------------
def top_help() -> str:
    cmds = "".join(f"    {name:<18} {d.help}\n" for name, (d, _f, _fl) in COMMANDS.items())
    return ("secretbus [options]... <command> [args...]\n\n"
            "  options:\n"
            "    -c | --connect=URI      connection URI (default: $SECRETBUS_DEFAULT_URI, else\n"
            "                            secret:///system for root and secret:///session otherwise)\n"
            "    -h | --help             this help\n"
            "    -k | --keepalive-interval=NUM\n"
            "                            keepalive interval in seconds, 0 for disable (libvirt RPC)\n"
            "    -K | --keepalive-count=NUM\n"
            "                            number of possible missed keepalive messages\n"
            "    -q | --quiet            quiet mode\n"
            "    -r | --readonly         connect readonly (over libvirt RPC)\n"
            "    -v                      short version\n"
            "    -V                      long version\n"
            "         --version[=TYPE]   version, TYPE is short or long (default short)\n\n"
            "  commands (see 'secretbus help <command>' or '<command> --help'):\n"
            f"    {'help':<18} print help\n" + cmds)


class Invocation(SimpleNamespace):
    """What the command line asks for: a help page, or a command and its options."""


def version_text(long: bool) -> str:
    """virsh's -v (its version alone) and -V (what it was built with)."""
    if not long:
        return VERSION
    try:
        import gssapi  # noqa: F401 - only whether it is there
        kerberos = "yes"
    except ImportError:
        kerberos = "no (python3 gssapi module missing)"
    return (f"Secretbus command line tool {VERSION}\n"
            "libvirt's secret-* commands, over D-Bus (org.libvirt.Secret) or libvirt RPC\n\n"
            "Supported:\n"
            " URIs: secret:///system secret:///session secret:///embed secret+ssh:// secret+tls:// secret+tcp://\n"
            f" Kerberos for secret+tcp://: {kerberos}")


def _top_options(argv: list[str]) -> tuple[dict[str, object], list[str]]:
    """virsh's own options (getopt_long: -c URI, -cURI, --connect[=]URI, -q, -h, -r, bundled;
    -v, -V and --version[=TYPE] end the parse there, as virsh prints the version at once)."""
    top: dict[str, object] = {"connect": None, "quiet": False, "help": False, "readonly": False, "version": None,
                              "keepalive_interval": None, "keepalive_count": None}
    i = 0
    while i < len(argv):
        w = argv[i]
        if w == "--":
            return top, argv[i + 1:]
        if w.startswith("--"):
            i += 1 + _long_option(top, w, argv, i + 1)
        elif w.startswith("-") and len(w) > 1:
            i += 1 + _short_options(top, w, argv, i + 1)
        else:
            break
        if top["version"] is not None:
            return top, []
    return top, argv[i:]


_VALUED = {"c": "connect", "k": "keepalive-interval", "K": "keepalive-count"}    # short -> long


def _option_value(argv: list[str], i: int, short: str = "c") -> str:
    if i >= len(argv):
        raise UsageError(f"option '-{short}'/'--{_VALUED[short]}' requires an argument")
    return argv[i]


def _c_long(text: str) -> int | None:
    """C's strtol in base 0 over the whole text (white space, a sign, then 0x… hex, 0… octal
    or decimal), as virStrToLong_i reads virsh's numbers; None if it does not parse."""
    m = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if m is None:
        return None
    digits = m.group(2)
    n = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10)
    return -n if m.group(1) == "-" else n


def _keepalive_value(top: dict[str, object], short: str, spelled: str, text: str) -> None:
    """virsh's -k/-K: an int, at least 0."""
    n = _c_long(text)
    if n is None or not -2**31 <= n < 2**31:
        raise UsageError(f"Invalid value for option {spelled}")
    if n < 0:
        raise UsageError(f"option {spelled} requires a positive integer argument")
    top[_VALUED[short].replace("-", "_")] = n


def _long_option(top: dict[str, object], w: str, argv: list[str], i: int) -> int:
    """Record `--name[=value]`: how many of the words after it were its value."""
    name, eq, value = w[2:].partition("=")
    if name == "connect":
        top["connect"] = value if eq else _option_value(argv, i)
        return 0 if eq else 1
    if name in ("keepalive-interval", "keepalive-count"):
        short = "k" if name == "keepalive-interval" else "K"
        _keepalive_value(top, short, f"--{name}", value if eq else _option_value(argv, i, short))
        return 0 if eq else 1
    if name in ("quiet", "help", "readonly") and not eq:
        top[name] = True
        return 0
    if name == "version":
        top["version"] = "long" if value == "long" else "short"     # virsh: anything else is short
        return 0
    raise UsageError(f"unsupported option '{w}'. See --help.")


def _short_options(top: dict[str, object], w: str, argv: list[str], i: int) -> int:
    """Record bundled `-qh`, `-cURI`, `-c URI`: how many of the words after it were a value."""
    for j, ch in enumerate(w[1:], start=1):
        if ch in _VALUED:
            value = w[j + 1:]
            text = value or _option_value(argv, i, ch)
            if ch == "c":
                top["connect"] = text
            else:
                _keepalive_value(top, ch, f"-{ch}", text)
            return 0 if value else 1
        if ch in "vV":
            top["version"] = "short" if ch == "v" else "long"
            return 0
        if ch not in "qhr":
            raise UsageError(f"unsupported option '-{ch}'. See --help.")
        top[{"q": "quiet", "h": "help", "r": "readonly"}[ch]] = True
    return 0


def _help_topic(words: list[str]) -> str | None:
    """`help [--command] NAME`: vsh ignores the help command's unknown options and extra data."""
    topic, data_only, i = None, False, 0
    while i < len(words):
        w = words[i]
        i += 1
        if not data_only and w == "--":
            data_only = True
        elif not data_only and w.startswith("--") and len(w) > 2:
            name, eq, value = w[2:].partition("=")
            if name != "command":
                continue
            if not eq:
                if i >= len(words):
                    raise UsageError("expected syntax: --command <string>")
                value, i = words[i], i + 1
            topic = value if topic is None else topic
        elif topic is None:
            topic = w
    return topic


def parse_command_line(argv: list[str]) -> Invocation:
    top, rest = _top_options(argv)
    inv = Invocation(connect=top["connect"], quiet=top["quiet"], readonly=top["readonly"], help_text=None,
                     help_error=None, version_text=None, func=None, flags={}, args=None,
                     keepalive=(top["keepalive_interval"], top["keepalive_count"]))
    if top["version"] is not None:
        inv.version_text = version_text(top["version"] == "long")
        return inv
    if top["help"] or not rest:
        if not top["help"]:
            raise UsageError("a command is required (secretbus has no interactive shell); see --help")
        inv.help_text = top_help()
        return inv
    name, words = rest[0], rest[1:]
    if name == "help":
        topic = _help_topic(words)
        if not topic:
            inv.help_text = top_help()
        elif topic in COMMANDS:
            inv.help_text = format_help(COMMANDS[topic][0])
        elif topic == "secret":
            inv.help_text = " Secret (help keyword 'secret'):\n" + "".join(
                f"    {n:<30} {d.help}\n" for n, (d, _f, _fl) in COMMANDS.items() if n.startswith("secret-"))
        else:
            # A command that ran and failed (virsh's cmdHelp): its blank line follows.
            inv.help_error = f"command or command group '{topic}' doesn't exist"
        return inv
    if name not in COMMANDS:
        raise UsageError(f"unknown command: '{name}'")
    definition, func, flags = COMMANDS[name]
    given = parse(definition, words)
    if given is None:
        inv.help_text = format_help(definition)
        return inv
    values = {o.name.replace("-", "_"): given.get(o.name, False if o.kind is Kind.BOOL else None)
              for o in definition.opts}
    inv.func, inv.flags, inv.args = func, flags, SimpleNamespace(**values, command=name)
    return inv


def _open(uri: str | None, direct_driver: bool, readonly: bool = False,
          keepalive: tuple[int | None, int | None] = (None, None)):
    from secretbus.uri import default_uri, open_connection, open_driver, parse_uri
    if direct_driver:
        uri = uri or default_uri()
        return open_driver(parse_uri(uri), uri)
    ka = None
    if keepalive != (None, None):       # -k/-K (over libvirt RPC; a D-Bus connection has none)
        from secretbus.rpc.client import DEFAULT_KEEPALIVE, KeepAlive
        interval, count = keepalive
        ka = KeepAlive(DEFAULT_KEEPALIVE.interval if interval is None else interval,
                       DEFAULT_KEEPALIVE.count if count is None else count)
    return open_connection(uri, readonly=readonly, prompt=True, keepalive=ka)     # SASL: as virsh asks


def _report(lines: tuple[str, ...] | list[str]) -> None:
    try:
        _out.flush()        # what the command printed comes before its error, as in virsh
    except OutputLost:
        pass
    for line in lines:
        _err(line)


def _run(inv: Invocation) -> int:
    """Connect, run the command, and print virsh's trailing blank line after it."""
    from secretbus.core.logsetup import setup_cli_logging
    from secretbus.procsec import no_core_dumps
    setup_cli_logging()
    no_core_dumps()
    conn = None
    try:
        if not inv.flags.get("no_connection"):
            try:
                conn = _open(inv.connect, inv.flags.get("direct_driver", False), bool(inv.readonly), inv.keepalive)
            except errors.SecretError as e:
                _report(["failed to connect to the hypervisor", errors.display(e)])
                return 1
        try:
            inv.args.connect_uri = inv.connect     # (commands without a connection name their instance so)
            inv.args.top_readonly = bool(inv.readonly)
            rc = inv.func(conn, inv.args)
        except CommandError as e:
            _report(e.lines)
            rc = 1
        except errors.SecretError as e:
            _report([errors.display(e)])
            rc = 1
        except OutputLost:
            rc = 1
        if not inv.flags.get("raw_stdio"):
            _extra()            # (not after a byte stream: ssh-bridge's stdout is the RPC stream)
        return rc
    finally:
        if conn is not None:
            conn.close()


def _finish(rc: int) -> int:
    """Flush stdout; output that could not be written is one error line and status 1."""
    try:
        _out.flush()
    except OutputLost:
        pass
    if _out.lost is None and sys.stdout is not None:
        # Nothing of ours goes through sys.stdout, but a library might have printed.
        try:
            sys.stdout.flush()
        except (OSError, ValueError) as e:
            _out.lost = OutputLost(e if isinstance(e, OSError) else OSError(errno.EBADF, str(e)))
    if _out.lost is None:
        return rc
    if not _out.lost_reported:
        _err(f"failed to write to standard output: {_out.lost.strerror}")
    # Python flushes sys.stdout once more at exit; let that go nowhere instead of failing.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, _out.fd)
        os.close(devnull)
    except OSError:
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    global _out
    _out = Output()
    guard_std_fds(_out)
    try:
        inv = parse_command_line(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        _err(str(e))
        return 1
    _out.quiet = bool(inv.quiet)
    try:
        if inv.version_text is not None:
            _out.print(inv.version_text + "\n")
            rc = 0
        elif inv.help_text is not None:
            _out.print(inv.help_text)
            _extra()
            rc = 0
        elif inv.help_error is not None:
            _err(inv.help_error)
            _extra()
            rc = 1
        else:
            rc = _run(inv)
    except OutputLost:
        rc = 1
    except KeyboardInterrupt:
        rc = 130
    return _finish(rc)


if __name__ == "__main__":
    sys.exit(main())
