#!/usr/bin/env python3
"""Fuzzing: secret XML, secret.conf, value files, store loading and every D-Bus method.

    python bench/fuzz.py [--size tiny|small|full] [--only xml,conf,values,store,dbus]
                         [--seed N] [--atheris SECONDS] [-v]

Hypothesis drives every part programmatically (`@given` functions called directly, with
explicit `settings(max_examples=N, deadline=None, database=None)`); nothing is shrunk:
each input is checked where it is made, a failure is counted and printed with the input,
and the run goes on. "Inputs" counts the inputs actually tried.

What counts as a failure:
- XML parser (`parse_secret_xml`, str and bytes, validate off and on): any exception that is
  not a `SecretError`; an `InternalError` whose text is not one of libvirt's own
  INTERNAL_ERROR texts; a parse that does not survive format -> parse; a parse that read
  /etc/passwd (entities, XInclude); > 2 s for one input. (tests/test_secretxml.py has the
  grammar-level properties; this is the volume run.)
- secret.conf (`parse_conf` on text, `load_conf` on raw bytes, then `resolve_readers` and
  `codecs_for` on what parsed): anything but `ConfigError`/`InvalidEncrKey`; an error text
  without its "<file>:<line>: " prefix or with a line outside the file; a well-formed file
  (made from the grammar) that is refused or read wrongly; > 2 s for one input.
- Value files (`Base64Codec`, `GcmCodec`, `CbcCodec`, `NoKeyCodec`): `decode` raising anything
  but `ValueFileError`; a round trip that does not return the value; GCM returning anything
  but the original value for a modified file, or any value under another UUID.
- Store loading (driver start-up over a directory of random, damaged, misnamed,
  foreign, oversized, non-UTF-8-named files and symlinks; in a second row also
  subdirectories and FIFOs): an exception, a hang (> 5 s, or a reader blocked opening a
  FIFO), a file deleted (other than a regular `*.new` file, which must be) or changed, an
  `.xml` neither served nor reported as skipped, the one good secret lost or changed.
- Every part: a log record that does not format, or that holds a value.
- D-Bus (raw `dbus_fast` messages to a real secretbusd on a private bus: every method with
  fuzzed arguments, wrong signatures, random members/interfaces/signatures/bodies, random
  object paths, NO_REPLY_EXPECTED, concurrent batches): the daemon dies; no reply within
  10 s; an error name outside `org.libvirt.Error.*` + the freedesktop InvalidArgs,
  UnknownMethod, UnknownObject, UnknownInterface, UnknownProperty, PropertyReadOnly; an
  `org.libvirt.Error.InternalError` that is not one of libvirt's INTERNAL_ERROR texts (the
  catch-all "internal error" is a failure); a success for a method that does not exist or
  with the wrong argument signature; a success with the wrong reply signature; a stored
  value's marker in any reply but GetValue's. After the run: the daemon answers,
  every store file is well-formed (each `*.xml` parses and matches its name, each value
  file decodes and has its `.xml`, no `*.new`), and a restart serves the same persistent
  secrets with nothing skipped.

`--atheris SECONDS` also runs libFuzzer (atheris) on the XML and conf parsers for SECONDS
each, in child processes (skipped with a message when atheris is not importable).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import faulthandler
import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hseed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from secretbus.core import errors  # noqa: E402
from secretbus.core.secretxml import MAX_XML_BYTES, format_secret_xml, parse_secret_xml  # noqa: E402
from secretbus.store.codec import Base64Codec, Binding, ValueFileError  # noqa: E402
from secretbus.store.conf import SecretConf, load_conf, parse_conf, resolve_readers  # noqa: E402
from secretbus.store.crypto import CbcCodec, GcmCodec, NoKeyCodec  # noqa: E402
from secretbus.store.fsutil import is_spare_name  # noqa: E402
from secretbus.store.keys import codecs_for  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    # inputs per part; "values" is per codec, "dbus" counts calls (batches of 1-3)
    "tiny": {"xml": 1000, "conf": 1500, "values": 400, "store": 100, "dbus": 700},
    "small": {"xml": 4000, "conf": 5000, "values": 1000, "store": 300, "dbus": 5000},
    "full": {"xml": 60_000, "conf": 60_000, "values": 10_000, "store": 3000, "dbus": 50_000},
}
PARTS = ("xml", "conf", "values", "store", "dbus")
SLOW = 2.0            # seconds: one parser input taking longer is a hang
LOAD_TIMEOUT = 5.0    # seconds for loading one fuzzed store directory
CALL_TIMEOUT = 10.0   # seconds for one D-Bus reply

# libvirt reports these with VIR_ERR_INTERNAL_ERROR; any other InternalError is a bug.
LIBVIRT_INTERNAL = [re.compile(p, re.DOTALL) for p in (   # DOTALL: usage ids may hold newlines
    r"malformed uuid element",
    r"(volume|Ceph|iSCSI|TLS|vTPM) usage specified, but (volume path|name|target) is missing",
    r"a secret with UUID [0-9a-f-]{36} (is )?already defined for use with .*",
    r"cannot change private flag on existing secret",
)]


def internal_error_ok(message: str) -> bool:
    return any(p.fullmatch(message) for p in LIBVIRT_INTERNAL)



# ---------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class Result:
    name: str                      # "XML parser", "secret.conf", ...
    tried: int = 0
    failures: int = 0
    examples: list[str] = field(default_factory=list)
    seen: Counter = field(default_factory=Counter)   # outcome kinds, for -v
    detail: Counter = field(default_factory=Counter)  # (what, outcome), for -v
    kinds: Counter = field(default_factory=Counter)   # failure kind -> count
    failed: list[tuple[str, str]] = field(default_factory=list)   # (kind, text), the first 1000
    quiet: bool = False

    def fail(self, what: str, data: Any, kind: str | None = None) -> None:
        """Count a failure; print the first three of each kind with their input."""
        self.failures += 1
        kind = kind or what.split(":")[0].split(" (")[0][:80]
        self.kinds[kind] += 1
        text = f"FAIL [{self.name}] {what}\n    input: {_short(data)}"
        if len(self.failed) < 1000:
            self.failed.append((kind, text))
        if self.kinds[kind] <= 3:
            self.examples.append(text)
            if not self.quiet:
                print(text, file=sys.stderr, flush=True)

    def rows(self, prefix: str = "fuzz") -> list[tuple[str, object, str]]:
        return [(f"{prefix}: {self.name} inputs", self.tried, "-"),
                (f"{prefix}: {self.name} failures", self.failures, "0")]


def _short(data: Any, limit: int = 1500) -> str:
    r = repr(data)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} chars in all)"


class _Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise _Hang in the main thread after `seconds` (Python-level loops), and as a last
    resort dump every stack and exit if even that does not return (a hang in C code)."""
    main = threading.current_thread() is threading.main_thread()
    faulthandler.dump_traceback_later(max(60.0, seconds * 20), exit=True)
    if main:
        def on_alarm(signum, frame):
            raise _Hang(f"no result within {seconds} s")
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()


def _bind(fn: Callable, first: Any, *, res: Result) -> Callable:
    """fn(first, example, res) as a one-argument function hypothesis can wrap."""
    def test(case):
        fn(first, case, res)
    return test


@contextlib.contextmanager
def quiet_logs():
    """The code under test logs every skipped file and unknown key: format each record (a
    formatting error, or a value in a message, is a failure) but print none."""
    lg = logging.getLogger("secretbus")
    old = lg.level, lg.propagate
    handler = _FormatOnly()
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old[0])
        lg.propagate = old[1]


LOG_PROBLEMS: list[str] = []
# Made at run time: hypothesis mines string literals from this file for its inputs, and an
# input that holds a marker would look like a leak.
_RUN_TAG = os.urandom(6).hex()
LEAK_MARKERS = (f"good-{_RUN_TAG}", f"value-{_RUN_TAG}")


class _FormatOnly(logging.Handler):
    def emit(self, record) -> None:
        try:
            text = self.format(record)
        except Exception as e:  # noqa: BLE001
            LOG_PROBLEMS.append(f"log record {record.msg!r} does not format: {type(e).__name__}: {e}")
            return
        if any(m in text for m in LEAK_MARKERS):
            LOG_PROBLEMS.append(f"a value in a log line: {text[:300]!r}")


def collect_log_problems(res: Result) -> None:
    while LOG_PROBLEMS:
        res.fail(LOG_PROBLEMS.pop(0), None, kind="log record")


def drive(test: Callable, strategies: tuple, n: int, seed: int | None) -> None:
    """Run hypothesis `@given(*strategies)` on `test` for `n` examples, no shrinking."""
    s = settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                 suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    fn = s(given(*strategies)(test))
    if seed is not None:
        fn = hseed(seed)(fn)
    with quiet_logs():
        fn()


# ---------------------------------------------------------------------------------------
# shared strategies

