# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import pytest

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError

NASTY = [
    b"",
    b"\n",
    b"A=1",
    b"A=1\n",
    b"A=1\r\nB=2\r\n",
    b"A=1\r\nB=2",
    b"# only a comment",
    b"   \n\t\n# c\n\n",
    b"export A=1\nexport\tB='two'\n",
    b'A="has # hash" # and a comment\n',
    b"A='single # hash'   # comment\n",
    b"A=unquoted # comment\n",
    b"A=abc#not-a-comment\n",
    b"A=x=y==z\n",
    b'A="a \\"quoted\\" word"\n',
    b"A='it\\'s'\n",
    b"A=`back tick $x`\n",
    b"A=\n",
    b"A=''\n",
    b'A=""\n',
    "A=caf\u00e9 \u2603\nB=\"\u65e5\u672c\"\n".encode(),
    b"  A = spaced  \n",
    b'A="line one\nline two"\nB=2\n',
    b'A="line one\r\nline two"\r\nB=2\r\n',
    b"A=it's\n",
    b"A=trailing   \n",
    b"A=\xff\xfe raw bytes\n",
    b"spring.datasource.url=jdbc:sqlite:/var/app.db\n",
    b"export my-app.flag = 'on'  # c\r\nA_B=1\r\n",
    b'a.b-c="multi\nline" # c\nx-y.z=`t`',
]


@pytest.mark.parametrize("data", NASTY)
def test_parse_serialize_is_identity(data):
    assert _dotenv.parse(data, "t.env").serialize() == data


@pytest.mark.parametrize("data, key, value", [
    (b'A="has # hash" # and a comment\n', "A", "has # hash"),
    (b"A='single # hash'   # comment\n", "A", "single # hash"),
    (b"A=unquoted # comment\n", "A", "unquoted"),
    (b"A=abc#not-a-comment\n", "A", "abc#not-a-comment"),
    (b"A=x=y==z\n", "A", "x=y==z"),
    (b'A="a \\"quoted\\" word"\n', "A", 'a "quoted" word'),
    (b"A='it\\'s'\n", "A", "it's"),
    (b"A=`back tick $x`\n", "A", "back tick $x"),
    (b"A=\n", "A", ""),
    (b"export A=1\r\n", "A", "1"),
    (b"  A = spaced  \n", "A", "spaced"),
    (b'A="line one\nline two"\n', "A", "line one\nline two"),
    (b'A="tab\\tnew\\nline"\n', "A", "tab\tnew\nline"),
    ("A=caf\u00e9\n".encode(), "A", "caf\u00e9"),
])
def test_values_are_decoded(data, key, value):
    assert _dotenv.parse(data).get(key).value == value


@pytest.mark.parametrize("data, expected", [
    (b'export A="old" # keep me\n', b'export A="new" # keep me\n'),
    (b"A='old'\r\n", b"A='new'\r\n"),
    (b"A=old", b"A=new"),
    (b"A=`old`\n", b"A=`new`\n"),
    (b"  A = old   # c\n", b"  A = new   # c\n"),
    (b'A="multi\nline" # c\nB=1\n', b'A="new" # c\nB=1\n'),
])
def test_set_value_keeps_everything_else(data, expected):
    env = _dotenv.parse(data)
    env.get("A").set_value("new")
    assert env.serialize() == expected


@pytest.mark.parametrize("quote, value, expected", [
    ("", "abc123+/=", b"A=abc123+/="),
    ("", "has space", b"A='has space'"),
    ("", "dollar$x", b"A='dollar$x'"),
    ("", "it's", b'A="it\'s"'),
    ("'", "it's \\ \"x\"", b'A="it\'s \\\\ \\"x\\""'),
    ('"', "plain", b'A="plain"'),
])
def test_encoding_reads_back(quote, value, expected):
    data = b"A=" + (quote + "x" + quote).encode()
    env = _dotenv.parse(data)
    env.get("A").set_value(value)
    assert env.serialize() == expected
    assert _dotenv.parse(env.serialize()).get("A").value == value


def test_value_with_newline_is_refused():
    env = _dotenv.parse(b"A=1\n")
    with pytest.raises(RunbookError, match="line break"):
        env.get("A").set_value("a\nb")


@pytest.mark.parametrize("data, message", [
    (b"A=1\njust some words\n", r"t\.env: line 2: not a KEY=value"),
    (b"A=1\nB=2\nA=3\n", r"t\.env: line 3: duplicate key A \(first set on line 1\)"),
    (b'A="never closed\nB=2\n', r"t\.env: line 1: double-quoted value of A is never closed"),
    (b"A='x' trailing\n", r"t\.env: line 1: unexpected text after the value"),
    (b'A="x"# glued\n', r"t\.env: line 1: unexpected text after the value"),
    (b"1A=2\n", r"t\.env: line 1: not a KEY=value"),
    (b".A=2\n", r"t\.env: line 1: not a KEY=value"),
    (b"-A=2\n", r"t\.env: line 1: not a KEY=value"),
    (b"A=1\rB=2\n", r"t\.env: line 1: stray carriage return"),
])
def test_malformed_files_name_the_line(data, message):
    with pytest.raises(RunbookError, match=message):
        _dotenv.parse(data, "t.env")


def test_newline_style_is_detected():
    assert _dotenv.parse(b"A=1\r\nB=2\r\n").newline == "\r\n"
    assert _dotenv.parse(b"A=1\nB=2\n").newline == "\n"


def test_dotted_and_dashed_keys_are_read_and_kept():
    # docker compose accepts them (spring.datasource.url=...): read as entries we never change
    data = b"spring.datasource.url=jdbc:x # c\nexport my-app.key='v w'\nA=1\n"
    env = _dotenv.parse(data, "t.env")
    assert [e.key for e in env.entries] == ["spring.datasource.url", "my-app.key", "A"]
    assert env.get("spring.datasource.url").value == "jdbc:x"
    assert env.get("my-app.key").value == "v w"
    env.get("A").set_value("2")
    assert env.serialize() == b"spring.datasource.url=jdbc:x # c\nexport my-app.key='v w'\nA=2\n"
    assert not _dotenv.NAME_RE.match("spring.datasource.url")  # never a name we manage
