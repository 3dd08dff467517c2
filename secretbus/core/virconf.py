"""libvirt's virConf syntax (virconf.c): the lexer and parser both configuration files use.

secret.conf (store/conf.py) and secretbusd.conf (rpc/serverconf.py) read the same syntax:

    # comment                         whole-line comment
    name = value   # comment          names: a letter, then letters, digits, '_'
    a = 1; b = 2                      ';' also separates statements
    s = "text"  /  s = 'text'         single-line strings, no escapes
    s = \"\"\"multi
    line\"\"\"                            triple-quoted string (may span lines)
    n = 42  /  n = -1  /  n = +1      decimal integers
    l = [ "a", 7,                     lists may span lines; trailing comma allowed
          "b", ]

As in virConf, a comment may not appear inside a multi-line list, and a value may not be left
out: no more lenient than virConf, so that a file secretbus accepts is one libvirt accepts.
Every error is a `ConfigError` whose message starts with "<file>:<line>: ". What the values
mean (duplicates, unknown keys, which type each key takes) is each configuration's own
business; the typed checks both use are at the end.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secretbus.core import errors


@dataclass(frozen=True)
class Value:
    data: str | int | list[Value]
    line: int  # line where the value starts (elements of a multi-line list keep their own)


@dataclass(frozen=True)
class Entry:
    name: str
    value: Value
    line: int


_BLANK = " \t"
_EOL = "\r\n"


class Parser:
    def __init__(self, text: str, path: str):
        self.s = text
        self.i = 0
        self.line = 1
        self.path = path

    # -- helpers ----------------------------------------------------------
    def error(self, what: str, line: int | None = None) -> errors.SecretError:
        return errors.ConfigError(f"{self.path}:{self.line if line is None else line}: {what}")

    @property
    def cur(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def at_end(self) -> bool:
        return self.i >= len(self.s)

    def skip_blanks(self) -> None:
        while not self.at_end() and self.cur in _BLANK:
            self.i += 1

    def skip_blanks_and_eol(self) -> None:
        while not self.at_end() and self.cur in _BLANK + _EOL:
            if self.cur == "\n":
                self.line += 1
            self.i += 1

    def skip_to_eol(self) -> None:
        while not self.at_end() and self.cur not in _EOL:
            self.i += 1

    # -- grammar ----------------------------------------------------------
    def parse(self) -> list[Entry]:
        entries: list[Entry] = []
        while True:
            self.skip_blanks_and_eol()
            if self.at_end():
                return entries
            if self.cur == "#":
                self.skip_to_eol()
                continue
            entries.append(self.statement())
            self.separator()

    def statement(self) -> Entry:
        line = self.line
        name = self.name()
        self.skip_blanks()
        if self.cur != "=":
            raise self.error("expecting an assignment")
        self.i += 1
        self.skip_blanks()
        value = self.value()
        self.skip_blanks()
        if self.cur == "#":
            self.skip_to_eol()
        return Entry(name, value, line)

    def separator(self) -> None:
        self.skip_blanks()
        if self.at_end() or self.cur in _EOL:
            return
        if self.cur == ";":
            self.i += 1
            return
        raise self.error("expecting a separator")

    def name(self) -> str:
        start = self.i
        if not (self.cur.isascii() and self.cur.isalpha()):
            raise self.error("expecting a name")
        while not self.at_end() and self.cur.isascii() and (self.cur.isalnum() or self.cur == "_"):
            self.i += 1
        return self.s[start:self.i]

    def value(self) -> Value:
        line = self.line
        c = self.cur
        if c == "":
            raise self.error("expecting a value")
        if self.s.startswith('"""', self.i):
            return Value(self.triple_string(), line)
        if c in "\"'":
            return Value(self.string(c), line)
        if c == "[":
            return Value(self.list_(), line)
        if (c.isascii() and c.isdigit()) or c in "+-":
            return Value(self.integer(), line)
        raise self.error("expecting a value")

    def string(self, quote: str) -> str:
        self.i += 1
        start = self.i
        while not self.at_end() and self.cur != quote and self.cur not in _EOL:
            self.i += 1
        if self.cur != quote:
            raise self.error("unterminated string")
        text = self.s[start:self.i]
        if "\0" in text:   # no path or user name can hold one; refuse it here, clearly
            raise self.error("NUL character in string")
        self.i += 1
        return text

    def triple_string(self) -> str:
        start_line = self.line
        self.i += 3
        end = self.s.find('"""', self.i)
        if end < 0:
            raise self.error("unterminated string", start_line)
        text = self.s[self.i:end]
        if "\0" in text:
            raise self.error("NUL character in string", start_line)
        self.line += text.count("\n")
        self.i = end + 3
        return text

    def integer(self) -> int:
        start = self.i
        if self.cur in "+-":
            self.i += 1
        if not self.cur.isdigit() or not self.cur.isascii():
            raise self.error("unterminated number")
        while not self.at_end() and self.cur.isascii() and self.cur.isdigit():
            self.i += 1
        return int(self.s[start:self.i])

    def list_(self) -> list[Value]:
        start_line = self.line
        self.i += 1
        items: list[Value] = []
        self.skip_blanks_and_eol()
        while not self.at_end() and self.cur != "]":
            if items:
                if self.cur != ",":
                    raise self.error("expecting a separator in list")
                self.i += 1
                self.skip_blanks_and_eol()
                if self.cur == "]":
                    break  # trailing comma
            if self.at_end():
                break
            items.append(self.value())
            self.skip_blanks_and_eol()
        if self.cur != "]":
            raise self.error("list is not closed with ]", start_line)
        self.i += 1
        return items




