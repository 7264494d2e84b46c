# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import calendar
import datetime
import hashlib
import importlib.util
import io
import json
import os
import stat
import sys

import pytest

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _x509
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
DAY = datetime.timedelta(days=1)


# ---------------------------------------------------------------------------------------------
# a small PKI made in the tests: root -> intermediate -> leaf
# ---------------------------------------------------------------------------------------------

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_cn, key, issuer_cn, issuer_key, ca, *, not_before=None, not_after=None, sans=None):
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 90 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs).decode()


def _key_pem(key, password=None, traditional=False):
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if traditional else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc).decode()


class PKI:
    def __init__(self):
        self.root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.root = _cert("Test Root", self.root_key, "Test Root", self.root_key, True)
        self.int_key = ec.generate_private_key(ec.SECP384R1())
        self.inter = _cert("Test Intermediate", self.int_key, "Test Root", self.root_key, True)
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.leaf = _cert("app.example.com", self.leaf_key, "Test Intermediate", self.int_key, False,
                          sans=["app.example.com", "*.apps.example.com"])
        self.expired = _cert("app.example.com", self.leaf_key, "Test Intermediate", self.int_key, False,
                             not_before=NOW - 100 * DAY, not_after=NOW - DAY, sans=["app.example.com"])
        self.future = _cert("app.example.com", self.leaf_key, "Test Intermediate", self.int_key, False,
                            not_before=NOW + 10 * DAY, not_after=NOW + 100 * DAY, sans=["app.example.com"])
        self.short = _cert("app.example.com", self.leaf_key, "Test Intermediate", self.int_key, False,
                           not_after=NOW + 3 * DAY, sans=["app.example.com"])
        self.other_key = ec.generate_private_key(ec.SECP256R1())
        # Same subject as the real intermediate, different key: the leaf's signature cannot verify.
        self.fake_int_key = ec.generate_private_key(ec.SECP384R1())
        self.fake_inter = _cert("Test Intermediate", self.fake_int_key, "Test Root", self.root_key, True)
        self.stranger_key = ec.generate_private_key(ec.SECP256R1())
        self.stranger = _cert("Somebody Else", self.stranger_key, "Somebody Else", self.stranger_key, True)


@pytest.fixture(scope="module")
def pki():
    return PKI()


@pytest.fixture
def dest(tmp_path):
    path = tmp_path / "certs"
    path.mkdir()
    return path


def _content(pki, dest, **extra):
    opts = {"source": "content", "cert_content": _pem(pki.leaf, pki.inter), "key_content": _key_pem(pki.leaf_key),
            "dest_dir": str(dest)}
    opts.update(extra)
    return opts


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def _snapshot(directory):
    return {p.name: (_sha(p), os.stat(str(p)).st_mtime_ns, _mode(p)) for p in sorted(directory.iterdir())}


def _read_certs(path):
    return _x509.parse_certificates(path.read_bytes(), str(path))


# ---------------------------------------------------------------------------------------------
# good installs
# ---------------------------------------------------------------------------------------------

