# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the backup role runs these engines on hosts that have no Ansible.
"""A .env parser whose serializer gives back the input byte for byte.

Every entry keeps its raw text (line ending included), so ``serialize(parse(data)) == data`` for
any file ``parse`` accepts. Changing one value rebuilds only that entry from its parts
(``head`` = indentation, ``export ``, key, ``=``; ``quote``; ``tail`` = spacing and inline
comment; ``eol``), so comments, blank lines, ordering, quoting style, CRLF and a missing final
newline all survive. A line that is none of blank / comment / assignment is refused with its
line number rather than guessed at: a file we cannot read back exactly is a file we must not write.

Accepted assignment syntax (the common subset of python-dotenv, docker compose and shells)::

    [indent][export ]KEY[ ]=[ ]VALUE[ ][# comment]

KEY starts with a letter or ``_`` and goes on with letters, digits, ``_``, ``.`` and ``-`` (docker
compose reads ``spring.datasource.url=...``); keys with ``.`` or ``-`` are kept byte for byte, and
only ``NAME_RE`` names are managed. VALUE is empty, unquoted (ends at end of line or at whitespace
followed by ``#``), single quoted (``\\'`` and ``\\\\`` escapes), double quoted (backslash escapes)
or backtick quoted (literal); quoted values may span lines.
"""

from __future__ import annotations

import re

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError

# A name we may manage (a shell/POSIX environment name).
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A key we read: docker compose also accepts '.' and '-' (spring.datasource.url=...). Such keys are
# kept as they are; only NAME_RE names can be managed (normalize_specs checks that).
_ASSIGN_RE = re.compile(r"(?P<head>[ \t]*(?:export[ \t]+)?(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*)")
# Characters that need no quotes in any dotenv dialect (no spaces, quotes, '#', '$', '\\').
_SAFE_UNQUOTED_RE = re.compile(r"[A-Za-z0-9_+/=.,:@%^~-]*\Z")
_DQ_DECODE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'",
              "a": "\a", "b": "\b", "f": "\f", "v": "\v"}

BLANK = "blank"
COMMENT = "comment"
ASSIGN = "assign"


class Entry:
    """One logical entry: a blank line, a comment line or an assignment (maybe several lines)."""

    __slots__ = ("kind", "raw", "lineno", "key", "head", "quote", "raw_value", "tail", "eol")

    def __init__(self, kind, raw, lineno, *, key=None, head="", quote="", raw_value="", tail="", eol=""):
        self.kind = kind
        self.raw = raw
        self.lineno = lineno
        self.key = key
        self.head = head
        self.quote = quote
        self.raw_value = raw_value  # the value text between the quotes, escapes not decoded
        self.tail = tail
        self.eol = eol

    @property
    def value(self) -> str:
        """The value as an application would see it (escapes decoded, no interpolation)."""
        return decode_value(self.quote, self.raw_value)

    @property
    def comment_text(self) -> str:
        """For a comment line: the text without its line ending."""
        return self.raw[: len(self.raw) - len(self.eol)] if self.eol else self.raw

    def set_value(self, value: str, keep_quote: bool = True) -> None:
        """Replace the value, keeping the quote style when the value allows it."""
        quote = self.quote if keep_quote else ""
        quote, text = encode_value(value, quote)
        self.quote = quote
        self.raw_value = text
        self.raw = self.head + quote + text + quote + self.tail + self.eol

    def set_eol(self, eol: str) -> None:
        body = self.raw[: len(self.raw) - len(self.eol)] if self.eol else self.raw
        self.eol = eol
        self.raw = body + eol


class DotEnv:
    """A parsed .env file: ``entries`` in file order, ``newline`` the file's line ending."""

    def __init__(self, entries: list[Entry], newline: str = "\n"):
        self.entries = entries
        self.newline = newline

    def serialize(self) -> bytes:
        return "".join(e.raw for e in self.entries).encode("utf-8", "surrogateescape")

    def index(self) -> dict[str, int]:
        """key -> position in ``entries``."""
        return {e.key: i for i, e in enumerate(self.entries) if e.kind == ASSIGN}

    def get(self, key: str) -> Entry | None:
        for entry in self.entries:
            if entry.kind == ASSIGN and entry.key == key:
                return entry
        return None

    def ensure_final_newline(self) -> None:
        """Before appending: give the last entry a line ending if it has none."""
        if self.entries and not self.entries[-1].eol:
            self.entries[-1].set_eol(self.newline)

    def make_assignment(self, key: str, value: str, lineno: int = 0) -> Entry:
        quote, text = encode_value(value, "")
        head = key + "="
        return Entry(ASSIGN, head + quote + text + quote + self.newline, lineno, key=key, head=head,
                     quote=quote, raw_value=text, eol=self.newline)

    def make_comment(self, text: str) -> Entry:
        return Entry(COMMENT, text + self.newline, 0, eol=self.newline)