UUID_POOL = ["f52a81b2-424e-490c-823d-6bd4235bc572", "1b40a534-8301-45d5-b1aa-11894ebb1735",
             "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f", "22e1353d-c27e-4d6d-bf15-465053e6ba0b",
             "7f4ab7a8-9d3c-4f7e-9d1f-2b1c0e0f1a2b", "00000000-0000-0000-0000-000000000000",
             "ffffffff-ffff-ffff-ffff-ffffffffffff", "3c4a9e2d-5b6f-4a7c-8d9e-0f1a2b3c4d5e"]
USAGE_POOL = {"volume": ["/var/lib/libvirt/images/a.img", "/img/b.img", "C:\\x", "rel/path"],
              "ceph": ["client.admin secret", "client.admin", "pool/x"],
              "iscsi": ["iqn.2013-07.com.example:iscsi-pool", "iqn.x"],
              "tls": ["tls-1", "client.admin"], "vtpm": ["vtpm-1", "VTPM example"]}
USAGE_CHILD = {"volume": "volume", "ceph": "name", "iscsi": "target", "tls": "name", "vtpm": "name"}

# Text any D-Bus string can carry: no NUL, no lone surrogates.
DBUS_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
dbus_text = st.text(alphabet=DBUS_CHAR, max_size=40)

XML_TOKENS = [
    "<", ">", "</", "/>", "&", "&amp;", "&lt;", "&#0;", "&#x1;", "&#xD800;", "&#x110000;", "&#65;",
    "&#13;", "&unknown;", "'", '"', "=", "]]>", "<![CDATA[x]]>", "<!-- c -->", "<!--", "-->", "<?pi x?>",
    "<?xml version='1.0'?>", "<?xml version='1.0' encoding='ISO-8859-1'?>", "<?xml version='1.1'?>",
    "<?xml version='1.0' encoding='UTF-16'?>", "<?xml version='1.0' encoding='EBCDIC'?>",
    "<!DOCTYPE secret>", "<!DOCTYPE secret [<!ENTITY a 'b'>]>", "&a;",
    "<!DOCTYPE secret SYSTEM 'file:///etc/passwd'>",
    "<!DOCTYPE s [<!ENTITY x SYSTEM 'file:///etc/shadow'>]>&x;",
    "<!DOCTYPE s [<!ENTITY % p SYSTEM 'http://127.0.0.1:1/x'> %p;]>",
    "<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd' parse='text'/>",
    " xmlns='urn:x'", " xmlns:a='urn:a'", "a:", " a:b='1'", "\ufeff", "\x00", "\r", "\r\n", "\t",
    "\u2028", "\uffff", "\U0001F511", "é", " ephemeral='yes'", " private='yes'", " ephemeral='maybe'",
    "<uuid>", "</uuid>", "<usage type='volume'>", "<usage type='none'>", "<usage type=''>",
    "<usage>", "</usage>", "<volume>", "<name>", "<target>", "<description>", "<secret>", "</secret>",
]


def _uuid_variants(u: str) -> list[str]:
    hexs = u.replace("-", "")
    return [u, u.upper(), hexs, f" {u}\n", " ".join(re.findall("..", hexs)), u[:-1], u + "0",
            u.replace("-", "_"), "-".join(re.findall("..", hexs))]


any_uuid = st.one_of(st.sampled_from(UUID_POOL), st.uuids().map(str))
uuid_texts = st.one_of(any_uuid, any_uuid.flatmap(lambda u: st.sampled_from(_uuid_variants(u))),
                       dbus_text, st.text(alphabet="0123456789abcdefABCDEF- ", max_size=40))


# Structural choices (which branch, which method, how many edits) come from a Random that
# hypothesis seeds per example: its own small-integer draws lean hard towards 0, which
# made "rare" branches the common ones. Values (text, bytes, numbers) still come from
# hypothesis's strategies.
randoms = st.randoms(use_true_random=True)


@st.composite
def secret_documents(draw: st.DrawFn) -> str:
    """Valid-looking secret XML: half of them within libvirt's grammar ("clean"), half with
    wrong attribute values, bad uuids, missing or misnamed usage children."""
    r = draw(randoms)
    clean = r.random() < 0.5
    q = r.choice(["'", '"'])
    attrs = []
    for name in ("ephemeral", "private"):
        v = r.choice(["yes", "no", "no", None] + ([] if clean else [None, "", "YES", "1"]))
        if v is not None:
            attrs.append(f" {name}={q}{v}{q}")
    if r.random() < 0.1:
        attrs.append(f" junk={q}x{q}")
    r.shuffle(attrs)
    parts = []
    if clean or r.random() < 0.85:
        if r.random() < 0.4:
            u = r.choice(UUID_POOL)
        elif clean:
            u = r.choice(_uuid_variants(str(draw(st.uuids())))[:5])
        else:
            u = draw(uuid_texts)
        parts.append(f"<uuid>{_esc(u)}</uuid>")
    if r.random() < 0.5:
        parts.append(f"<description>{_esc(draw(dbus_text))}</description>")
    kind = r.choice([*USAGE_CHILD, *USAGE_CHILD, "none", None, None] + ([] if clean else ["passphrase", ""]))
    if kind is not None:
        if kind in USAGE_CHILD:
            child = USAGE_CHILD[kind] if clean or r.random() < 0.9 else r.choice(list(USAGE_CHILD.values()))
            if r.random() < 0.4:
                uid = r.choice(USAGE_POOL[kind])
            else:
                uid = _esc(draw(dbus_text)) or "x" if clean else r.choice([_esc(draw(dbus_text)), ""])
            inner = f"<{child}>{uid}</{child}>" if clean or r.random() < 0.9 else ""
        else:
            inner = ""
        parts.append(f"<usage type={q}{kind}{q}>{inner}</usage>")
    if r.random() < 0.1:
        parts.append("<other>ignored</other>")
    r.shuffle(parts)
    sep = r.choice(["", "\n  ", " ", "\r\n"])
    return f"<secret{''.join(attrs)}>{sep}{sep.join(parts)}{sep}</secret>{r.choice(['', chr(10)])}"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;")


BIG_TOKENS = ["<a>" * 300, "<a " + "b='1' " * 200 + ">", "x" * 5000, "&#x41;" * 500, "<a>" * 10000]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """`base` with 1-4 random edits: delete / duplicate / move spans, insert tokens or chars."""
    s = draw(base)
    r = draw(randoms)
    for _ in range(r.randint(1, 4)):
        n = len(s)
        i = r.randint(0, n)
        j = r.randint(i, min(n, i + 40))
        op = r.randrange(8)
        if op == 0:
            s = s[:i] + s[j:]
        elif op == 1:
            s = s[:j] + s[i:j] + s[j:]
        elif op in (2, 3):
            s = s[:i] + r.choice(XML_TOKENS) + s[i:]
        elif op == 4:
            s = s[:i] + draw(st.text(min_size=1, max_size=4)) + s[j:]
        elif op == 5:
            s = s[:i] + s[i:j].swapcase() + s[j:]
        elif op == 6:
            k = r.randint(0, n)
            a, b = sorted((i, k))
            s = s[b:] + s[a:b] + s[:a]
        else:
            s = s[:i] + r.choice(BIG_TOKENS) + s[i:]
    return s


# ---------------------------------------------------------------------------------------
# XML parser