def type_name(v: Value) -> str:
    """How an error names a value's type."""
    return {str: "a string", int: "an integer", list: "a list"}[type(v.data)]


def read_options(text: str, path: str, options: Mapping[str, Callable[[Entry, Parser], Any]],
                 log: logging.Logger, *, skip: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Each known key's checked value. A duplicate key is an error (virConf would silently take
    the first); an unknown key is logged and ignored; a key `skip` names is another reader's
    of the same file (secretbusd.conf's fleet keys), left alone."""
    p = Parser(text, path)
    seen: dict[str, int] = {}
    values: dict[str, Any] = {}
    for e in p.parse():
        if e.name in seen:
            raise p.error(f"duplicate key '{e.name}' (first set at line {seen[e.name]})", e.line)
        seen[e.name] = e.line
        if skip is not None and skip(e.name):
            continue
        check = options.get(e.name)
        if check is None:
            log.warning("%s:%d: unknown key '%s' ignored", path, e.line, e.name)
            continue
        values[e.name] = check(e, p)
    return values


def is_fleet_key(name: str) -> bool:
    """secretbusd.conf holds the keys of two readers: fleet mode's `fleet_*` (store/conf.py,
    DESIGN §11) and the server's (rpc/serverconf.py, §10); each skips the other's."""
    return name.startswith("fleet_")


PROTECTED_MAX = 1024 * 1024


def read_protected(path: Path, *, required: bool = False, max_size: int = PROTECTED_MAX) -> str | None:
    """The text of a configuration that grants rights (secretbusd.conf: remote access, the etcd
    a fleet host trusts): a regular file, not a symlink, owned by root or this user and
    writable by nobody else. None if it is missing, unless `required` (named by --config)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if required:
            raise errors.ConfigError(f"Failed to open file '{path}': No such file or directory") from None
        return None
    except OSError as e:
        raise errors.ConfigError(f"Failed to open file '{path}': {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.ConfigError(f"Failed to read file '{path}': not a regular file")
        if st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid()):
            raise errors.ConfigError(f"Failed to read file '{path}': writable by others or not owned "
                                     "by root or this user")
        data = os.read(fd, max_size + 1)
    except OSError as e:
        raise errors.ConfigError(f"Failed to read file '{path}': {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise errors.ConfigError(f"Failed to read file '{path}': larger than {max_size} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise errors.ConfigError(f"{path}:{line}: not valid UTF-8") from None


# -- typed checks shared by both configurations ------------------------------------------------
def string(e: Entry, p: Parser) -> str:
    v = e.value.data
    if not isinstance(v, str):
        raise p.error(f"expected a string for '{e.name}' (got {type_name(e.value)})", e.line)
    return v


def abs_path(e: Entry, p: Parser) -> str:
    v = string(e, p)
    if not v:
        raise p.error(f"'{e.name}' must not be empty", e.line)
    if not v.startswith("/"):
        # A relative path would depend on the daemon's working directory.
        raise p.error(f"'{e.name}' must be an absolute path", e.line)
    return v


def string_list(e: Entry, p: Parser) -> tuple[str, ...]:
    """A list of non-empty strings."""
    if not isinstance(e.value.data, list):
        raise p.error(f"expected a list for '{e.name}' (got {type_name(e.value)})", e.line)
    out = []
    for item in e.value.data:
        if not isinstance(item.data, str) or not item.data:
            raise p.error(f"'{e.name}' entries must be non-empty strings", item.line)
        out.append(item.data)
    return tuple(out)