def test_content_install_writes_leaf_first_and_modes(pki, dest):
    result = _x509.install(_content(pki, dest))
    assert result["changed"] is True
    crt, key = dest / "server.crt", dest / "server.key"
    assert [c.subject for c in _read_certs(crt)] == [pki.leaf.subject, pki.inter.subject]
    assert _mode(crt) == 0o644 and _mode(key) == 0o600
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    assert result["chain_length"] == 2
    assert result["key_type"] == "ec"
    assert result["subject"] == "CN=app.example.com"
    assert result["issuer"] == "CN=Test Intermediate"
    assert result["subject_alt_names"] == ["DNS:app.example.com", "DNS:*.apps.example.com"]
    assert result["sha256_fingerprint"] == _x509.fingerprint(pki.leaf)
    assert result["sha256_fingerprint"].replace(":", "").lower() == hashlib.sha256(
        pki.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert result["not_after"].endswith("Z") and result["days_remaining"] in (88, 89)
    assert result["cert_file"] == str(crt) and result["key_file"] == str(key) and result["chain_file"] is None
    assert result["backup_files"] == []
    assert "PRIVATE" not in json.dumps(result)
    assert [p.name for p in dest.iterdir() if p.name.startswith(".runbook-tmp-")] == []


def test_reversed_chain_is_reordered(pki, dest):
    opts = _content(pki, dest, cert_content=_pem(pki.root, pki.inter, pki.leaf))
    result = _x509.install(opts)
    assert result["chain_length"] == 3
    subjects = [c.subject for c in _read_certs(dest / "server.crt")]
    assert subjects == [pki.leaf.subject, pki.inter.subject, pki.root.subject]


def test_separate_chain_file(pki, dest):
    opts = _content(pki, dest, cert_content=_pem(pki.leaf), chain_content=_pem(pki.root, pki.inter),
                    chain_file="chain.crt")
    result = _x509.install(opts)
    assert [c.subject for c in _read_certs(dest / "server.crt")] == [pki.leaf.subject]
    assert [c.subject for c in _read_certs(dest / "chain.crt")] == [pki.inter.subject, pki.root.subject]
    assert result["chain_file"] == str(dest / "chain.crt")
    assert _x509.install(opts)["changed"] is False


def test_files_mode_with_encrypted_traditional_key(pki, dest, tmp_path):
    src = tmp_path / "live"
    src.mkdir()
    (src / "fullchain.pem").write_text(_pem(pki.leaf, pki.inter))
    (src / "privkey.pem").write_text(_key_pem(pki.leaf_key, b"s3cret"))
    opts = {"source": "files", "cert_path": str(src / "fullchain.pem"), "key_path": str(src / "privkey.pem"),
            "key_passphrase": "s3cret", "dest_dir": str(dest), "base_name": "app"}
    result = _x509.install(opts)
    assert result["changed"] is True
    installed = (dest / "app.key").read_bytes()
    assert b"ENCRYPTED" not in installed
    loaded = serialization.load_pem_private_key(installed, password=None)
    assert _x509._spki(loaded.public_key()) == _x509._spki(pki.leaf_key.public_key())
    # traditional (non-PKCS8) source key is normalised to PKCS8
    opts2 = _content(pki, dest, key_content=_key_pem(pki.leaf_key, traditional=True), base_name="trad")
    _x509.install(opts2)
    assert (dest / "trad.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_expected_names_with_wildcards(pki, dest):
    _x509.install(_content(pki, dest, expected_names=["app.example.com", "x.apps.example.com"]))
    for bad in ("apps.example.com", "a.b.apps.example.com", "other.example.com"):
        with pytest.raises(RunbookError, match="does not cover %s" % bad.replace(".", r"\.")):
            _x509.install(_content(pki, dest, expected_names=[bad]))


def test_name_is_covered_ip_and_prefixes():
    sans = ["DNS:*.example.com", "IP:127.0.0.1", "IP:::1"]
    assert _x509.name_is_covered("127.0.0.1", sans)
    assert _x509.name_is_covered("IP:::1", sans)
    assert _x509.name_is_covered("DNS:WWW.example.com", sans)
    assert not _x509.name_is_covered("example.com", sans)
    assert not _x509.name_is_covered("10.0.0.1", sans)


# ---------------------------------------------------------------------------------------------
# idempotence, attributes, check mode, backups
# ---------------------------------------------------------------------------------------------

def test_second_run_is_a_noop_sha_and_mtime_unchanged(pki, dest):
    _x509.install(_content(pki, dest))
    before = _snapshot(dest)
    result = _x509.install(_content(pki, dest))
    assert result["changed"] is False
    assert _snapshot(dest) == before
    # input order does not matter: the reversed bundle is the same installation
    assert _x509.install(_content(pki, dest, cert_content=_pem(pki.inter, pki.leaf)))["changed"] is False
    assert _snapshot(dest) == before


def test_wrong_mode_is_fixed_without_rewriting(pki, dest):
    _x509.install(_content(pki, dest))
    key = dest / "server.key"
    os.chmod(str(key), 0o644)
    sha, mtime = _sha(key), os.stat(str(key)).st_mtime_ns
    check = _x509.install(_content(pki, dest), check_mode=True)
    assert check["changed"] is True and _mode(key) == 0o644
    result = _x509.install(_content(pki, dest))
    assert result["changed"] is True
    assert _mode(key) == 0o600 and _sha(key) == sha and os.stat(str(key)).st_mtime_ns == mtime
    assert _x509.install(_content(pki, dest))["changed"] is False


def test_owner_group_by_id_are_applied(pki, dest):
    uid, gid = os.getuid(), os.getgid()
    result = _x509.install(_content(pki, dest, owner=str(uid), group=str(gid), cert_mode="0640", key_mode=0o400))
    assert result["changed"] is True
    assert _mode(dest / "server.crt") == 0o640 and _mode(dest / "server.key") == 0o400
    assert os.stat(str(dest / "server.key")).st_uid == uid


@pytest.mark.parametrize("option, value, match", [
    ("owner", "nosuchuser", r"owner 'nosuchuser': no such user"),
    ("group", "nosuchgroup", r"group 'nosuchgroup': no such group"),
])
def test_unknown_owner_or_group_fails_the_same_in_check_and_real_mode(pki, dest, option, value, match):
    # A fresh install: every file is a content change, so nothing else would look the names up.
    for check_mode in (True, False):
        with pytest.raises(RunbookError, match=match):
            _x509.install(_content(pki, dest, **{option: value}), check_mode=check_mode)
        assert list(dest.iterdir()) == []


def test_symlink_at_destination_is_replaced_by_a_regular_file(pki, dest):
    _x509.install(_content(pki, dest))
    crt, target = dest / "server.crt", dest / "target.crt"
    target.write_bytes(crt.read_bytes())
    os.chmod(str(target), 0o640)
    os.unlink(str(crt))
    os.symlink("target.crt", str(crt))
    target_sha = _sha(target)
    result = _x509.install(_content(pki, dest))
    assert result["changed"] is True
    assert not os.path.islink(str(crt)) and stat.S_ISREG(os.lstat(str(crt)).st_mode)
    assert _mode(crt) == 0o644 and _sha(crt) == target_sha
    # the link's old target is left alone: neither rewritten nor chmodded through the link
    assert _sha(target) == target_sha and _mode(target) == 0o640
    assert _x509.install(_content(pki, dest))["changed"] is False


@pytest.mark.parametrize("chain_file", [None, "chain.crt"])
def test_renames_publish_key_then_chain_then_cert(pki, dest, monkeypatch, chain_file):
    renamed = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        renamed.append(os.path.basename(str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(_x509._fileio.os, "replace", spy)
    opts = _content(pki, dest, cert_content=_pem(pki.leaf), chain_content=_pem(pki.inter), chain_file=chain_file)
    assert _x509.install(opts)["changed"] is True
    expected = ["server.key", "chain.crt", "server.crt"] if chain_file else ["server.key", "server.crt"]
    assert renamed == expected


def test_check_mode_writes_nothing_and_predicts(pki, dest):
    check = _x509.install(_content(pki, dest), check_mode=True)
    assert check["changed"] is True
    assert list(dest.iterdir()) == []
    real = _x509.install(_content(pki, dest))
    assert real["changed"] is True and real["sha256_fingerprint"] == check["sha256_fingerprint"]
    assert _x509.install(_content(pki, dest), check_mode=True)["changed"] is False


def test_diff_holds_fingerprints_and_dates_only(pki, dest):
    first = _x509.install(_content(pki, dest))
    assert first["diff"]["before"] == {}
    other = _cert("app.example.com", pki.leaf_key, "Test Intermediate", pki.int_key, False, sans=["app.example.com"])
    second = _x509.install(_content(pki, dest, cert_content=_pem(other, pki.inter)))
    assert second["diff"]["before"]["sha256_fingerprint"] == first["sha256_fingerprint"]
    assert second["diff"]["after"]["sha256_fingerprint"] == _x509.fingerprint(other)
    assert set(second["diff"]["after"]) == {"sha256_fingerprint", "not_before", "not_after"}


def test_backup_keeps_old_pair(pki, dest):
    _x509.install(_content(pki, dest))
    old_crt, old_key = (dest / "server.crt").read_bytes(), (dest / "server.key").read_bytes()
    new_key = ec.generate_private_key(ec.SECP256R1())
    new_leaf = _cert("app.example.com", new_key, "Test Intermediate", pki.int_key, False, sans=["app.example.com"])
    opts = _content(pki, dest, cert_content=_pem(new_leaf, pki.inter), key_content=_key_pem(new_key), backup=True)
    check = _x509.install(opts, check_mode=True)
    assert len(check["backup_files"]) == 2 and not any(os.path.exists(p) for p in check["backup_files"])
    result = _x509.install(opts, now=NOW)
    backups = sorted(result["backup_files"])
    assert len(backups) == 2
    crt_backup = [b for b in backups if ".crt." in b][0]
    key_backup = [b for b in backups if ".key." in b][0]
    assert open(crt_backup, "rb").read() == old_crt and open(key_backup, "rb").read() == old_key
    assert _mode(key_backup) == 0o600
    assert _x509.install(opts)["backup_files"] == []  # nothing replaced, nothing backed up


# ---------------------------------------------------------------------------------------------
# bad input: clear message naming the source and the cause, nothing touched
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def installed(pki, dest):
    _x509.install(_content(pki, dest))
    return _snapshot(dest)


def _fails(opts, match, dest, snapshot):
    with pytest.raises(RunbookError, match=match):
        _x509.install(opts)
    with pytest.raises(RunbookError, match=match):
        _x509.install(opts, check_mode=True)
    assert _snapshot(dest) == snapshot


def test_malformed_cert_pem(pki, dest, installed):
    garbage = "-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n"
    _fails(_content(pki, dest, cert_content=garbage), r"^cert_content: malformed PEM", dest, installed)
    _fails(_content(pki, dest, cert_content="hello"), r"cert_content: malformed PEM: no", dest, installed)
    truncated = _pem(pki.leaf)[:-30]
    _fails(_content(pki, dest, cert_content=truncated), r"no matching END", dest, installed)


def test_malformed_key_pem(pki, dest, installed):
    bad = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    _fails(_content(pki, dest, key_content=bad), r"^key_content: malformed PEM", dest, installed)
    _fails(_content(pki, dest, key_content=_pem(pki.leaf)), r"key_content: malformed PEM: no private key",
           dest, installed)


def test_key_cert_mismatch(pki, dest, installed):
    _fails(_content(pki, dest, key_content=_key_pem(pki.other_key)),
           r"cert_content: key/cert mismatch: .*key_content.*CN=app\.example\.com", dest, installed)


def test_key_of_another_certificate_in_the_bundle_is_a_mismatch(pki, dest, installed):
    # the intermediate's key: not "broken chain ... does not belong" but which certificate it matches
    _fails(_content(pki, dest, key_content=_key_pem(pki.int_key)),
           r"^cert_content: key/cert mismatch: the private key from key_content matches CN=Test Intermediate,"
           r" not the leaf CN=app\.example\.com", dest, installed)
    _fails(_content(pki, dest, cert_content=_pem(pki.leaf, pki.inter, pki.root), key_content=_key_pem(pki.root_key)),
           r"^cert_content: key/cert mismatch: the private key from key_content matches CN=Test Root,"
           r" not the leaf CN=app\.example\.com", dest, installed)


def test_chain_file_may_not_share_the_pair_s_paths(pki, dest, installed):
    for name in ("server.crt", "server.key"):
        _fails(dict(_content(pki, dest), chain_file=name), r"^chain_file: '%s' is the certificate or key file"
               % name.replace(".", r"\."), dest, installed)


def test_expired_and_not_yet_valid(pki, dest, installed):
    _fails(_content(pki, dest, cert_content=_pem(pki.expired, pki.inter)), r"cert_content: .*expired on",
           dest, installed)
    _fails(_content(pki, dest, cert_content=_pem(pki.future, pki.inter)), r"cert_content: .*not yet valid",
           dest, installed)


def test_too_few_days_remaining(pki, dest, installed):
    _fails(_content(pki, dest, cert_content=_pem(pki.short, pki.inter)), r"fewer than min_days_remaining=7",
           dest, installed)
    assert _x509.install(_content(pki, dest, cert_content=_pem(pki.short, pki.inter), min_days_remaining=1),
                         check_mode=True)["changed"] is True


def test_broken_chain_signature_fails(pki, dest, installed):
    # out of order AND broken: the "intermediate" has the right name but not the key that signed the leaf
    opts = _content(pki, dest, cert_content=_pem(pki.root, pki.fake_inter, pki.leaf))
    _fails(opts, r"cert_content: broken chain: CN=app\.example\.com is not signed by CN=Test Intermediate",
           dest, installed)


def test_unrelated_certificate_in_chain(pki, dest, installed):
    opts = _content(pki, dest, cert_content=_pem(pki.leaf, pki.inter), chain_content=_pem(pki.stranger))
    _fails(opts, r"broken chain: CN=Somebody Else does not belong", dest, installed)


def test_encrypted_key_without_or_with_wrong_passphrase(pki, dest, installed):
    encrypted = _key_pem(pki.leaf_key, b"right")
    _fails(_content(pki, dest, key_content=encrypted), r"key_content: the private key is encrypted and no "
           r"key_passphrase", dest, installed)
    _fails(_content(pki, dest, key_content=encrypted, key_passphrase="wrong"), r"key_content: cannot decrypt.*"
           r"wrong key_passphrase", dest, installed)
    traditional = _key_pem(pki.leaf_key, b"right", traditional=True)
    assert "Proc-Type: 4,ENCRYPTED" in traditional
    _fails(_content(pki, dest, key_content=traditional), r"is encrypted", dest, installed)
    _fails(_content(pki, dest, key_content=traditional, key_passphrase="nope"), r"wrong key_passphrase",
           dest, installed)


def test_missing_and_unreadable_source_paths(pki, dest, installed, tmp_path):
    crt = tmp_path / "fullchain.pem"
    crt.write_text(_pem(pki.leaf, pki.inter))
    key = tmp_path / "privkey.pem"
    key.write_text(_key_pem(pki.leaf_key))
    base = {"source": "files", "cert_path": str(crt), "key_path": str(key), "dest_dir": str(dest)}
    missing = str(tmp_path / "nope.pem")
    _fails(dict(base, cert_path=missing), r"%s \(cert_path\): cannot read: no such file" % missing, dest, installed)
    _fails(dict(base, key_path=missing), r"%s \(key_path\): cannot read" % missing, dest, installed)
    _fails(dict(base, chain_path=missing), r"%s \(chain_path\): cannot read" % missing, dest, installed)
    # a directory is unreadable as a file even for root
    _fails(dict(base, key_path=str(tmp_path)), r"%s \(key_path\): cannot read: is a directory" % tmp_path,
           dest, installed)


def test_missing_dest_dir_and_bad_options(pki, tmp_path):
    with pytest.raises(RunbookError, match="dest_dir.*no such directory"):
        _x509.install(_content(pki, tmp_path / "absent"))
    with pytest.raises(RunbookError, match="source=files needs cert_path and key_path"):
        _x509.install({"source": "files", "dest_dir": str(tmp_path)})
    with pytest.raises(RunbookError, match="cert_mode"):
        _x509.install(_content(pki, tmp_path, cert_mode="rw-r--r--"))
    with pytest.raises(RunbookError, match="base_name"):
        _x509.install(_content(pki, tmp_path, base_name="../evil"))
    with pytest.raises(RunbookError, match="unknown option"):
        _x509.install(_content(pki, tmp_path, bogus=1))
    assert list(tmp_path.iterdir()) == []


def test_missing_cryptography_is_reported(monkeypatch):
    """Load a fresh copy of the engine with every cryptography module made unimportable."""
    for name in list(sys.modules):
        if name == "cryptography" or name.startswith("cryptography."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    spec = importlib.util.spec_from_file_location("_x509_without_cryptography", _x509.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.HAS_CRYPTOGRAPHY is False
    with pytest.raises(RunbookError, match=r"python3-cryptography on Debian/Ubuntu, or pip install cryptography"):
        fresh.install({"source": "self_signed", "common_name": "x", "dest_dir": "/nonexistent"})


# ---------------------------------------------------------------------------------------------
# self-signed: generate, keep, renew (faked clock)
# ---------------------------------------------------------------------------------------------

def _ss(dest, **extra):
    opts = {"source": "self_signed", "common_name": "localhost", "subject_alt_names": ["localhost", "IP:127.0.0.1"],
            "dest_dir": str(dest)}
    opts.update(extra)
    return opts


def test_self_signed_generate_then_keep(dest):
    check = _x509.install(_ss(dest), check_mode=True, now=NOW)
    assert check["changed"] is True and list(dest.iterdir()) == []
    first = _x509.install(_ss(dest), now=NOW)
    assert first["changed"] is True
    assert first["subject_alt_names"] == ["DNS:localhost", "IP:127.0.0.1"]
    assert first["chain_length"] == 1 and first["key_type"] == "ec"
    assert first["days_remaining"] in (364, 365)
    cert = _read_certs(dest / "server.crt")[0]
    _x509.verify_signed_by(cert, cert)  # really self-signed
    snap = _snapshot(dest)
    assert _x509.install(_ss(dest), check_mode=True, now=NOW + DAY)["changed"] is False
    again = _x509.install(_ss(dest), now=NOW + DAY)
    assert again["changed"] is False and again["sha256_fingerprint"] == first["sha256_fingerprint"]
    assert _snapshot(dest) == snap


def test_self_signed_renew_window_with_faked_clock(dest):
    first = _x509.install(_ss(dest, days=60, renew_before_days=10), now=NOW)
    # 49 days later: 11 days left, outside the window
    assert _x509.install(_ss(dest, days=60, renew_before_days=10), now=NOW + 49 * DAY)["changed"] is False
    # 51 days later: 9 days left, inside the window -> renew
    check = _x509.install(_ss(dest, days=60, renew_before_days=10), now=NOW + 51 * DAY, check_mode=True)
    assert check["changed"] is True
    assert _x509.fingerprint(_read_certs(dest / "server.crt")[0]) == first["sha256_fingerprint"]
    renewed = _x509.install(_ss(dest, days=60, renew_before_days=10), now=NOW + 51 * DAY)
    assert renewed["changed"] is True and renewed["sha256_fingerprint"] != first["sha256_fingerprint"]
    # long after expiry -> renew again
    assert _x509.install(_ss(dest, days=60, renew_before_days=10), now=NOW + 400 * DAY)["changed"] is True


def test_self_signed_regenerates_on_mismatch_missing_and_name_change(dest):
    _x509.install(_ss(dest), now=NOW)
    (dest / "server.key").write_text(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    assert _x509.install(_ss(dest), now=NOW)["changed"] is True
    os.unlink(str(dest / "server.crt"))
    assert _x509.install(_ss(dest), now=NOW)["changed"] is True
    assert _x509.install(_ss(dest), now=NOW)["changed"] is False
    assert _x509.install(_ss(dest, common_name="other"), now=NOW)["changed"] is True
    rsa_result = _x509.install(_ss(dest, key_type="rsa"), now=NOW)
    assert rsa_result["changed"] is True and rsa_result["key_type"] == "rsa"
    assert _x509.install(_ss(dest, key_type="rsa"), now=NOW)["changed"] is False


def test_self_signed_ignores_min_days_and_checks_days(dest):
    assert _x509.install(_ss(dest, days=5, renew_before_days=1, min_days_remaining=30), now=NOW)["changed"]
    with pytest.raises(RunbookError, match="days=10 must be larger than renew_before_days=30"):
        _x509.install(_ss(dest, days=10), now=NOW)


def test_self_signed_without_sans_uses_common_name(dest):
    result = _x509.install({"source": "self_signed", "common_name": "10.1.2.3", "dest_dir": str(dest)})
    assert result["subject_alt_names"] == ["IP:10.1.2.3"]


def test_self_signed_regenerates_when_subject_alt_names_are_removed(dest):
    _x509.install(_ss(dest), now=NOW)
    removed = _x509.install(_ss(dest, subject_alt_names=[]), now=NOW)
    assert removed["changed"] is True and removed["subject_alt_names"] == ["DNS:localhost"]
    omitted = {k: v for k, v in _ss(dest).items() if k != "subject_alt_names"}
    # an empty list and an omitted option both mean the CN-derived SAN only: nothing left to change
    for opts in (_ss(dest, subject_alt_names=[]), omitted):
        assert _x509.install(opts, now=NOW)["changed"] is False
    ip_cn = _ss(dest, common_name="10.1.2.3", subject_alt_names=[])
    assert _x509.install(ip_cn, now=NOW)["subject_alt_names"] == ["IP:10.1.2.3"]
    assert _x509.install(ip_cn, now=NOW)["changed"] is False
    # back to an explicit list that differs from the CN-derived SAN: regenerated once
    assert _x509.install(_ss(dest), now=NOW)["changed"] is True
    assert _x509.install(_ss(dest), now=NOW)["changed"] is False


# ---------------------------------------------------------------------------------------------
# host-side entry point
# ---------------------------------------------------------------------------------------------

def test_cli_installs_and_reports(pki, dest, tmp_path, monkeypatch, capsys):
    live = tmp_path / "live"
    live.mkdir()
    (live / "fullchain.pem").write_text(_pem(pki.leaf, pki.inter))
    (live / "privkey.pem").write_text(_key_pem(pki.leaf_key))
    config = tmp_path / "hook.json"
    config.write_text(json.dumps({"source": "files", "dest_dir": str(dest)}))
    monkeypatch.setenv("RENEWED_LINEAGE", str(live))
    assert _x509.cli(["--check", str(config)]) == 0
    assert list(dest.iterdir()) == []
    assert _x509.cli([str(config)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["changed"] is True and out["chain_length"] == 2 and "diff" not in out
    assert _x509.cli([str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"source": "content", "dest_dir": str(dest)})))
    assert _x509.cli(["-"]) == 1
    assert "cert_install: source=content needs cert_content and key_content" in capsys.readouterr().err
    assert _x509.cli([]) == 2


def test_cli_refreshes_the_expiry_metric(pki, dest, tmp_path, monkeypatch, capsys):
    live = tmp_path / "live"
    live.mkdir()
    (live / "fullchain.pem").write_text(_pem(pki.leaf, pki.inter))
    (live / "privkey.pem").write_text(_key_pem(pki.leaf_key))
    metrics = tmp_path / "textfile" / "runbook_tls_app.prom"
    metrics.parent.mkdir()
    config = tmp_path / "hook.json"
    config.write_text(json.dumps({"source": "files", "dest_dir": str(dest), "metrics_file": str(metrics)}))
    monkeypatch.setenv("RENEWED_LINEAGE", str(live))
    assert _x509.cli(["--check", str(config)]) == 0
    assert not metrics.exists()  # check mode writes nothing
    assert _x509.cli([str(config)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    expected = calendar.timegm(datetime.datetime.strptime(out["not_after"], "%Y-%m-%dT%H:%M:%SZ").timetuple())
    line = '%s{cert="%s"} %r' % (_x509.TLS_METRIC, out["cert_file"], float(expected))
    assert line in metrics.read_text().splitlines()
    assert oct(metrics.stat().st_mode & 0o777) == "0o644"
    config.write_text(json.dumps({"source": "files", "dest_dir": str(dest),
                                  "metrics_file": str(tmp_path / "missing" / "m.prom")}))
    assert _x509.cli([str(config)]) == 1
    assert "missing/m.prom" in capsys.readouterr().err