def _xml_inputs() -> st.SearchStrategy:
    text_docs = st.one_of(secret_documents(), mutated(secret_documents()))
    return st.one_of(
        text_docs,                                                     # str
        st.tuples(text_docs, st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"]))
        .map(lambda t: t[0].encode(t[1], "surrogatepass") if t[1] != "latin-1"
             else t[0].encode("latin-1", "replace")),                  # bytes in some encoding
        st.binary(max_size=600),
        st.text(max_size=300),
        st.sampled_from([b"", "", b"\x00", "<secret/>", b"<secret/>\x00", "<secret>" + "x" * MAX_XML_BYTES
                         + "</secret>", b"<secret>" + b"\xc3\xa9" * (MAX_XML_BYTES // 2) + b"</secret>"]),
    )


FOREIGN = "root:x:0:0"   # /etc/passwd's first line: documents refer to that file


def check_xml(data: str | bytes, res: Result) -> None:
    for validate in (False, True):
        res.tried += 1
        t0 = time.monotonic()
        try:
            with deadline(SLOW * 5):
                d = parse_secret_xml(data, validate=validate)
        except errors.SecretError as e:
            res.seen[type(e).__name__] += 1
            if not isinstance(e.message, str) or (type(e) is errors.InternalError
                                                  and not internal_error_ok(e.message)):
                res.fail(f"unexpected InternalError text {e.message!r} (validate={validate})", data)
            continue
        except _Hang:
            res.fail(f"hang (validate={validate})", data)
            continue
        except Exception as e:  # noqa: BLE001 - the point of fuzzing
            res.fail(f"{type(e).__name__}: {e} (validate={validate})", data)
            continue
        finally:
            if time.monotonic() - t0 > SLOW:
                res.fail(f"slow: {time.monotonic() - t0:.1f} s (validate={validate})", data)
        res.seen["parsed"] += 1
        # (hypothesis mines string constants from this file, so the text may be in the input itself)
        texts = [data] if isinstance(data, str) else [data.decode(e, "replace") for e in ("utf-8", "utf-16", "latin-1")]
        if any(FOREIGN in (v or "") for v in (d.description, d.usage_id)) and not any(FOREIGN in t for t in texts):
            res.fail("the parser read a file the document referred to (XXE / XInclude)", data)
        try:
            again = parse_secret_xml(format_secret_xml(d))
            if again != d:
                res.fail(f"format/parse changed the definition: {d!r} -> {again!r}", data)
        except Exception as e:  # noqa: BLE001
            res.fail(f"format/parse of a parsed definition failed: {type(e).__name__}: {e}", data)


def fuzz_xml(n: int, seed: int | None = None, quiet: bool = False) -> Result:
    res = Result("XML parser", quiet=quiet)
    drive(lambda data: check_xml(data, res), (_xml_inputs(),), n, seed)
    collect_log_problems(res)
    return res


# ---------------------------------------------------------------------------------------
# secret.conf

CONF_KEYS = ["encrypt_data", "secrets_encryption_key", "encryption_scheme", "private_value_readers"]
CONF_TOKENS = [*CONF_KEYS, "x", "a1_", "_bad", "1abc", "=", " = ", ";", "#", "# c\n", "\n", "\r\n", "\r", " ",
               "\t", '"', "'", '"""', "[", "]", ",", "0", "1", "-1", "+7", "99999999999999999999", "-", "+",
               '"aes256gcm"', "'aes256cbc'", '"/key"', '"rel"', '""', "[]", '["root", 0]', '[ "a",\n 1, ]',
               '"""multi\nline"""', "\x00", "\ufeff", "é", "٣", "²", "\u2028", "\x0b", "\x0c"]

KEY_PATHS = ["/nonexistent/key", "/dev/null", "/", "/proc/self/mem", "/etc/hostname"]


PATH_CHARS = "abcXYZ019 ._-/#;'[]=,\t" + "\u00e9\u4e2d\U0001F511"
NAME_CHARS = "abcdefgh_-.0123456789"


@st.composite
def valid_confs(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A well-formed secret.conf and what it must parse to (choices from a hypothesis Random:
    a few draws instead of dozens keeps generation cheap)."""
    r = draw(randoms)
    chosen = r.sample(CONF_KEYS, r.randint(0, 4))
    expect: dict[str, Any] = {}
    lines = []
    for k in chosen:
        if k == "encrypt_data":
            v = r.choice([0, 1])
            expect[k], text = bool(v), r.choice([str(v), f"+{v}"])
        elif k == "secrets_encryption_key":
            p = "/" + "".join(r.choice(PATH_CHARS) for _ in range(r.randint(0, 20)))
            expect[k], text = p, f'"{p}"'
        elif k == "encryption_scheme":
            v = r.choice(["aes256gcm", "aes256cbc"])
            expect[k], text = v, r.choice([f'"{v}"', f"'{v}'", f'"""{v}"""'])
        else:
            items = [r.choice([r.randint(0, 2**32 - 2), r.choice([0, 2**32 - 2]),
                               "".join(r.choice(NAME_CHARS) for _ in range(r.randint(1, 8)))])
                     for _ in range(r.randint(0, 4))]
            expect[k] = tuple(items)
            sep = r.choice([", ", ",\n  ", " ,", ",\r\n\t"])
            body = sep.join(str(i) if isinstance(i, int) else r.choice(['"%s"', "'%s'"]) % i for i in items)
            trail = r.choice(["", ","]) if items else ""
            text = f"[{r.choice(['', ' ', chr(10)])}{body}{trail}]"
        eq = r.choice(["=", " = ", "\t=  "])
        comment = r.choice(["", "  # note", " #", " # a = [1"]) if "\n" not in text else ""
        lines.append(f"{k}{eq}{text}{comment}")
    all_lines = lines + [r.choice(["", "# comment", "   ", "\t# x = 1"]) for _ in range(r.randint(0, 3))]
    r.shuffle(all_lines)
    if r.random() < 0.2 and len(lines) > 1:     # two statements on one line
        all_lines = [";".join(all_lines[:2])] + all_lines[2:] if all_lines[0] in lines and all_lines[1] in lines \
            and "\n" not in all_lines[0] + all_lines[1] and "#" not in all_lines[0] else all_lines
    return r.choice(["\n", "\r\n"]).join(all_lines) + r.choice(["", "\n"]), expect


@st.composite
def conf_soup(draw: st.DrawFn) -> str:
    """Tokens of the virConf grammar in random order, with a little random text."""
    r = draw(randoms)
    out = [r.choice(CONF_TOKENS) for _ in range(r.randint(0, 30))]
    if r.random() < 0.3:
        out.insert(r.randint(0, len(out)), draw(st.text(max_size=4)))
    return "".join(out)


_CONF_PREFIX = re.compile(r"^(.*?):(\d+): ", re.DOTALL)


def _check_conf_error(e: errors.SecretError, path: str, text_lines: int, data: Any, res: Result) -> None:
    if type(e) is not errors.ConfigError:
        res.fail(f"parse raised {type(e).__name__}, not ConfigError: {e.message!r}", data)
        return
    m = _CONF_PREFIX.match(e.message)
    if not m or m.group(1) != path or not 1 <= int(m.group(2)) <= text_lines:
        res.fail(f"error without a valid '{path}:<line>: ' prefix: {e.message!r}", data)


def _after_parse(conf: SecretConf, data: Any, res: Result) -> None:
    try:
        resolve_readers(conf)
    except errors.ConfigError:
        pass
    except Exception as e:  # noqa: BLE001
        res.fail(f"resolve_readers: {type(e).__name__}: {e}", data, kind=f"resolve_readers raised {type(e).__name__}")
    try:
        codecs_for(conf, {})
    except (errors.ConfigError, errors.InvalidEncrKey):
        pass
    except Exception as e:  # noqa: BLE001
        res.fail(f"codecs_for: {type(e).__name__}: {e}", data, kind=f"codecs_for raised {type(e).__name__}")


def check_conf(case: tuple[str, Any], res: Result, tmp: Path) -> None:
    kind, data = case
    res.tried += 1
    t0 = time.monotonic()
    try:
        with deadline(SLOW * 5):
            if kind == "bytes":
                p = tmp / "secret.conf"
                p.write_bytes(data)
                path, lines = str(p), data.count(b"\n") + 1
                conf = load_conf(p)
            else:
                text = data[0] if kind == "valid" else data
                path, lines = "<string>", text.count("\n") + 1
                conf = parse_conf(text)
    except _Hang:
        res.fail("hang", data)
        return
    except errors.SecretError as e:
        res.seen[type(e).__name__] += 1
        if kind == "valid":
            res.fail(f"well-formed file refused: {e.message!r}", data)
        else:
            _check_conf_error(e, path, lines, data, res)
        return
    except Exception as e:  # noqa: BLE001
        res.fail(f"{type(e).__name__}: {e}", data)
        return
    finally:
        if time.monotonic() - t0 > SLOW:
            res.fail(f"slow: {time.monotonic() - t0:.1f} s", data)
    res.seen["parsed"] += 1
    if kind == "valid":
        got = {k: getattr(conf, k) for k in data[1]}
        if got != data[1]:
            res.fail(f"well-formed file read wrongly: {got!r} != {data[1]!r}", data)
    _after_parse(conf, data, res)


def _conf_inputs() -> st.SearchStrategy:
    soup = conf_soup()
    with_paths = st.tuples(st.sampled_from(KEY_PATHS), st.sampled_from(["0", "1", ""])).map(
        lambda t: f'secrets_encryption_key = "{t[0]}"\n' + (f"encrypt_data = {t[1]}\n" if t[1] else ""))
    return st.one_of(
        st.tuples(st.just("text"), soup),
        st.tuples(st.just("text"), st.text(max_size=200)),
        st.tuples(st.just("text"), with_paths),
        st.tuples(st.just("valid"), valid_confs()),
        st.tuples(st.just("text"), st.tuples(valid_confs(), st.integers(0, 400), st.sampled_from(CONF_TOKENS))
                  .map(lambda t: t[0][0][:t[1]] + t[2] + t[0][0][t[1]:])),
        st.tuples(st.just("bytes"), st.one_of(st.binary(max_size=200),
                                              soup.map(lambda s: s.encode("utf-8", "surrogatepass")),
                                              st.tuples(soup, st.binary(max_size=3))
                                              .map(lambda t: t[0].encode("utf-8", "surrogatepass") + t[1]))),
    )


def fuzz_conf(n: int, seed: int | None = None, quiet: bool = False) -> Result:
    res = Result("secret.conf", quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="sb-fuzz-conf-") as tmp:
        drive(lambda case: check_conf(case, res, Path(tmp)), (_conf_inputs(),), n, seed)
    collect_log_problems(res)
    return res


# ---------------------------------------------------------------------------------------
# value files

KEY = hashlib.sha256(b"secretbus fuzz key").digest()
OTHER_KEY = hashlib.sha256(b"another key").digest()


def _codecs() -> dict[str, Any]:
    return {"base64": Base64Codec(), "aes256gcm": GcmCodec(KEY), "aes256cbc": CbcCodec(KEY)}


values_st = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\x00" * 65536]),
                      st.integers(0, 65536).map(lambda n: os.urandom(n)))


@st.composite
def value_file_cases(draw: st.DrawFn, suffix: str) -> tuple[str, bytes | None, str, bytes]:
    """(kind, original value or None, uuid, file content)."""
    u = draw(st.sampled_from(UUID_POOL))
    kind = draw(st.sampled_from(["random", "b64-random", "mutated", "mutated-raw", "roundtrip", "foreign"]))
    if kind == "random":
        return kind, None, u, draw(st.binary(max_size=300))
    if kind == "b64-random":
        raw = draw(st.one_of(st.binary(max_size=120), st.binary(max_size=40).map(lambda b: b"SBG1" + b)))
        return kind, None, u, base64.b64encode(raw) + draw(st.sampled_from([b"", b"\n", b" ", b"="]))
    v = draw(values_st)
    codec = _codecs()[suffix]
    if kind == "roundtrip":
        return kind, v, u, codec.encode(Binding(u), v)
    if kind == "foreign":   # right format, other key or other format
        other = draw(st.sampled_from([GcmCodec(OTHER_KEY), CbcCodec(OTHER_KEY), Base64Codec(),
                                      GcmCodec(KEY), CbcCodec(KEY)]))
        return kind, v, u, other.encode(Binding(draw(st.sampled_from(UUID_POOL))), v)
    enc = codec.encode(Binding(u), v)
    if kind == "mutated-raw":   # edit the decoded bytes, re-encode: reaches the crypto layer
        raw = bytearray(base64.b64decode(enc))
        i = draw(st.integers(0, len(raw)))
        op = draw(st.integers(0, 2))
        if op == 0 and i < len(raw):
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del raw[i:]
        else:
            raw[i:i] = draw(st.binary(min_size=1, max_size=16))
        return kind, v, u, base64.b64encode(bytes(raw))
    i = draw(st.integers(0, len(enc)))
    j = draw(st.integers(i, min(len(enc), i + 8)))
    return kind, v, u, enc[:i] + draw(st.binary(max_size=4)) + enc[j:]


def check_value(suffix: str, case: tuple, res: Result) -> None:
    kind, orig, u, data = case
    codec = _codecs()[suffix]
    res.tried += 1
    try:
        out = codec.decode(Binding(u), data)
    except ValueFileError as e:
        res.seen[e.damage.name] += 1
        if kind == "roundtrip":
            res.fail(f"round trip refused: {e}", (kind, u, data))
        return
    except Exception as e:  # noqa: BLE001
        res.fail(f"decode raised {type(e).__name__}: {e}", (kind, u, data))
        return
    res.seen["decoded"] += 1
    if not isinstance(out, bytes):
        res.fail(f"decode returned {type(out).__name__}", (kind, u, data))
    elif kind == "roundtrip" and out != orig:
        res.fail("round trip returned another value", (kind, u, data))
    elif suffix == "aes256gcm" and kind in ("mutated", "mutated-raw") and out != orig:
        res.fail("GCM returned a wrong value for a modified file", (kind, u, data))
    if suffix == "aes256gcm":
        for other in UUID_POOL[:2]:
            if other == u:
                continue
            try:
                codec.decode(Binding(other), data)
                res.fail(f"GCM file decoded under another uuid {other}", (kind, u, data))
            except ValueFileError:
                pass
            except Exception as e:  # noqa: BLE001
                res.fail(f"decode raised {type(e).__name__}: {e}", (kind, other, data))


def fuzz_values(n: int, seed: int | None = None, quiet: bool = False) -> list[Result]:
    out = []
    for suffix in ("base64", "aes256gcm", "aes256cbc"):
        res = Result(f"value files .{suffix}", quiet=quiet)
        drive(_bind(check_value, suffix, res=res), (value_file_cases(suffix),), n, seed)
        out.append(res)
    # NoKeyCodec: every content is NO_KEY.
    res = out[1]
    for data in (b"", b"x", base64.b64encode(os.urandom(64))):
        res.tried += 1
        try:
            NoKeyCodec("aes256gcm").decode(Binding(UUID_POOL[0]), data)
            res.fail("NoKeyCodec decoded something", data)
        except ValueFileError:
            pass
    return out


# ---------------------------------------------------------------------------------------
# store loading

GOOD_UUID = "9d3f0a5c-1111-4222-8333-944455556666"   # outside UUID_POOL: random names never hit it
GOOD_VALUE = LEAK_MARKERS[0].encode() + b" \x00\xff"
SUFFIXES = ["xml", "aes256gcm", "aes256cbc", "base64"]


@st.composite
def store_entries(draw: st.DrawFn, specials: bool) -> list[tuple[str, str, Any]]:
    """[(file name, kind, payload)] for one directory; kinds: file, symlink, dir, fifo, sparse."""
    entries: dict[str, tuple[str, Any]] = {}
    for _ in range(draw(st.integers(0, 10))):
        u = draw(st.sampled_from(UUID_POOL[:4]))
        sfx = draw(st.sampled_from(SUFFIXES + ["xml.new", "aes256gcm.new", "XML", "tmp", ""]))
        name = draw(st.one_of(
            st.just(f"{u}.{sfx}" if sfx else u),
            st.just(f"{u.upper()}.{sfx}"),
            st.text(alphabet="abcdef0123456789-._~ %", min_size=1, max_size=30)
            .filter(lambda s: s not in (".", "..")),
            st.tuples(st.binary(min_size=1, max_size=12), st.sampled_from([b"", b".xml", b".new", b".base64"]))
            .map(lambda t: (t[0].replace(b"/", b"_").replace(b"\0", b"_") + t[1]).decode("utf-8", "surrogateescape"))
            .filter(lambda s: s not in (".", "..")),   # not UTF-8: listdir gives surrogate escapes
        ))
        if name.startswith(GOOD_UUID):
            continue
        kinds = ["file"] * 8 + ["symlink", "sparse"] + (["dir", "fifo"] if specials else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "file":
            content = draw(st.one_of(
                st.binary(max_size=200),
                st.tuples(secret_documents(), st.sampled_from(UUID_POOL[:4] + [None]))
                .map(lambda t: (t[0] if t[1] is None else
                                f"<secret><uuid>{t[1]}</uuid></secret>").encode("utf-8", "surrogatepass")),
                mutated(st.just(format_secret_xml(_good_def(u)))).map(lambda s: s.encode("utf-8", "surrogatepass")),
                st.just(format_secret_xml(_good_def(u)).encode()),
                st.tuples(st.sampled_from(list(_codecs().values()) + [GcmCodec(OTHER_KEY)]),
                          st.sampled_from(UUID_POOL[:4]), values_st)
                .map(lambda t: t[0].encode(Binding.of(_good_def(t[1])), t[2])),
            ))
        elif kind == "symlink":
            content = draw(st.sampled_from(["/etc/passwd", "nonexistent", f"{GOOD_UUID}.xml", ".", "/dev/zero"]))
        elif kind == "sparse":
            content = draw(st.sampled_from([1024 * 1024 + 1, 8 * 1024 * 1024]))
        else:
            content = None
        entries[name] = (kind, content)
    return [(k, *v) for k, v in entries.items()]


def _good_def(u: str):
    from secretbus.core.model import SecretDef, UsageType
    return SecretDef(uuid=u, description="d", usage_type=UsageType.VOLUME, usage_id=f"/img/{u}.img")


def _snapshot(d: Path) -> dict[str, tuple]:
    snap = {}
    for name in os.listdir(d):
        st_ = os.lstat(d / name)
        if stat.S_ISREG(st_.st_mode):
            snap[name] = ("file", st_.st_size, hashlib.sha256((d / name).read_bytes()).hexdigest()
                          if st_.st_size < 1 << 20 else None)
        elif stat.S_ISLNK(st_.st_mode):
            snap[name] = ("link", os.readlink(d / name))
        else:
            snap[name] = (stat.S_IFMT(st_.st_mode),)
    return snap


def check_store(entries: list, res: Result, base: Path, encrypted: bool) -> None:
    from secretbus.driver.build import open_instance
    from secretbus.store.paths import InstancePaths
    res.tried += 1
    root = Path(tempfile.mkdtemp(dir=base))
    sdir = root / "etc" / "secrets"
    sdir.mkdir(parents=True)
    try:
        gcm = GcmCodec(KEY)
        (sdir / f"{GOOD_UUID}.xml").write_text(format_secret_xml(_good_def(GOOD_UUID)))
        (sdir / f"{GOOD_UUID}.aes256gcm" if encrypted else sdir / f"{GOOD_UUID}.base64").write_bytes(
            gcm.encode(Binding.of(_good_def(GOOD_UUID)), GOOD_VALUE) if encrypted else base64.b64encode(GOOD_VALUE))
        for name, kind, payload in entries:
            p = sdir / name
            if kind == "file":
                p.write_bytes(payload)
            elif kind == "symlink":
                os.symlink(payload, p)
            elif kind == "dir":
                p.mkdir()
            elif kind == "fifo":
                os.mkfifo(p)
            else:
                with open(p, "wb") as f:
                    f.truncate(payload)
        before = _snapshot(sdir)
        keyfile = root / "key"
        keyfile.write_bytes(KEY)
        keyfile.chmod(0o600)
        conf = SecretConf(secrets_encryption_key=str(keyfile)) if encrypted else SecretConf()
        box: dict[str, Any] = {}

        def load():
            try:
                drv = open_instance(InstancePaths.embed(root), conf=conf, environ={}, take_lock=False)
                box["served"] = {d.uuid: d for d in drv.list_secrets()}
                box["values"] = {}
                for u in box["served"]:
                    try:
                        box["values"][u] = drv.get_value(u, internal_call=True)
                    except errors.NoSecret:
                        box["values"][u] = None
                box["skipped"] = drv.skipped()
                drv.close()
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        t = threading.Thread(target=load, daemon=True)
        t.start()
        t.join(0.05)
        end = time.monotonic() + LOAD_TIMEOUT
        stuck: set[str] = set()
        while t.is_alive() and time.monotonic() < end:
            # A reader blocked in open() on a FIFO: opening it for writing succeeds only
            # then (ENXIO otherwise), and closing it again lets the reader go on (EOF).
            for name in os.listdir(sdir):
                with contextlib.suppress(OSError):
                    if stat.S_ISFIFO(os.lstat(sdir / name).st_mode):
                        os.close(os.open(sdir / name, os.O_WRONLY | os.O_NONBLOCK))
                        stuck.add(name)
            t.join(0.05)
        for name in sorted(stuck):
            res.fail(f"hang: loading blocked opening the FIFO {name!r}", entries,
                     kind="hang: loading blocked opening a FIFO")
        if t.is_alive():
            res.fail(f"hang: loading did not finish within {LOAD_TIMEOUT} s", entries)
            return
        if "error" in box:
            e = box["error"]
            res.fail(f"load raised {type(e).__name__}: {e}", entries)
            return
        res.seen["loaded"] += len(box["served"])
        res.seen["skipped"] += len(box["skipped"])
        after = _snapshot(sdir)
        for name, info in before.items():
            removable = name.endswith(".new") and info[0] == "file"   # only regular temp files are ours
            if name not in after and not removable:
                res.fail(f"file {name!r} ({info[0]}) was deleted", entries)
            elif name in after and after[name] != info:
                res.fail(f"file {name!r} was changed", entries)
            elif removable and name in after:
                res.fail(f"temp file {name!r} left", entries)
        if set(after) - set(before):
            res.fail(f"new files appeared: {sorted(set(after) - set(before))}", entries)
        xml_names = {n for n in before if n.endswith(".xml")}
        skipped_files = {s.file for s in box["skipped"]}
        for name in xml_names:
            u = name[:-4]
            if u not in box["served"] and name not in skipped_files:
                res.fail(f"{name!r} neither served nor reported as skipped", entries)
        for u in box["served"]:
            if f"{u}.xml" not in xml_names:
                res.fail(f"served {u} without {u}.xml", entries)
        if box["values"].get(GOOD_UUID) != GOOD_VALUE:
            res.fail(f"the good secret was lost or changed: {box['values'].get(GOOD_UUID)!r}", entries)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fuzz_store(n: int, seed: int | None = None, quiet: bool = False, specials: bool = True) -> Result:
    """Directories of regular files and symlinks; with `specials` also subdirectories and FIFOs."""
    res = Result("store loading" + (" (+ directories, FIFOs)" if specials else " (files, symlinks)"), quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="sb-fuzz-store-") as base:
        drive(lambda entries, enc: check_store(entries, res, Path(base), enc),
              (store_entries(specials), st.booleans()), n, seed)
    collect_log_problems(res)
    return res


# ---------------------------------------------------------------------------------------
# D-Bus

NAME = "org.libvirt.secret"
CONNECT = "/org/libvirt/secret"
SECRETS = "/org/libvirt/secret/secret"
C_IFACE, S_IFACE = "org.libvirt.Connect", "org.libvirt.Secret"
PROPS, INTRO, PEER, OM = ("org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable",
                          "org.freedesktop.DBus.Peer", "org.freedesktop.DBus.ObjectManager")
FD = "org.freedesktop.DBus.Error."
ALLOWED_FD = {FD + n for n in ("InvalidArgs", "UnknownMethod", "UnknownObject", "UnknownInterface",
                               "UnknownProperty", "PropertyReadOnly")}
MARKER = LEAK_MARKERS[1].encode()   # in the seed secrets' values
# (kind, interface, member) -> (in signature, out signature); kind: connect | secret | any
METHODS = {
    ("connect", C_IFACE, "ListSecrets"): ("u", "ao"),
    ("connect", C_IFACE, "SecretDefineXML"): ("su", "o"),
    ("connect", C_IFACE, "SecretLookupByUUID"): ("s", "o"),
    ("connect", C_IFACE, "SecretLookupByUsage"): ("is", "o"),
    ("connect", OM, "GetManagedObjects"): ("", "a{oa{sa{sv}}}"),
    ("secret", S_IFACE, "GetValue"): ("u", "ay"),
    ("secret", S_IFACE, "SetValue"): ("ayu", ""),
    ("secret", S_IFACE, "GetXMLDesc"): ("u", "s"),
    ("secret", S_IFACE, "Undefine"): ("", ""),
    ("secret", PROPS, "Get"): ("ss", "v"),
    ("secret", PROPS, "GetAll"): ("s", "a{sv}"),
    ("secret", PROPS, "Set"): ("ssv", None),          # never succeeds: all read-only
    ("any", INTRO, "Introspect"): ("", "s"),
    ("any", PEER, "Ping"): ("", ""),
    ("any", PEER, "GetMachineId"): ("", "s"),
}
OUT_SIG = {(i, m): out for (_, i, m), (_, out) in METHODS.items()}
IN_SIG = {(i, m): sig for (_, i, m), (sig, _) in METHODS.items()}


def spath(u: str) -> str:
    return f"{SECRETS}/_{u.replace('-', '_')}"


SEEDS = [  # uuid, xml, value
    (UUID_POOL[0], f"<secret ephemeral='no' private='no'><uuid>{UUID_POOL[0]}</uuid><description>seed</description>"
                   f"<usage type='volume'><volume>/var/lib/libvirt/images/a.img</volume></usage></secret>",
     MARKER + b"-1"),
    (UUID_POOL[1], f"<secret ephemeral='no' private='yes'><uuid>{UUID_POOL[1]}</uuid>"
                   f"<usage type='ceph'><name>client.admin</name></usage></secret>", MARKER + b"-2\x00"),
    (UUID_POOL[2], f"<secret ephemeral='yes' private='no'><uuid>{UUID_POOL[2]}</uuid>"
                   f"<usage type='tls'><name>tls-1</name></usage></secret>", MARKER + b"-3"),
    (UUID_POOL[3], f"<secret ephemeral='no' private='no'><uuid>{UUID_POOL[3]}</uuid>"
                   f"<usage type='iscsi'><target>iqn.x</target></usage></secret>", None),
    (UUID_POOL[4], f"<secret ephemeral='yes' private='yes'><uuid>{UUID_POOL[4]}</uuid></secret>", MARKER + b"-5"),
]

# -- values for arbitrary signatures ------------------------------------------------------

member_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,30}\Z")
iface_names = st.lists(member_names, min_size=2, max_size=4).map(".".join)
path_elements = st.from_regex(r"\A[A-Za-z0-9_]{1,20}\Z")
random_paths = st.lists(path_elements, max_size=5).map(lambda e: "/" + "/".join(e))


def _huge(n: int, alphabet: str = "a<é&") -> str:
    return (alphabet * (n // len(alphabet) + 1))[:n]


BASIC = {
    "y": st.integers(0, 255), "b": st.booleans(), "n": st.integers(-2**15, 2**15 - 1),
    "q": st.integers(0, 2**16 - 1), "i": st.integers(-2**31, 2**31 - 1), "u": st.integers(0, 2**32 - 1),
    "x": st.integers(-2**63, 2**63 - 1), "t": st.integers(0, 2**64 - 1),
    "d": st.floats(allow_nan=True, allow_infinity=True),
    "s": st.one_of(dbus_text, st.sampled_from([_huge(70_000), _huge(1024 * 1024 + 1)])),
    "o": random_paths, "g": st.sampled_from(["", "s", "a{sv}", "(ii)", "aay", "v"]),
}
CONTAINER_TYPES = st.recursive(
    st.sampled_from(list(BASIC) + ["v"]),
    lambda inner: st.one_of(inner.map(lambda t: "a" + t),
                            st.tuples(st.sampled_from(list(BASIC)), inner).map(lambda kv: f"a{{{kv[0]}{kv[1]}}}"),
                            st.lists(inner, min_size=1, max_size=3).map(lambda ts: "(" + "".join(ts) + ")")),
    max_leaves=5)


def value_for(sig: str) -> st.SearchStrategy:
    from dbus_fast.signature import get_signature_tree
    return st.tuples(*[_value_for_type(t) for t in get_signature_tree(sig).types]).map(list)


def _value_for_type(t) -> st.SearchStrategy:
    from dbus_fast import Variant
    tok = t.token
    if tok in BASIC:
        return BASIC[tok]
    if tok == "v":
        return st.sampled_from(list(BASIC) + ["as", "a{sv}", "(si)", "ay"]).flatmap(
            lambda s: _value_for_type(_tree1(s)).map(lambda v: Variant(s, v)))
    if tok == "a":
        child = t.children[0]
        if child.token == "{":
            return st.dictionaries(_value_for_type(child.children[0]), _value_for_type(child.children[1]),
                                   max_size=3)
        if child.token == "y":
            return st.one_of(st.binary(max_size=64), st.sampled_from([b"\x00" * 65537]))
        return st.lists(_value_for_type(child), max_size=3)
    if tok == "(":
        return st.tuples(*[_value_for_type(c) for c in t.children]).map(list)
    raise ValueError(tok)


def _valid_sig(sig: str) -> bool:
    from dbus_fast.signature import get_signature_tree
    try:
        get_signature_tree(sig)
        return True
    except Exception:  # noqa: BLE001
        return False


def _tree1(sig: str):
    from dbus_fast.signature import get_signature_tree
    return get_signature_tree(sig).types[0]


signatures = st.lists(CONTAINER_TYPES, max_size=4).map("".join).filter(lambda s: len(s) < 255)
sig_and_body = signatures.flatmap(lambda s: value_for(s).map(lambda b: (s, b)))

# -- calls --------------------------------------------------------------------------------


@dataclass
class Call:
    path: str
    interface: str | None
    member: str
    signature: str
    body: list
    no_reply: bool = False
    interactive: bool = False
    signal: bool = False          # sent as a unicast signal to the service, not a call

    def __repr__(self) -> str:
        body = _short(self.body, 600)
        return (f"Call(path={self.path!r}, interface={self.interface!r}, member={self.member!r}, "
                f"signature={self.signature!r}, body={body}, no_reply={self.no_reply}, signal={self.signal})")


flags_st = st.one_of(st.just(0), st.integers(0, 16), st.sampled_from([2**31, 2**32 - 1, 0xFFFF, 0x10]),
                     st.integers(0, 2**32 - 1))
usage_types = st.one_of(st.integers(0, 6), st.integers(-2**31, 2**31 - 1))
usage_ids = st.one_of(st.sampled_from([u for v in USAGE_POOL.values() for u in v]), dbus_text)
_XML_ARG_KINDS = [
    (0.55, secret_documents()), (0.3, mutated(secret_documents())), (0.08, dbus_text),
    (0.04, st.sampled_from([_huge(1024 * 1024 + 1), "<secret>" + "x" * (1024 * 1024 - 40) + "</secret>", ""])),
    (1.0, st.sampled_from(UUID_POOL).map(lambda u: f"<secret><uuid>{u}</uuid></secret>")),
]


@st.composite
def xml_args(draw: st.DrawFn) -> str:
    """SecretDefineXML's document: mostly valid-looking, often mutated, sometimes junk or huge;
    NUL and lone surrogates (which no D-Bus string can carry) replaced."""
    x = draw(randoms).random()
    for p, strategy in _XML_ARG_KINDS:  # noqa: B007 - the strategy where the loop stops is used
        if x < p:
            break
        x -= p
    return draw(strategy).replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
value_args = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", MARKER + b"-x"]),
                       st.sampled_from([65535, 65536, 65537, 200_000]).map(lambda n: b"\xa5" * n))
prop_ifaces = st.one_of(st.sampled_from([S_IFACE, "", PROPS, C_IFACE, "org.libvirt.Secret2"]), iface_names)
prop_names = st.one_of(st.sampled_from(["UUID", "UsageID", "UsageType", "Description", "Ephemeral", "Private",
                                        "uuid", ""]), member_names)
variants = _value_for_type(_tree1("v"))

ARG_STRATEGIES = {
    "ListSecrets": st.tuples(flags_st),
    "SecretDefineXML": st.tuples(xml_args(), st.one_of(st.sampled_from([0, 1]), flags_st)),
    "SecretLookupByUUID": st.tuples(uuid_texts),
    "SecretLookupByUsage": st.tuples(usage_types, usage_ids),
    "GetValue": st.tuples(flags_st), "GetXMLDesc": st.tuples(flags_st),
    "SetValue": st.tuples(value_args, st.one_of(st.just(0), flags_st)),
    "Get": st.tuples(prop_ifaces, prop_names), "GetAll": st.tuples(prop_ifaces),
    "Set": st.tuples(prop_ifaces, prop_names, variants),
}

def secret_paths(r=None) -> st.SearchStrategy:
    """Mostly the pool's (existing or not), sometimes random or malformed secret paths."""
    odd = st.one_of(
        st.uuids().map(lambda u: spath(str(u))),
        st.sampled_from(UUID_POOL).map(lambda u: SECRETS + "/_" + u.replace("-", "_").upper()),
        st.sampled_from(UUID_POOL).map(lambda u: f"{SECRETS}/_{u.replace('-', '')}"),
        st.sampled_from(UUID_POOL).map(lambda u: spath(u) + "/child"),
        path_elements.map(lambda e: f"{SECRETS}/_{e}"),
        path_elements.map(lambda e: f"{SECRETS}/{e}"),
    )
    if r is not None and r.random() < 0.75:
        return st.just(spath(r.choice(UUID_POOL)))
    return odd


any_paths = st.one_of(secret_paths(), st.sampled_from(["/", "/org", "/org/libvirt", CONNECT, SECRETS,
                                                      CONNECT + "/x", "/org/libvirt/secretx"]), random_paths)


# How often each method is picked: the ones that parse, write and read most often.
_WEIGHT = {"SecretDefineXML": 8, "SetValue": 4, "GetValue": 3, "SecretLookupByUUID": 2, "SecretLookupByUsage": 2,
           "Undefine": 2, "GetXMLDesc": 2}
WEIGHTED = [k for k in METHODS for _ in range(_WEIGHT.get(k[2], 1))]


@st.composite
def calls(draw: st.DrawFn) -> Call:
    r = draw(randoms)
    flavour = r.random()
    no_reply = r.random() < 0.03
    interactive = r.random() < 0.5
    (kind, iface, member) = r.choice(WEIGHTED)
    sig = METHODS[(kind, iface, member)][0]
    odd_path = r.random() < 0.15
    if kind == "connect":
        path = draw(any_paths) if odd_path else CONNECT
    elif kind == "secret":
        path = draw(any_paths) if odd_path else draw(secret_paths(r))
    else:
        path = r.choice([CONNECT, spath(r.choice(UUID_POOL)), "/", SECRETS]) if r.random() < 0.5 else draw(any_paths)
    if r.random() < 0.1:
        iface = r.choice([None, None, None, C_IFACE, S_IFACE, PROPS, OM, INTRO])
    if flavour < 0.7:         # the right signature, fuzzed arguments
        args = ARG_STRATEGIES.get(member)
        body = list(draw(args)) if args is not None else []
        if body and sig.endswith("u") and r.random() < 0.8:    # mostly valid flags
            body[-1] = 1 if member == "SecretDefineXML" and r.random() < 0.3 else 0
    elif flavour < 0.85:      # a wrong (near-miss or random) signature for a real method
        near = [sig[:-1], sig + "u", sig.replace("u", "i"), sig.replace("s", "o"), sig.replace("ay", "s"),
                "s" * (len(sig) + 1), "v", "as", "a{sv}", "ay", "ayu", "uay", "ss", "ssv"]
        near = [n for n in near if n != sig and _valid_sig(n)]
        sig = r.choice(near) if r.random() < 0.6 else draw(signatures)
        body = draw(value_for(sig))
    else:                     # a random member, maybe a random interface
        member = r.choice([m for (_, _, m) in METHODS]) if r.random() < 0.3 else draw(member_names)
        iface = r.choice([None, C_IFACE, S_IFACE, PROPS, OM, INTRO, PEER]) if r.random() < 0.6 else draw(iface_names)
        sig, body = draw(sig_and_body)
    if r.random() < 0.02:     # a unicast signal that looks like a call (no reply, must be ignored)
        return Call(path, iface or C_IFACE, member, sig, body, True, False, True)
    return Call(path, iface, member, sig, body, no_reply, interactive)


# -- the daemon under test ------------------------------------------------------------------


class DBusTarget:
    """A private bus + secretbusd + a client on an event loop in a thread."""

    def __init__(self, bus=None, start_daemon: Callable | None = None):
        import harness
        self.harness = harness
        self._own_bus = bus is None
        self.bus = bus or harness.PrivateBus("session").start()
        self.base = harness.public_tempdir("sb-fuzz-dbus-")
        self.root = self.base / "root"
        (self.root / "etc").mkdir(parents=True, mode=0o700)
        key = self.root / "key"
        key.write_bytes(KEY)
        key.chmod(0o600)
        self.conf = f'secrets_encryption_key = "{key}"\nprivate_value_readers = [ 0 ]\n'
        self._start_daemon = start_daemon or self._own_daemon
        self.daemons: list = []          # every daemon started, the current one last
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-dbus", daemon=True)
        self.thread.start()
        self.client = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def _own_daemon(self, root: Path, conf: str):
        d = self.harness.Secretbusd(self.bus, root=root, conf=conf)
        self.daemons.append(d)           # before start(): stopped by close() even if start fails
        return d.start()

    @property
    def daemon(self):
        return self.daemons[-1]

    def start(self) -> None:
        d = self._start_daemon(self.root, self.conf)
        if not self.daemons or self.daemons[-1] is not d:
            self.daemons.append(d)
        self.reconnect()

    def restart(self) -> None:
        self.daemon.stop()
        self.start()

    def reconnect(self) -> None:
        from secretbus.bus import connect as busconn  # dbus-fast plus its EAGAIN workaround
        if self.client is not None and self.client.connected:
            self.client.disconnect()
        self.client = self.run(busconn.connect(self.bus.address), 20)

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def alive(self) -> bool:
        return self.daemon.proc.poll() is None

    async def call(self, c: Call):
        from dbus_fast import Message, MessageFlag, MessageType
        if c.signal:
            await asyncio.wait_for(self.client.send(Message(
                message_type=MessageType.SIGNAL, destination=NAME, path=c.path, interface=c.interface,
                member=c.member, signature=c.signature, body=c.body)), CALL_TIMEOUT)
            return None
        flags = MessageFlag.NONE
        if c.no_reply:
            flags |= MessageFlag.NO_REPLY_EXPECTED
        if c.interactive:
            flags |= MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
        msg = Message(destination=NAME, path=c.path, interface=c.interface, member=c.member,
                      signature=c.signature, body=c.body, flags=flags)
        if c.no_reply:
            await asyncio.wait_for(self.client.send(msg), CALL_TIMEOUT)
            return None
        return await asyncio.wait_for(self.client.call(msg), CALL_TIMEOUT)

    def simple(self, path: str, iface: str, member: str, sig: str = "", body: list | None = None):
        from dbus_fast import Message
        return self.run(asyncio.wait_for(self.client.call(Message(
            destination=NAME, path=path, interface=iface, member=member, signature=sig, body=body or [])),
            CALL_TIMEOUT), CALL_TIMEOUT + 5)

    def seed(self) -> None:
        """(Re)define the seed secrets that are gone, so the fuzz keeps hitting live objects."""
        from dbus_fast import MessageType
        for u, xml, value in SEEDS:
            r = self.simple(CONNECT, C_IFACE, "SecretLookupByUUID", "s", [u])
            if r.message_type is MessageType.ERROR:
                r = self.simple(CONNECT, C_IFACE, "SecretDefineXML", "su", [xml, 0])
                if r.message_type is not MessageType.ERROR and value is not None:
                    self.simple(spath(u), S_IFACE, "SetValue", "ayu", [value, 0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.client is not None and self.client.connected:
                self.client.disconnect()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop()
        if self._own_bus:
            self.bus.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def served(path: str) -> bool:
    """Whether secretbus's own handler answers calls to `path` (others fall through to dbus-fast)."""
    return path in ("/", "/org", "/org/libvirt", CONNECT) or path.startswith(CONNECT + "/")


UNSERVED = "a path secretbus does not serve: dbus-fast's default answer"
METHOD_NAMES = {m for (_, _, m) in METHODS}


def judge(c: Call, reply, res: Result) -> None:
    """Classify one reply; count failures."""
    from dbus_fast import MessageType
    if reply is None:
        res.seen["no reply requested"] += 1
        return
    right_sig = any(c.member == m and c.signature == sg for (_, _, m), (sg, _) in METHODS.items())
    res.detail[(c.member if c.member in METHOD_NAMES else "(random member)",
                "right signature" if right_sig else "other signature", reply.error_name or "ok")] += 1
    if reply.message_type is MessageType.ERROR:
        name = reply.error_name or ""
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        res.seen[name] += 1
        if name == "org.libvirt.Error.InternalError":
            if not internal_error_ok(text.removeprefix(errors.InternalError.prefix)):
                res.fail(f"InternalError {text!r}", c, kind=f"InternalError {text[:60]!r}")
        elif not (name.startswith("org.libvirt.Error.") or name in ALLOWED_FD):
            res.fail(f"error name {name} ({text!r})", c,
                     kind=f"error name {name}" if served(c.path) else UNSERVED)
        if MARKER.decode() in text:
            res.fail("a stored value appears in an error message", c)
        return
    res.seen["ok"] += 1
    iface = c.interface
    if iface is None:   # a call without interface: the member names the method
        iface = next((i for (i, m) in OUT_SIG if m == c.member), None)
    in_sig = IN_SIG.get((iface, c.member))
    if in_sig is None or in_sig != c.signature:
        if not served(c.path):
            kind = UNSERVED
        elif iface == INTRO:
            kind = f"{INTRO}.<any member>/<any signature> answered"
        else:
            kind = "a call to no such method (or with the wrong signature) succeeded"
        res.fail(f"a call to no such method (or with the wrong signature) succeeded: reply "
                 f"{reply.signature!r} {_short(reply.body, 200)}", c, kind=kind)
    else:
        want = OUT_SIG[(iface, c.member)]
        if want is None:
            res.fail("a read-only property was set", c)
        elif reply.signature != want:
            res.fail(f"reply signature {reply.signature!r}, expected {want!r}", c)
    if c.member != "GetValue" and MARKER in repr(reply.body).encode("utf-8", "replace"):
        res.fail("a stored value appears in a reply other than GetValue", c)


def fuzz_dbus(n: int, seed: int | None = None, quiet: bool = False, bus=None,
              start_daemon: Callable | None = None) -> Result:
    """`n` calls in batches of 1-3 concurrent calls. `bus`/`start_daemon(root, conf)` let a
    test pass its fixtures; by default a private bus and secretbusd are started here."""
    res = Result("D-Bus calls", quiet=quiet)
    target = DBusTarget(bus, start_daemon)
    try:
        target.seed()
        state = {"batches": 0, "dead": False}

        def one_batch(batch: list[Call]) -> None:
            if state["dead"] or res.tried >= n:
                return
            state["batches"] += 1
            if state["batches"] % 25 == 0:
                target.seed()
            res.tried += len(batch)

            async def go():
                return await asyncio.gather(*(target.call(c) for c in batch), return_exceptions=True)
            try:
                replies = target.run(go(), CALL_TIMEOUT + 10)
            except Exception as e:  # noqa: BLE001
                replies = [e] * len(batch)
            for c, r in zip(batch, replies, strict=True):
                if isinstance(r, asyncio.TimeoutError):
                    res.fail(f"no reply within {CALL_TIMEOUT} s (hang)", c)
                elif isinstance(r, BaseException):
                    # Refused by dbus-fast before sending, or the bus dropped us for it.
                    res.seen[f"not sent: {type(r).__name__}"] += 1
                else:
                    judge(c, r, res)
            if not target.alive():
                res.fail(f"secretbusd died (exit {target.daemon.proc.returncode}); log tail:\n"
                         f"{target.daemon.log()[-2000:]}", batch)
                state["dead"] = True
                return
            if not target.client.connected:
                res.seen["client reconnected"] += 1
                target.reconnect()
            if any(c.no_reply for c in batch):
                r = target.simple(CONNECT, C_IFACE, "ListSecrets", "u", [0])
                judge(Call(CONNECT, C_IFACE, "ListSecrets", "u", [0]), r, res)

        batches = st.lists(calls(), min_size=1, max_size=3)
        while res.tried < n and not state["dead"]:
            before = res.tried
            drive(one_batch, (batches,), max(1, (n - res.tried) // 2), seed)
            if res.tried == before:
                break
        if state["dead"]:
            target.restart()
        _final_checks(target, res)
    finally:
        target.close()
    return res


def _final_checks(target: DBusTarget, res: Result) -> None:
    from dbus_fast import MessageType
    if not target.alive():
        res.fail("secretbusd not alive after the run", None)
        return
    r = target.simple(CONNECT, OM, "GetManagedObjects")
    if r.message_type is MessageType.ERROR:
        res.fail(f"GetManagedObjects after the run: {r.error_name}", None)
        return
    persistent = {props[S_IFACE]["UUID"].value for props in r.body[0].values()
                  if not props[S_IFACE]["Ephemeral"].value}
    res.seen["secrets at the end"] = len(r.body[0])
    _check_store_dir(target.root / "etc" / "secrets", persistent, res)
    target.restart()
    r2 = target.simple(CONNECT, OM, "GetManagedObjects")
    after = {props[S_IFACE]["UUID"].value for props in r2.body[0].values()}
    if after != persistent:
        res.fail(f"after a restart the daemon serves {sorted(after ^ persistent)} differently", None)
    log = target.daemon.log()
    if "skipping secret" in log:
        res.fail("a restart skipped a stored secret: " + "; ".join(
            line for line in log.splitlines() if "skipping secret" in line)[:2000], None)


def _binding_on_disk(sdir: Path, uuid: str) -> Binding:
    """What a value file of `uuid` is bound to: its definition next to it, if it parses."""
    try:
        return Binding.of(parse_secret_xml((sdir / f"{uuid}.xml").read_bytes()))
    except (OSError, errors.SecretError):
        return Binding(uuid)


def _check_store_dir(sdir: Path, persistent: set[str], res: Result) -> None:
    readers = {"aes256gcm": GcmCodec(KEY), "aes256cbc": CbcCodec(KEY), "base64": Base64Codec()}
    # The spare files of a running service (store/commit.py) are earlier contents of its files,
    # kept to be written over: not a leftover. (Start-up removes them, with the temp files.)
    names = [n for n in sorted(os.listdir(sdir)) if not is_spare_name(n)] if sdir.is_dir() else []
    xml_uuids = set()
    for name in names:
        stem, _, sfx = name.partition(".")
        if sfx == "xml":
            try:
                d = parse_secret_xml((sdir / name).read_bytes())
                if d.uuid != stem:
                    res.fail(f"store: {name} holds uuid {d.uuid}", None, kind="store: .xml holds another uuid")
                xml_uuids.add(stem)
            except errors.SecretError as e:
                res.fail(f"store: {name} does not parse: {e.message}", None, kind="store: .xml does not parse")
        elif sfx in readers:
            try:
                v = readers[sfx].decode(_binding_on_disk(sdir, stem), (sdir / name).read_bytes())
                if len(v) > 65536:
                    res.fail(f"store: {name} holds {len(v)} bytes", None, kind="store: oversized value")
            except ValueFileError as e:
                res.fail(f"store: {name} does not decode: {e}", None, kind="store: value file does not decode")
        else:
            res.fail(f"store: unexpected file {name}", None, kind="store: unexpected file (temp file left?)")
    for name in names:
        stem, _, sfx = name.partition(".")
        if sfx in readers and stem not in xml_uuids:
            res.fail(f"store: value file {name} without {stem}.xml", None, kind="store: value file without .xml")
    if xml_uuids != persistent:
        res.fail(f"store: .xml files {sorted(xml_uuids ^ persistent)} differ from the served persistent "
                 "secrets", None, kind="store: .xml files differ from the served persistent secrets")


# ---------------------------------------------------------------------------------------
# atheris (optional)

ATHERIS_TARGETS = ("xml", "conf")


def _atheris_child(target: str, seconds: int, workdir: str) -> None:
    """Runs in a child process: libFuzzer on one parser; any unexpected exception is a crash."""
    import atheris

    from secretbus.core import errors as err
    from secretbus.core import secretxml as xml_mod
    from secretbus.store import conf as conf_mod  # instrumented by _ATHERIS_BOOT

    def xml_one(data: bytes) -> None:
        for doc in (data, data.decode("utf-8", "replace")):
            for validate in (False, True):
                try:
                    d = xml_mod.parse_secret_xml(doc, validate=validate)
                except err.SecretError as e:
                    if type(e) is err.InternalError and not internal_error_ok(e.message):
                        raise AssertionError(f"unexpected InternalError text {e.message!r}") from None
                    continue
                assert xml_mod.parse_secret_xml(xml_mod.format_secret_xml(d)) == d

    def conf_one(data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        try:
            c = conf_mod.parse_conf(text)
        except err.ConfigError as e:
            m = _CONF_PREFIX.match(e.message)
            assert m and m.group(1) == "<string>" and 1 <= int(m.group(2)) <= text.count("\n") + 1, e.message
            return
        try:
            conf_mod.resolve_readers(c)
        except err.ConfigError:
            pass

    fn = xml_one if target == "xml" else conf_one
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
                   f"-artifact_prefix={workdir}/", "-print_final_stats=1", "-max_len=8192"], fn)
    atheris.Fuzz()


# The child instruments secretbus's modules (coverage feedback for libFuzzer) before this
# file imports them; instrumenting everything loaded (hypothesis...) would take a minute.
_ATHERIS_BOOT = """
import sys, atheris
with atheris.instrument_imports(include=["secretbus"]):
    import secretbus.store.conf, secretbus.core.errors, secretbus.core.secretxml
    import secretbus.core.uuids, secretbus.core.model
sys.path.insert(0, sys.argv[1])
import fuzz
fuzz._atheris_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
"""


def fuzz_atheris(seconds: int, quiet: bool = False) -> list[Result]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not importable: skipping the --atheris part", file=sys.stderr)
        return []
    out = []
    for target in ATHERIS_TARGETS:
        res = Result({"xml": "XML parser", "conf": "secret.conf"}[target] + " (atheris)", quiet=quiet)
        with tempfile.TemporaryDirectory(prefix="sb-atheris-") as work:
            p = subprocess.run([sys.executable, "-c", _ATHERIS_BOOT, str(Path(__file__).parent), target,
                                str(seconds), work],
                               capture_output=True, text=True, timeout=seconds + 300, cwd=work)
            m = re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stderr)
            counts = [int(x) for x in re.findall(r"^#(\d+)", p.stderr, re.M)]
            res.tried = int(m.group(1)) if m else max(counts, default=0)
            if p.returncode != 0:
                crash = sorted(Path(work).glob("*-*"))
                data = crash[0].read_bytes() if crash else b""
                tail = "\n".join(p.stderr.splitlines()[-40:])
                res.fail(f"libFuzzer exit {p.returncode}:\n{tail}", data)
        out.append(res)
    return out


# ---------------------------------------------------------------------------------------
# entry points


def run_parts(size: str, parts=PARTS, seed: int | None = None, quiet: bool = False,
              atheris_seconds: int = 0) -> tuple[list[Result], dict[str, float]]:
    n = SIZES[size]
    results: list[Result] = []
    times: dict[str, float] = {}
    for part in parts:
        t = time.monotonic()
        if part == "xml":
            results.append(fuzz_xml(n["xml"], seed, quiet))
        elif part == "conf":
            results.append(fuzz_conf(n["conf"], seed, quiet))
        elif part == "values":
            results.extend(fuzz_values(n["values"], seed, quiet))
        elif part == "store":
            results.append(fuzz_store(n["store"] // 2, seed, quiet, specials=False))
            results.append(fuzz_store(n["store"] // 2, seed, quiet, specials=True))
        elif part == "dbus":
            results.append(fuzz_dbus(n["dbus"], seed, quiet))
        times[part] = time.monotonic() - t
    if atheris_seconds:
        t = time.monotonic()
        results.extend(fuzz_atheris(atheris_seconds, quiet))
        times["atheris"] = time.monotonic() - t
    return results, times


def figures(size: str = "small") -> list[tuple[str, object, str]]:
    """Rows (figure, value, goal) for the reliability table. small ~ 1 min, full ~ 10 min."""
    results, _ = run_parts(size)
    return [row for r in results for row in r.rows()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument("--atheris", type=int, default=0, metavar="SECONDS",
                    help="also run atheris on the XML and conf parsers for SECONDS each")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the outcome kinds of each part")
    a = ap.parse_args(argv)
    parts = [p for p in a.only.split(",") if p]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown parts {sorted(bad)}")
    t0 = time.monotonic()
    results, times = run_parts(a.size, parts, a.seed, atheris_seconds=a.atheris)
    print(f"fuzz (size {a.size}, seed {a.seed if a.seed is not None else 'random'}, "
          f"{time.monotonic() - t0:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ")")
    print("| figure | value | goal |\n|---|---|---|")
    for r in results:
        for name, value, goal in r.rows():
            print(f"| {name} | {value} | {goal} |")
    if a.verbose:
        for r in results:
            if r.seen:
                print(f"\n{r.name}: " + ", ".join(f"{k} {v}" for k, v in r.seen.most_common()))
            for k, v in sorted(r.detail.items()):
                print(f"    {v:6d}  {' / '.join(map(str, k))}")
    failed = [r for r in results if r.failures]
    for r in failed:
        print(f"\n{r.name}: {r.failures} failure(s) of {len(r.kinds)} kind(s):")
        for kind, count in r.kinds.most_common():
            print(f"  {count:6d}  {kind}")
            example = next(t for k, t in r.failed if k == kind)
            print("          e.g. " + example.replace("\n", "\n          ")[:1500])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
