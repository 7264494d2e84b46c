# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library plus ``cryptography`` (>= 3.4, imported guarded): the tls role installs this
# very file on hosts and runs it from a certbot deploy hook with plain python3 (see cli()).
"""Install a TLS certificate/key pair, checked before it goes live.

Decide first, act second: ``plan()`` reads and checks every input and the files in place and
returns what would be written; ``apply()`` writes it (every file staged and fsynced, then
back-to-back renames: key, chain, certificate). ``install()`` runs both; check mode is
``install(check_mode=True)``, the same code path without the writes.

Only APIs present in cryptography 38 (Debian bookworm) are used: PEM bundles are split by hand
(``load_pem_x509_certificates`` is newer), signatures are verified with ``public_key().verify``
(``verify_directly_issued_by`` is newer) and validity dates are read through ``_not_after()``
and ``_not_before()`` (``not_valid_after_utc`` is newer).
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import ipaddress
import json
import os
import re
import sys

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _fileio
from ansible_collections.runbook.sqlite_app.plugins.module_utils._metrics import write_textfile

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
    from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
except ImportError as _exc:  # the sanity import test and bare hosts get here
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR = str(_exc)
else:
    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR = None

SOURCES = ("content", "files", "self_signed")
KEY_TYPES = ("ec", "rsa")

# Every option the module and cli() accept, with its default (None: unset).
DEFAULTS = {
    "source": None,
    "cert_content": None,
    "key_content": None,
    "chain_content": None,
    "cert_path": None,
    "key_path": None,
    "chain_path": None,
    "common_name": None,
    "subject_alt_names": None,
    "days": 365,
    "key_type": "ec",
    "rsa_bits": 2048,
    "renew_before_days": 30,
    "dest_dir": None,
    "base_name": "server",
    "chain_file": None,
    "min_days_remaining": 7,
    "expected_names": None,
    "key_passphrase": None,
    "cert_mode": "0644",
    "key_mode": "0600",
    "owner": None,
    "group": None,
    "backup": False,
}

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----[ \t]*(?:\r?\n|$)", re.DOTALL)
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY")


def require_cryptography() -> None:
    if not HAS_CRYPTOGRAPHY:
        raise RunbookError(
            "the Python library 'cryptography' (>= 3.4) is required on the target but cannot be imported"
            " (%s): install python3-cryptography on Debian/Ubuntu, or pip install cryptography"
            % (CRYPTOGRAPHY_IMPORT_ERROR,))


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _aware(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def _not_after(cert) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    return _aware(value if value is not None else cert.not_valid_after)


def _not_before(cert) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    return _aware(value if value is not None else cert.not_valid_before)


def iso(value: datetime.datetime) -> str:
    return _aware(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def fingerprint(cert) -> str:
    """SHA-256 of the DER certificate, upper-case colon hex (as ``openssl x509 -fingerprint``)."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def days_remaining(cert, now: datetime.datetime) -> int:
    """Whole days until notAfter (negative once expired)."""
    return int((_not_after(cert) - now).total_seconds() // 86400)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_type_of(key) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "rsa"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ec"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "ed448"
    return type(key).__name__


def _parse_mode(value, name: str) -> int:
    if isinstance(value, int):
        mode = value
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise RunbookError("%s: %r is not an octal file mode such as '0644'" % (name, value)) from None
    if not 0 <= mode <= 0o7777:
        raise RunbookError("%s: %r is not a file mode" % (name, value))
    return mode


def _read_source(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise RunbookError("%s (%s): cannot read: %s" % (path, what, _fileio.describe_oserror(exc))) from None


def _read_existing(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunbookError("%s: cannot read the installed file: %s" % (path, _fileio.describe_oserror(exc))) from None


def _to_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

def parse_certificates(data: bytes, origin: str) -> list:
    """Every CERTIFICATE block of a PEM bundle, in file order; anything else is an error."""
    data = _to_bytes(data)
    labels = _PEM_BEGIN.findall(data)
    blocks = list(_PEM_BLOCK.finditer(data))
    if not labels:
        raise RunbookError("%s: malformed PEM: no '-----BEGIN CERTIFICATE-----' block found" % origin)
    if len(blocks) != len(labels):
        raise RunbookError("%s: malformed PEM: a BEGIN line has no matching END line (truncated file?)" % origin)
    certs = []
    for number, block in enumerate(blocks, 1):
        label = block.group(1)
        if label != b"CERTIFICATE":
            raise RunbookError("%s: block %d is a %s, expected only CERTIFICATE blocks"
                               % (origin, number, label.decode("ascii", "replace")))
        try:
            certs.append(x509.load_pem_x509_certificate(block.group(0)))
        except ValueError as exc:
            raise RunbookError("%s: malformed PEM: certificate %d cannot be parsed: %s"
                               % (origin, number, exc)) from None
    return certs


def parse_private_key(data: bytes, origin: str, passphrase=None):
    """The one private key in ``data``; clear errors for encrypted keys and bad passphrases."""
    data = _to_bytes(data)
    blocks = [b for b in _PEM_BLOCK.finditer(data) if b.group(1) in _KEY_LABELS]
    if not blocks:
        if _PEM_BEGIN.search(data) and any(b"BEGIN " + label in data for label in _KEY_LABELS):
            raise RunbookError("%s: malformed PEM: the private key block has no matching END line" % origin)
        raise RunbookError("%s: malformed PEM: no private key block ('-----BEGIN PRIVATE KEY-----') found" % origin)
    if len(blocks) > 1:
        raise RunbookError("%s: holds %d private keys, expected one" % (origin, len(blocks)))
    block = blocks[0].group(0)
    encrypted = blocks[0].group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block
    if encrypted and not passphrase:
        raise RunbookError("%s: the private key is encrypted and no key_passphrase was given" % origin)
    password = _to_bytes(passphrase) if (encrypted and passphrase) else None
    try:
        return serialization.load_pem_private_key(block, password=password)
    except TypeError as exc:
        raise RunbookError("%s: cannot load the private key: %s" % (origin, exc)) from None
    except ValueError as exc:
        if encrypted:
            raise RunbookError("%s: cannot decrypt the private key: wrong key_passphrase (or a damaged key)"
                               % origin) from None
        raise RunbookError("%s: malformed PEM: the private key cannot be parsed: %s" % (origin, exc)) from None
    except Exception as exc:  # pylint: disable=broad-except
        # cryptography raises UnsupportedAlgorithm and, on some versions, other types for odd keys.
        raise RunbookError("%s: cannot load the private key: %s" % (origin, exc)) from None


def format_general_name(name) -> str:
    if isinstance(name, x509.DNSName):
        return "DNS:%s" % name.value
    if isinstance(name, x509.IPAddress):
        return "IP:%s" % name.value
    if isinstance(name, x509.RFC822Name):
        return "email:%s" % name.value
    if isinstance(name, x509.UniformResourceIdentifier):
        return "URI:%s" % name.value
    return str(name.value)


def subject_alt_names(cert) -> list:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [format_general_name(name) for name in ext.value]


def parse_general_name(text: str):
    text = str(text).strip()
    kind, sep, value = text.partition(":")
    if not sep or kind.upper() not in ("DNS", "IP", "EMAIL", "URI"):
        kind, value = "DNS", text
    kind = kind.upper()
    if not value:
        raise RunbookError("subject_alt_names: %r has an empty value" % text)
    if kind == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise RunbookError("subject_alt_names: %r is not an IP address" % text) from None
    if kind == "EMAIL":
        return x509.RFC822Name(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    return x509.DNSName(value.lower())


def name_is_covered(name: str, sans: list) -> bool:
    """True when ``name`` (DNS name or IP, optionally prefixed DNS:/IP:) is in the SAN list.

    A wildcard SAN ``*.example.com`` covers exactly one leftmost label (``a.example.com``),
    not ``example.com`` nor ``a.b.example.com``, as in RFC 6125.
    """
    text = str(name).strip()
    prefix, sep, rest = text.partition(":")
    if sep and prefix.upper() in ("DNS", "IP"):
        text = rest
    try:
        wanted_ip = ipaddress.ip_address(text)
    except ValueError:
        wanted_ip = None
    if wanted_ip is not None:
        return any(s.startswith("IP:") and ipaddress.ip_address(s[3:]) == wanted_ip for s in sans)
    wanted = text.lower().rstrip(".")
    for san in sans:
        if not san.startswith("DNS:"):
            continue
        pattern = san[4:].lower().rstrip(".")
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted:
            first, rest_of_name = wanted.split(".", 1)
            if first and first != "*" and rest_of_name == pattern[2:]:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def _describe(cert) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def verify_signed_by(cert, issuer) -> None:
    """Raise InvalidSignature (or RunbookError for unsupported keys) unless ``issuer`` signed ``cert``."""
    public = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    if isinstance(public, rsa.RSAPublicKey):
        if cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
            salt = getattr(padding.PSS, "AUTO", None)
            pad = padding.PSS(mgf=padding.MGF1(algorithm),
                              salt_length=salt if salt is not None else algorithm.digest_size)
        else:
            pad = padding.PKCS1v15()
        public.verify(cert.signature, cert.tbs_certificate_bytes, pad, algorithm)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    elif isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        public.verify(cert.signature, cert.tbs_certificate_bytes)
    else:
        raise RunbookError("cannot verify a signature made with a %s key (%s)"
                           % (key_type_of(public), _describe(issuer)))


def _issued_below(top, certs: list) -> list:
    """The certificates of ``certs`` that ``top`` issued, directly or through others of ``certs``
    (names match and signatures verify)."""
    below, frontier = [], [top]
    while frontier:
        issuer = frontier.pop()
        for cert in certs:
            if cert in below or cert.issuer != issuer.subject or cert.issuer == cert.subject:
                continue
            try:
                verify_signed_by(cert, issuer)
            except (InvalidSignature, RunbookError):
                continue
            below.append(cert)
            frontier.append(cert)
    return below


def order_chain(certs: list, key, origin: str, key_origin: str = "the private key") -> list:
    """Leaf first, then each certificate's issuer; every link's signature verified.

    The leaf is the certificate whose public key matches ``key``. Input order does not matter;
    duplicates are dropped; a certificate that is nobody's issuer and not the leaf is an error.
    """
    unique, seen = [], set()
    for cert in certs:
        fp = fingerprint(cert)
        if fp not in seen:
            seen.add(fp)
            unique.append(cert)
    key_spki = _spki(key.public_key())
    leaves = [c for c in unique if _spki(c.public_key()) == key_spki]
    if not leaves:
        issuers = {c.issuer.rfc4514_string() for c in unique}
        candidates = [c for c in unique if c.subject.rfc4514_string() not in issuers] or unique
        raise RunbookError("%s: key/cert mismatch: the private key from %s does not match the certificate %s"
                           " (public keys differ)" % (origin, key_origin, _describe(candidates[0])))
    leaf = leaves[0]
    below = _issued_below(leaf, [c for c in unique if c is not leaf])
    if below:
        # The key belongs to an issuer of the bundle (e.g. the intermediate), not to the leaf:
        # name the certificate at the bottom of what it issued, the one nothing else issued to.
        bottom = [c for c in below if not any(o is not c and o.issuer == c.subject for o in below)] or below
        raise RunbookError("%s: key/cert mismatch: the private key from %s matches %s, not the leaf %s"
                           " (public keys differ)" % (origin, key_origin, _describe(leaf), _describe(bottom[0])))
    chain = [leaf]
    remaining = [c for c in unique if c is not leaf]
    current = leaf
    while remaining:
        if current.issuer == current.subject:
            break  # self-signed root: nothing can follow it
        named = [c for c in remaining if c.subject == current.issuer]
        if not named:
            break
        problems = []
        for candidate in named:
            try:
                verify_signed_by(current, candidate)
            except InvalidSignature:
                problems.append(candidate)
                continue
            chain.append(candidate)
            remaining.remove(candidate)
            current = candidate
            break
        else:
            raise RunbookError("%s: broken chain: %s is not signed by %s (signature check failed)"
                               % (origin, _describe(current), _describe(problems[0])))
    if remaining:
        strays = ", ".join(_describe(c) for c in remaining)
        raise RunbookError("%s: broken chain: %s does not belong to the chain of %s (it issued none of"
                           " its certificates)" % (origin, strays, _describe(leaf)))
    return chain


def check_validity(cert, now: datetime.datetime, min_days: int, origin: str) -> None:
    if now < _not_before(cert):
        raise RunbookError("%s: certificate %s is not yet valid (not before %s)"
                           % (origin, _describe(cert), iso(_not_before(cert))))
    if now >= _not_after(cert):
        raise RunbookError("%s: certificate %s expired on %s" % (origin, _describe(cert), iso(_not_after(cert))))
    left = days_remaining(cert, now)
    if left < min_days:
        raise RunbookError("%s: certificate %s has only %d day(s) left (expires %s), fewer than"
                           " min_days_remaining=%d" % (origin, _describe(cert), left, iso(_not_after(cert)), min_days))


def check_names(cert, expected, origin: str) -> None:
    sans = subject_alt_names(cert)
    missing = [name for name in expected or [] if not name_is_covered(name, sans)]
    if missing:
        raise RunbookError("%s: certificate %s does not cover %s (its subjectAltNames: %s)"
                           % (origin, _describe(cert), ", ".join(missing), ", ".join(sans) or "none"))


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------

def normalize_options(options: dict) -> dict:
    """Defaults applied and cross-option rules checked (the module's spec says the same)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise RunbookError("unknown option(s): %s" % ", ".join(unknown))
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in options.items() if v is not None})
    source = opts["source"]
    if source not in SOURCES:
        raise RunbookError("source: must be one of %s, got %r" % (", ".join(SOURCES), source))
    needed = {"content": ("cert_content", "key_content"), "files": ("cert_path", "key_path"),
              "self_signed": ("common_name",)}[source]
    missing = [name for name in needed if not opts[name]]
    if missing:
        raise RunbookError("source=%s needs %s" % (source, " and ".join(missing)))
    if not opts["dest_dir"]:
        raise RunbookError("dest_dir is required")
    if opts["key_type"] not in KEY_TYPES:
        raise RunbookError("key_type: must be one of %s, got %r" % (", ".join(KEY_TYPES), opts["key_type"]))
    for name in ("days", "rsa_bits", "renew_before_days", "min_days_remaining"):
        try:
            opts[name] = int(opts[name])
        except (TypeError, ValueError):
            raise RunbookError("%s: %r is not an integer" % (name, opts[name])) from None
    if source == "self_signed":
        if opts["days"] <= opts["renew_before_days"]:
            raise RunbookError("days=%d must be larger than renew_before_days=%d, or every run would renew"
                               % (opts["days"], opts["renew_before_days"]))
        if opts["key_type"] == "rsa" and opts["rsa_bits"] < 2048:
            raise RunbookError("rsa_bits=%d: use at least 2048" % opts["rsa_bits"])
    for name in ("base_name", "chain_file"):
        value = opts[name]
        if value is not None and (not value or "/" in value or value in (".", "..")):
            raise RunbookError("%s: %r must be a plain file name (no '/')" % (name, value))
    if opts["chain_file"] in (opts["base_name"] + ".crt", opts["base_name"] + ".key"):
        # one path for two files: the chain would overwrite the leaf (or the key)
        raise RunbookError("chain_file: %r is the certificate or key file of base_name %r; choose another name"
                           % (opts["chain_file"], opts["base_name"]))
    opts["cert_mode"] = _parse_mode(opts["cert_mode"], "cert_mode")
    opts["key_mode"] = _parse_mode(opts["key_mode"], "key_mode")
    for name in ("subject_alt_names", "expected_names"):
        if isinstance(opts[name], str):
            opts[name] = [opts[name]]
        opts[name] = list(opts[name] or [])
    opts["backup"] = bool(opts["backup"])
    return opts


# ---------------------------------------------------------------------------------------------
# decide
# ---------------------------------------------------------------------------------------------

def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_sources(opts: dict):
    """(certificates, key, origin) for content and files mode."""
    passphrase = opts["key_passphrase"]
    if opts["source"] == "content":
        certs = parse_certificates(opts["cert_content"], "cert_content")
        if opts["chain_content"]:
            certs += parse_certificates(opts["chain_content"], "chain_content")
        key = parse_private_key(opts["key_content"], "key_content", passphrase)
        return certs, key, "cert_content", "key_content"
    cert_path, key_path, chain_path = opts["cert_path"], opts["key_path"], opts["chain_path"]
    certs = parse_certificates(_read_source(cert_path, "cert_path"), cert_path)
    if chain_path:
        certs += parse_certificates(_read_source(chain_path, "chain_path"), chain_path)
    key = parse_private_key(_read_source(key_path, "key_path"), key_path, passphrase)
    return certs, key, cert_path, key_path


def _generate(opts: dict, now: datetime.datetime):
    if opts["key_type"] == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=opts["rsa_bits"])
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    names = _wanted_general_names(opts)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, opts["common_name"])])
    usage_kwargs = dict(digital_signature=True, content_commitment=False,
                        key_encipherment=opts["key_type"] == "rsa", data_encipherment=False,
                        key_agreement=False, key_cert_sign=False, crl_sign=False,
                        encipher_only=False, decipher_only=False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=opts["days"]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage_kwargs), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256()), key


def _wanted_general_names(opts: dict) -> list:
    """The SANs of a self-signed certificate: ``subject_alt_names``, or when empty the common name
    alone (``IP:`` for an address, else ``DNS:``)."""
    names = [parse_general_name(n) for n in opts["subject_alt_names"]]
    if not names:
        names = [parse_general_name(("IP:" if _is_ip(opts["common_name"]) else "DNS:") + opts["common_name"])]
    return names


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _self_signed_reason(opts, cert_path, key_path, chain_path, now):
    """Why the installed self-signed pair must be (re)generated, or None to keep it."""
    cert_data, key_data = _read_existing(cert_path), _read_existing(key_path)
    if cert_data is None or key_data is None or (chain_path and _read_existing(chain_path) is None):
        return "missing"
    try:
        cert = parse_certificates(cert_data, cert_path)[0]
        key = parse_private_key(key_data, key_path)
    except RunbookError as exc:
        return "unreadable: %s" % exc
    wanted_sans = sorted(format_general_name(n) for n in _wanted_general_names(opts))
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    renew_at = _not_after(cert) - datetime.timedelta(days=opts["renew_before_days"])
    checks = (
        (_spki(cert.public_key()) != _spki(key.public_key()), "key/cert mismatch"),
        (now < _not_before(cert), "not yet valid"),
        (now >= renew_at, "expires within renew_before_days"),
        (common_names != [opts["common_name"]], "common_name changed"),
        (wanted_sans != sorted(subject_alt_names(cert)), "subject_alt_names changed"),
        (key_type_of(key) != opts["key_type"], "key_type changed"),
        (opts["key_type"] == "rsa" and getattr(key, "key_size", None) != opts["rsa_bits"], "rsa_bits changed"),
    )
    for stale, reason in checks:
        if stale:
            return reason
    return None


def _describe_installed(path: str) -> dict | None:
    data = _read_existing(path)
    if data is None:
        return None
    try:
        cert = parse_certificates(data, path)[0]
    except RunbookError:
        return {"sha256_fingerprint": None, "note": "not a readable certificate"}
    return {"sha256_fingerprint": fingerprint(cert), "not_before": iso(_not_before(cert)),
            "not_after": iso(_not_after(cert))}


def _backup_name(path: str, now: datetime.datetime) -> str:
    base = "%s.%s" % (path, now.strftime("%Y%m%dT%H%M%SZ"))
    candidate, number = base, 1
    while os.path.lexists(candidate):
        candidate = "%s-%d" % (base, number)
        number += 1
    return candidate


def plan(options: dict, now: datetime.datetime | None = None) -> dict:
    """Read and check everything; return what would be written. Writes nothing."""
    require_cryptography()
    opts = normalize_options(options)
    now = _aware(now) if now is not None else utcnow()
    dest_dir = os.path.abspath(opts["dest_dir"])
    if not os.path.isdir(dest_dir):
        raise RunbookError("%s (dest_dir): no such directory; create it first" % dest_dir)
    cert_path = os.path.join(dest_dir, opts["base_name"] + ".crt")
    key_path = os.path.join(dest_dir, opts["base_name"] + ".key")
    chain_path = os.path.join(dest_dir, opts["chain_file"]) if opts["chain_file"] else None
    # Looked up once, before anything else can decide "changed": check mode fails on an unknown
    # owner or group exactly as a real run would, and apply() uses the same ids.
    uid, gid = _fileio.resolve_ids(opts["owner"], opts["group"])
    owner = uid if uid != -1 else None
    group = gid if gid != -1 else None

    if opts["source"] == "self_signed":
        reason = _self_signed_reason(opts, cert_path, key_path, chain_path, now)
        if reason is None:
            chain = parse_certificates(_read_existing(cert_path), cert_path)[:1]
            key = parse_private_key(_read_existing(key_path), key_path)
        else:
            cert, key = _generate(opts, now)
            chain = [cert]
    else:
        certs, key, origin, key_origin = _load_sources(opts)
        chain = order_chain(certs, key, origin, key_origin)
        check_validity(chain[0], now, opts["min_days_remaining"], origin)
        reason = None
    leaf = chain[0]
    check_names(leaf, opts["expected_names"], opts["cert_path"] or opts["source"])

    if chain_path:
        wanted = {cert_path: _pem(leaf), chain_path: b"".join(_pem(c) for c in chain[1:])}
    else:
        wanted = {cert_path: b"".join(_pem(c) for c in chain)}
    key_bytes = _key_pem(key)
    wanted[key_path] = key_bytes
    modes = {path: (opts["key_mode"] if path == key_path else opts["cert_mode"]) for path in wanted}

    # A symlink in place of a file is replaced by a regular file (the rename replaces the link,
    # never its target): its own mode is always 0777, and chmod would go through it.
    keep_content = opts["source"] == "self_signed" and reason is None
    content_changes = [path for path, data in wanted.items()
                       if os.path.islink(path) or (not keep_content and _read_existing(path) != data)]
    attr_changes = [path for path in wanted if path not in content_changes
                    and _fileio.attrs_differ(path, modes[path], owner, group)]

    backups = []
    if opts["backup"] and content_changes:
        for path in wanted:
            if os.path.exists(path):  # not a dangling symlink: nothing to copy
                backups.append((path, _backup_name(path, now)))

    key_desc = key_type_of(key)
    result = {
        "subject": leaf.subject.rfc4514_string(),
        "subject_alt_names": subject_alt_names(leaf),
        "issuer": leaf.issuer.rfc4514_string(),
        "not_before": iso(_not_before(leaf)),
        "not_after": iso(_not_after(leaf)),
        "days_remaining": days_remaining(leaf, now),
        "sha256_fingerprint": fingerprint(leaf),
        "key_type": key_desc,
        "chain_length": len(chain),
        "cert_file": cert_path,
        "key_file": key_path,
        "chain_file": chain_path,
        "backup_files": [pair[1] for pair in backups],
    }
    return {
        "opts": opts,
        "owner": owner,
        "group": group,
        "wanted": wanted,
        "modes": modes,
        "content_changes": content_changes,
        "attr_changes": attr_changes,
        "backups": backups,
        "dest_dir": dest_dir,
        "result": result,
        "diff": {"before": _describe_installed(cert_path) or {},
                 "after": {"sha256_fingerprint": result["sha256_fingerprint"],
                           "not_before": result["not_before"], "not_after": result["not_after"]}},
        "changed": bool(content_changes or attr_changes),
    }


# ---------------------------------------------------------------------------------------------
# act
# ---------------------------------------------------------------------------------------------

def apply(decision: dict) -> None:
    """Write what plan() decided: backups, then all files staged and committed together."""
    owner, group = decision["owner"], decision["group"]  # resolved by plan()
    _fileio.remove_stale_temps(decision["dest_dir"])
    for path, backup in decision["backups"]:
        mode = os.stat(path).st_mode & 0o7777
        if path == decision["result"]["key_file"]:
            mode &= 0o600  # a key backup is never more readable than 0600
        _fileio.copy_file(path, backup, mode=mode)
    if decision["content_changes"]:
        staged = []
        try:
            # Key, chain, certificate: the certificate goes last, so a reader that sees the new
            # certificate also finds the new key (and chain) it belongs with.
            rank = {decision["result"]["key_file"]: 0, decision["result"]["chain_file"]: 1}
            order = sorted(decision["content_changes"], key=lambda p: rank.get(p, 2))
            for path in order:
                item = _fileio.StagedFile(path, mode=decision["modes"][path], owner=owner, group=group)
                staged.append(item)
                item.write(decision["wanted"][path])
            _fileio.commit_together(staged)
        finally:
            for item in staged:
                if not item.committed:
                    item.discard()
    for path in decision["attr_changes"]:
        _fileio.apply_attrs(path, decision["modes"][path], owner, group)


def install(options: dict, check_mode: bool = False, now: datetime.datetime | None = None) -> dict:
    """Decide, then (unless check_mode) write. Returns the module result incl. ``changed`` and ``diff``."""
    decision = plan(options, now=now)
    if decision["changed"] and not check_mode:
        apply(decision)
    result = dict(decision["result"])
    result["changed"] = decision["changed"]
    result["diff"] = decision["diff"]
    return result


# ---------------------------------------------------------------------------------------------
# host-side entry point (certbot deploy hook)
# ---------------------------------------------------------------------------------------------

TLS_METRIC = "runbook_sqlite_tls_not_after_timestamp_seconds"


def write_expiry_metric(path: str, result: dict) -> None:
    """The installed certificate's expiry as a node_exporter textfile metric (the same line the
    tls role writes, so a renewal by the hook and the next role run agree)."""
    not_after = datetime.datetime.strptime(result["not_after"], "%Y-%m-%dT%H:%M:%SZ")
    epoch = calendar.timegm(not_after.timetuple())
    # write_textfile raises RunbookError naming the path (e.g. a missing directory)
    write_textfile(path, [(TLS_METRIC, "gauge", "When the installed TLS certificate expires (Unix time).",
                           {"cert": result["cert_file"]}, epoch)])


def cli(argv=None) -> int:
    """``python3 _x509.py [--check] CONFIG.json`` (``-`` reads stdin); prints the result as JSON.

    CONFIG holds the module's options. For a certbot deploy hook, ``source: files`` without
    ``cert_path``/``key_path`` uses ``$RENEWED_LINEAGE/fullchain.pem`` and ``privkey.pem``.
    Exit 0 when installed or unchanged, 1 on a RunbookError, 2 on a usage error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    check_mode = False
    if args and args[0] == "--check":
        check_mode = True
        args = args[1:]
    if len(args) != 1:
        sys.stderr.write("usage: _x509.py [--check] CONFIG.json|-\n")
        return 2
    try:
        if args[0] == "-":
            raw = sys.stdin.read()
        else:
            raw = _read_source(args[0], "config").decode("utf-8")
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise RunbookError("%s: not valid JSON: %s" % (args[0], exc)) from None
        if not isinstance(config, dict):
            raise RunbookError("%s: expected a JSON object of options" % args[0])
        # Not a module option: the TLS role's node_exporter metric, refreshed after each renewal.
        metrics_file = config.pop("metrics_file", None)
        lineage = os.environ.get("RENEWED_LINEAGE")
        if config.get("source") == "files" and lineage:
            config.setdefault("cert_path", os.path.join(lineage, "fullchain.pem"))
            config.setdefault("key_path", os.path.join(lineage, "privkey.pem"))
        result = install(config, check_mode=check_mode)
        if metrics_file and not check_mode:
            write_expiry_metric(metrics_file, result)
    except RunbookError as exc:
        sys.stderr.write("cert_install: %s\n" % exc)
        return 1
    result.pop("diff", None)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
