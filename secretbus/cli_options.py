"""virsh's command option grammar (tools/vsh.c), its usage errors and its `--help` page.

An option is a bool (`--plain`), a string or a number taking a value (`--file F`,
`--file=F`); a value option that is not `named_only` may also be given positionally, in
definition order. `--` makes every following word data. Usage errors are raised as
`UsageError` with virsh's wording; they happen before any connection is opened.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    BOOL = "bool"
    STRING = "string"
    NUMBER = "number"


@dataclass(frozen=True)
class Opt:
    name: str
    kind: Kind
    help: str
    required: bool = False
    named_only: bool = False      # vsh's VSH_OFLAG_REQ_OPT: only as `--name value`

    @property
    def positional(self) -> bool:
        return self.kind is not Kind.BOOL and not self.named_only


@dataclass(frozen=True)
class CommandDef:
    name: str
    help: str
    desc: str
    opts: tuple[Opt, ...]

    def opt(self, name: str) -> Opt | None:
        return next((o for o in self.opts if o.name == name), None)


class UsageError(Exception):
    """A malformed command line, phrased as virsh prints it (after `error: `)."""


def parse(cmd: CommandDef, words: list[str]) -> dict[str, str | bool] | None:
    """The options given, by name (bools as True, values as str); None for `--help` (vsh parses
    the whole line first: its other usage errors win)."""
    seen: dict[str, str | bool] = {}
    data_only = want_help = False
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if not data_only and w == "--":
            data_only = True
        elif not data_only and w.startswith("--") and len(w) > 2:
            taken = _named_option(cmd, w[2:], words, i, seen)
            if taken is None:       # --help: the rest is still checked, the required options are not
                want_help = True
            else:
                i += taken
        else:
            _positional(cmd, w, seen)
    if want_help:
        return None
    for o in cmd.opts:
        if o.required and o.name not in seen:
            raise UsageError(f"command '{cmd.name}' requires <{o.name}> option")
    return seen


def _named_option(cmd: CommandDef, spec: str, words: list[str], i: int,
                  seen: dict[str, str | bool]) -> int | None:
    """Record `--spec` (words[i] may be its value): how many more words it took, None for --help."""
    name, eq, value = spec.partition("=")
    o = cmd.opt(name)
    if name == "help" or (o is not None and o.kind is Kind.BOOL):
        if eq:
            raise UsageError(f"invalid '=' after option --{name}")
        if name == "help":
            return None
    if o is None:
        raise UsageError(f"command '{cmd.name}' doesn't support option --{name}")
    if name in seen:
        raise UsageError(f"option --{name} already seen")
    if o.kind is Kind.BOOL:
        seen[name] = True
        return 0
    if eq:
        seen[name] = value
        return 0
    if i >= len(words):
        raise UsageError(f"expected syntax: --{name} <{o.kind.value}>")
    seen[name] = words[i]
    return 1


def _positional(cmd: CommandDef, word: str, seen: dict[str, str | bool]) -> None:
    target = next((o for o in cmd.opts if o.positional and o.name not in seen), None)
    if target is None:
        raise UsageError(f"unexpected data '{word}'")
    seen[target.name] = word


def format_help(cmd: CommandDef) -> str:
    """The page `virsh help CMD` prints (NAME, SYNOPSIS, DESCRIPTION, OPTIONS)."""
    synopsis = [cmd.name]
    rows = []
    for o in cmd.opts:
        arg = "" if o.kind is Kind.BOOL else f" <{o.kind.value}>"
        if o.required:
            synopsis.append(f"<{o.name}>")
            rows.append((f"[--{o.name}]{arg}", o.help))
        else:
            synopsis.append(f"[--{o.name}{arg}]")
            rows.append((f"--{o.name}{arg}", o.help))
    out = [f"  NAME\n    {cmd.name} - {cmd.help}\n",
           f"  SYNOPSIS\n    {' '.join(synopsis)}\n",
           f"  DESCRIPTION\n    {cmd.desc}\n"]
    if rows:
        out.append("  OPTIONS\n" + "".join(f"    {label:<15}  {text}\n" for label, text in rows))
    return "\n".join(out) + "\n"