def _split_lines(text: str) -> list[tuple[str, str]]:
    """Physical lines as (content, eol); only '\\n' and '\\r\\n' end a line."""
    lines = []
    pos = 0
    while pos < len(text):
        nl = text.find("\n", pos)
        if nl == -1:
            lines.append((text[pos:], ""))
            break
        if nl > pos and text[nl - 1] == "\r":
            lines.append((text[pos:nl - 1], "\r\n"))
        else:
            lines.append((text[pos:nl], "\n"))
        pos = nl + 1
    return lines


def _find_closing(quote: str, text: str, start: int) -> int:
    """Index of the closing quote in text[start:], or -1. Backslash escapes except in backticks."""
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quote != "`":
            i += 2
            continue
        if ch == quote:
            return i
        i += 1
    return -1


def _check_tail(path: str, lineno: int, tail: str) -> None:
    stripped = tail.lstrip(" \t")
    if stripped and not (stripped.startswith("#") and stripped != tail):
        raise RunbookError("%s: line %d: unexpected text after the value: only spaces and a "
                           "'# comment' may follow a closing quote" % (path, lineno))


def parse(data: bytes, path: str = "<dotenv>") -> DotEnv:
    """Parse ``data``; raise RunbookError naming ``path`` and the line for what cannot round-trip."""
    text = data.decode("utf-8", "surrogateescape")
    lines = _split_lines(text)
    newline = "\r\n" if lines and lines[0][1] == "\r\n" else "\n"
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    i = 0
    while i < len(lines):
        content, eol = lines[i]
        lineno = i + 1
        stripped = content.strip(" \t")
        if "\r" in content:
            raise RunbookError("%s: line %d: stray carriage return inside the line" % (path, lineno))
        if not stripped:
            entries.append(Entry(BLANK, content + eol, lineno, eol=eol))
            i += 1
            continue
        if stripped.startswith("#"):
            entries.append(Entry(COMMENT, content + eol, lineno, eol=eol))
            i += 1
            continue
        match = _ASSIGN_RE.match(content)
        if not match:
            raise RunbookError("%s: line %d: not a KEY=value assignment, comment or blank line"
                               % (path, lineno))
        key = match.group("key")
        head = match.group("head")
        rest = content[match.end():]
        if rest[:1] in ("'", '"', "`"):
            quote = rest[0]
            # A quoted value may continue over the following physical lines.
            buf = rest
            end = _find_closing(quote, buf, 1)
            j = i
            while end == -1:
                j += 1
                if j >= len(lines):
                    raise RunbookError("%s: line %d: %s-quoted value of %s is never closed"
                                       % (path, lineno, {"'": "single", '"': "double", "`": "backtick"}[quote], key))
                buf = buf + lines[j - 1][1] + lines[j][0]
                end = _find_closing(quote, buf, 1)
            raw_value = buf[1:end]
            tail = buf[end + 1:]
            _check_tail(path, j + 1, tail)
            last_eol = lines[j][1]
            raw = head + quote + raw_value + quote + tail + last_eol
            entry = Entry(ASSIGN, raw, lineno, key=key, head=head, quote=quote, raw_value=raw_value,
                          tail=tail, eol=last_eol)
            i = j + 1
        else:
            comment = re.search(r"[ \t]#", rest)
            value_part = rest[:comment.start()] if comment else rest
            raw_value = value_part.rstrip(" \t")
            tail = rest[len(raw_value):]
            entry = Entry(ASSIGN, content + eol, lineno, key=key, head=head, quote="", raw_value=raw_value,
                          tail=tail, eol=eol)
            i += 1
        if key in seen:
            raise RunbookError("%s: line %d: duplicate key %s (first set on line %d)"
                               % (path, lineno, key, seen[key]))
        seen[key] = lineno
        entries.append(entry)
    return DotEnv(entries, newline)


def decode_value(quote: str, raw_value: str) -> str:
    if quote == '"':
        out = []
        i = 0
        while i < len(raw_value):
            ch = raw_value[i]
            if ch == "\\" and i + 1 < len(raw_value):
                nxt = raw_value[i + 1]
                if nxt in _DQ_DECODE:
                    out.append(_DQ_DECODE[nxt])
                    i += 2
                    continue
            out.append(ch)
            i += 1
        return "".join(out)
    if quote == "'":
        return re.sub(r"\\([\\'])", r"\1", raw_value)
    return raw_value


def encode_value(value: str, quote: str) -> tuple[str, str]:
    """(quote, text) writing ``value`` in the preferred quote style, or a safe one.

    Unquoted only when every dialect reads it literally; single quotes (no interpolation) next;
    double quotes with backslash escapes when the value holds a single quote.
    """
    if "\n" in value or "\r" in value:
        raise RunbookError("a value may not contain a line break")
    if quote == "" and _SAFE_UNQUOTED_RE.match(value):
        return "", value
    if quote == "`" and "`" not in value:
        return "`", value
    if quote in ("", "'", "`") and "'" not in value and "\\" not in value:
        return "'", value
    return '"', value.replace("\\", "\\\\").replace('"', '\\"')
