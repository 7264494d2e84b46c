# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Property-based fuzzing: every module's arguments, the dotenv parser and the PEM parsers.

A module run must end in exit_json or fail_json with a ``msg``: never a traceback. Modules run
in-process (ansible.module_utils.testing.patch_module_args) against a sandbox directory.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import tempfile

import helpers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, helpers.BUILD)

from ansible.module_utils.testing import patch_module_args  # noqa: E402

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv, _x509  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402

MODULES = ["sqlite_backup", "sqlite_restore", "sqlite_vacuum", "secret_rotate", "cert_install"]
FUZZ = settings(max_examples=helpers.FUZZ_EXAMPLES, deadline=None, derandomize=not helpers.SOAK,
                suppress_health_check=list(HealthCheck))

SANDBOX = tempfile.mkdtemp(prefix="runbook-fuzz-")
os.makedirs(os.path.join(SANDBOX, "dest"), exist_ok=True)
DB = helpers.make_db(os.path.join(SANDBOX, "app.db"), mib=0.02)
with open(os.path.join(SANDBOX, ".env"), "w", encoding="utf-8") as _h:
    _h.write("A=1\n")

paths = st.sampled_from([SANDBOX, DB, os.path.join(SANDBOX, ".env"), os.path.join(SANDBOX, "dest"),
                         os.path.join(SANDBOX, "missing", "x"), "", "relative/path", "/dev/null", "/proc/1/mem",
                         os.path.join(SANDBOX, "dest", "..", "app.db")])
TEXT_SAMPLES = ["0600", "0o777", "quick_check", "latest", "zstd", "none", "rsa", "self_signed", "files", "content",
                "drill", "pruned", "root", "nobody", "-1", "hex", "age1xyz",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
texts = st.text(max_size=30) | st.sampled_from(TEXT_SAMPLES)
small_ints = st.integers(-3, 120) | st.sampled_from([2048, 4096, 10**6, -(10**9)])
scalars = st.none() | st.booleans() | small_ints | texts | paths | st.floats(allow_nan=True)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["name", "format", "bytes", "length", "value", "force", "x"]), inner, max_size=4),
    max_leaves=8)


def _spec(name):
    module = importlib.import_module("ansible_collections.runbook.sqlite_app.plugins.modules.%s" % name)
    import yaml
    options = yaml.safe_load(module.DOCUMENTATION)["options"]
    return module, sorted(options)


def run_module(module, args, check_mode):
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=True, _ansible_tmpdir=SANDBOX,
                _ansible_remote_tmp=SANDBOX)
    out = io.StringIO()
    with patch_module_args(args), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main()
    return json.loads(out.getvalue())


def _safe(name, args):
    """Keep the fuzzer from asking for what is slow by design (huge RSA keys)."""
    if name == "cert_install" and isinstance(args.get("rsa_bits"), int) and args["rsa_bits"] > 4096:
        args["rsa_bits"] = 4096
    if name == "cert_install" and args.get("key_type") == "rsa" and args.get("rsa_bits") == 4096:
        args["rsa_bits"] = 2048
    return args


@pytest.mark.parametrize("name", MODULES)
def test_module_arguments_never_traceback(name):
    module, option_names = _spec(name)
    counts = {"ok": 0, "failed": 0}

    @FUZZ
    @given(args=st.dictionaries(st.sampled_from(option_names + ["bogus_option"]), values, max_size=6),
           check_mode=st.booleans())
    def run(args, check_mode):
        result = run_module(module, _safe(name, args), check_mode)
        if result.get("failed"):
            assert isinstance(result.get("msg"), str) and result["msg"], result
            assert "Traceback" not in result["msg"] and "exception" not in result, result
            counts["failed"] += 1
        else:
            counts["ok"] += 1

    run()
    helpers.record("fuzz.modules", modules=1, examples=counts["ok"] + counts["failed"], tracebacks=0)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_dotenv_parse_roundtrip_or_clear_error(data):
    try:
        env = _dotenv.parse(data, "/srv/app/.env")
    except RunbookError as err:
        assert "/srv/app/.env" in str(err)
        return
    assert env.serialize() == data


DOTENV_LINES = st.lists(st.sampled_from([
    "A=1", "export B='two words'", 'C="multi\nline"', "D=`tick`", "# comment", "", "  E = spaced # c",
    'F="unterminated', "G='esc\\'aped'", "=novalue", "H", "I=\"a\\\"b\"", "\r", "J=é", "K=\x00",
    "spring.datasource.url=x", "a-b.c='v'", ".A=1"]), max_size=8)


@FUZZ
@given(lines=DOTENV_LINES, eol=st.sampled_from(["\n", "\r\n"]))
def test_dotenv_structured(lines, eol):
    data = eol.join(lines).encode("utf-8")
    try:
        env = _dotenv.parse(data, ".env")
    except RunbookError:
        return
    assert env.serialize() == data
    for entry in env.entries:
        if entry.kind == _dotenv.ASSIGN:
            entry.set_value("new 'value' #x")
    again = _dotenv.parse(env.serialize(), ".env")   # what we write, we can read back
    assert [e.key for e in again.entries if e.kind == _dotenv.ASSIGN] == \
        [e.key for e in env.entries if e.kind == _dotenv.ASSIGN]


def _valid_pem():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "fuzz.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


CERT_PEM, KEY_PEM = _valid_pem()


def _mutations(base):
    return st.tuples(st.integers(0, len(base) - 1), st.binary(min_size=0, max_size=8), st.integers(0, 40)).map(
        lambda t: base[:t[0]] + t[1] + base[t[0] + t[2]:])


@FUZZ
@given(data=st.binary(max_size=200) | _mutations(CERT_PEM) | _mutations(KEY_PEM) | _mutations(CERT_PEM + KEY_PEM),
       passphrase=st.none() | st.text(max_size=5))
def test_pem_parsers_clear_errors(data, passphrase):
    try:
        _x509.parse_certificates(data, "cert.pem")
    except RunbookError as err:
        assert "cert.pem" in str(err)
    try:
        _x509.parse_private_key(data, "key.pem", passphrase)
    except RunbookError as err:
        assert "key.pem" in str(err)
        assert KEY_PEM.decode().splitlines()[1] not in str(err)   # a key line never lands in a message
