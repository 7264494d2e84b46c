# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the backup role runs these engines on hosts that have no Ansible.
"""Secret rotation in a .env file: decide, then apply; never return, log or diff a value.

The rotation age lives in the .env file itself, in one comment line we manage directly above
each key we set::

    # runbook.sqlite_app: HMAC_SECRET rotated_at=2026-11-23T03:00:00Z fingerprint=3f2a9c01be77
    HMAC_SECRET=...

A fingerprint is the first 12 hex digits of sha256 over a domain-separated input. It is only
recorded and shown for values we generated (high entropy, so not guessable); a supplied value
(from a vault) gets ``source=supplied`` and no fingerprint, because a fingerprint of a weak
password could be brute-forced from a log. See docs/secrets.md.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import secrets as _random
import stat
import string

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError
from ansible_collections.runbook.sqlite_app.plugins.module_utils._fileio import (
    attrs_differ, apply_attrs, copy_file, describe_oserror, remove_stale_temps, resolve_ids, write_file,
)

FORMATS = ("hex", "base64", "urlsafe", "alphanumeric")
DEFAULT_BYTES = 32
DEFAULT_LENGTH = 32
MIN_BYTES = 16            # 128 bits: below that a shown fingerprint becomes a guessing oracle
MAX_BYTES = 4096
MIN_LENGTH = 22           # 22 alphanumeric characters carry > 128 bits
MAX_LENGTH = 4096
DEFAULT_PREVIOUS_TTL_DAYS = 7
PREVIOUS_SUFFIX = "_PREVIOUS"
META_PREFIX = "# runbook.sqlite_app: "
FINGERPRINT_DOMAIN = b"runbook.sqlite_app/secret-fingerprint/v1\x00"
ALPHANUMERIC = string.ascii_letters + string.digits
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Values shorter than this are not registered as "never print": masking "true" everywhere helps nobody.
MIN_MASK_LENGTH = 8

_META_RE = re.compile(r"# runbook\.sqlite_app: (?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<fields>(?: [a-z_]+=[^ ]*)*)[ \t]*\Z")


# ---------------------------------------------------------------------------------------------
# small helpers

def fingerprint(value: str) -> str:
    """12 hex digits of sha256(domain || value): identifies a value without revealing it."""
    return hashlib.sha256(FINGERPRINT_DOMAIN + value.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def generate(fmt: str = "hex", nbytes: int = DEFAULT_BYTES, length: int = DEFAULT_LENGTH) -> str:
    """A new random value: hex == ``openssl rand -hex N``, base64 == ``openssl rand -base64 N``
    (on one line), urlsafe == URL-safe base64 of N bytes without padding, alphanumeric == length chars."""
    if fmt == "hex":
        return _random.token_hex(nbytes)
    if fmt == "base64":
        return base64.b64encode(_random.token_bytes(nbytes)).decode("ascii")
    if fmt == "urlsafe":
        return base64.urlsafe_b64encode(_random.token_bytes(nbytes)).decode("ascii").rstrip("=")
    if fmt == "alphanumeric":
        return "".join(_random.choice(ALPHANUMERIC) for dummy in range(length))
    raise RunbookError("unknown format %r (choose from %s)" % (fmt, ", ".join(FORMATS)))


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def format_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def parse_mode(mode) -> int | None:
    """'0600' / '600' / 0o600 -> int. Symbolic modes are refused."""
    if mode is None or mode == "":
        return None
    if isinstance(mode, int) and not isinstance(mode, bool):
        value = mode
    else:
        text = str(mode).strip()
        if not re.match(r"0?[0-7]{3,4}\Z", text) and not re.match(r"0o[0-7]{3,4}\Z", text):
            raise RunbookError("mode %r: give an octal string such as '0600'" % (mode,))
        value = int(text.replace("0o", ""), 8)
    if not 0 <= value <= 0o7777:
        raise RunbookError("mode %r: out of range" % (mode,))
    return value


class Meta:
    """Our metadata comment for one key (or None fields when absent/unreadable)."""

    def __init__(self, index: int | None = None, fields: dict | None = None):
        self.index = index
        self.fields = fields or {}

    @property
    def present(self) -> bool:
        return self.index is not None

    def time(self, field: str) -> datetime.datetime | None:
        return parse_time(self.fields.get(field))


def parse_meta_line(text: str) -> tuple[str, dict] | None:
    match = _META_RE.match(text)
    if not match:
        return None
    fields = {}
    for item in match.group("fields").split():
        key, dummy, value = item.partition("=")
        fields[key] = value
    return match.group("name"), fields


def find_meta(env: _dotenv.DotEnv, key: str) -> Meta:
    """Our metadata line directly above ``key`` (no blank line in between) naming that key."""
    for i, entry in enumerate(env.entries):
        if entry.kind == _dotenv.ASSIGN and entry.key == key:
            if i > 0 and env.entries[i - 1].kind == _dotenv.COMMENT:
                parsed = parse_meta_line(env.entries[i - 1].comment_text)
                if parsed and parsed[0] == key:
                    return Meta(i - 1, parsed[1])
            return Meta()
    return Meta()


def meta_text(name: str, fields: list[tuple[str, str]]) -> str:
    return META_PREFIX + name + "".join(" %s=%s" % kv for kv in fields)


def verified_fingerprint(entry: _dotenv.Entry | None, meta: Meta) -> str | None:
    """The fingerprint we may show: recorded by us and still matching the value in the file."""
    if entry is None or not meta.present:
        return None
    recorded = meta.fields.get("fingerprint")
    if recorded and recorded == fingerprint(entry.value):
        return recorded
    return None


def describe(env: _dotenv.DotEnv, name: str) -> str:
    """One diff line for ``name``: never a value, fingerprints only for what we generated."""
    entry = env.get(name)
    if entry is None:
        return "%s: absent" % name
    meta = find_meta(env, name)
    fp = verified_fingerprint(entry, meta)
    when = meta.fields.get("rotated_at") or meta.fields.get("retired_at")
    label = "retired_at" if "retired_at" in meta.fields else "rotated_at"
    if fp:
        return "%s: fingerprint %s, %s %s" % (name, fp, label, when)
    if meta.present and meta.fields.get("source") == "supplied":
        return "%s: supplied value (fingerprint not shown), %s %s" % (name, label, when)
    if meta.present and when:
        return "%s: present (fingerprint not shown), %s %s" % (name, label, when)
    return "%s: present, not set by runbook.sqlite_app (fingerprint not shown)" % name


# ---------------------------------------------------------------------------------------------
# input checks

def _int_option(item: dict, key: str, name: str, *, default, minimum: int, maximum: int | None):
    value = item.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        raise RunbookError("secret %s: %s must be an integer" % (name, key))
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise RunbookError("secret %s: %s must be an integer, got %r" % (name, key, value)) from None
    if value < minimum or (maximum is not None and value > maximum):
        limit = "at least %d" % minimum if maximum is None else "between %d and %d" % (minimum, maximum)
        raise RunbookError("secret %s: %s must be %s, got %d" % (name, key, limit, value))
    return value


def normalize_specs(specs) -> list[dict]:
    """Check the ``secrets`` list and fill in defaults; raise RunbookError on the first problem."""
    if not isinstance(specs, list) or not specs:
        raise RunbookError("secrets: give a non-empty list of secrets")
    out = []
    seen = set()
    for pos, item in enumerate(specs):
        if not isinstance(item, dict):
            raise RunbookError("secrets[%d]: each entry must be a dictionary" % pos)
        name = item.get("name")
        if not isinstance(name, str) or not _dotenv.NAME_RE.match(name):
            hint = ""
            if isinstance(name, str) and ("." in name or "-" in name):
                # the file may hold keys such as spring.datasource.url (kept as they are); we set env names only
                hint = " ('.' and '-' may appear in other keys of the file, not in managed names)"
            raise RunbookError("secrets[%d]: invalid name %r: use letters, digits and _ and do not start "
                               "with a digit%s" % (pos, name, hint))
        if name in seen:
            raise RunbookError("secrets: duplicate name %s" % name)
        seen.add(name)
        fmt = item.get("format") or "hex"
        if fmt not in FORMATS:
            raise RunbookError("secret %s: unknown format %r (choose from %s)" % (name, fmt, ", ".join(FORMATS)))
        value = item.get("value")
        if value is not None:
            if not isinstance(value, str):
                raise RunbookError("secret %s: value must be a string" % name)
            if "\n" in value or "\r" in value:
                raise RunbookError("secret %s: value contains a line break, which a .env line cannot hold" % name)
            if item.get("max_age_days") is not None:
                raise RunbookError("secret %s: max_age_days cannot rotate a supplied value; rotate it at "
                                   "its source" % name)
        spec = {
            "name": name,
            "format": fmt,
            "bytes": _int_option(item, "bytes", name, default=DEFAULT_BYTES, minimum=MIN_BYTES, maximum=MAX_BYTES),
            "length": _int_option(item, "length", name, default=DEFAULT_LENGTH, minimum=MIN_LENGTH, maximum=MAX_LENGTH),
            "value": value,
            "max_age_days": _int_option(item, "max_age_days", name, default=None, minimum=1, maximum=None),
            "force": bool(item.get("force")),
            "keep_previous": bool(item.get("keep_previous")),
            "previous_ttl_days": _int_option(item, "previous_ttl_days", name,
                                             default=DEFAULT_PREVIOUS_TTL_DAYS, minimum=0, maximum=None),
        }
        out.append(spec)
    for spec in out:
        if spec["name"] + PREVIOUS_SUFFIX in seen:
            raise RunbookError("secrets: %s%s is managed as the previous value of %s and cannot be listed "
                               "as a secret too" % (spec["name"], PREVIOUS_SUFFIX, spec["name"]))
    return out


# ---------------------------------------------------------------------------------------------
# decide + apply

def _remove_key(env: _dotenv.DotEnv, key: str) -> None:
    meta = find_meta(env, key)
    env.entries = [e for i, e in enumerate(env.entries)
                   if not ((e.kind == _dotenv.ASSIGN and e.key == key) or i == meta.index)]


def _set_meta(env: _dotenv.DotEnv, key: str, fields: list[tuple[str, str]]) -> None:
    """Write (or replace) our metadata line directly above ``key``."""
    text = meta_text(key, fields)
    meta = find_meta(env, key)
    if meta.present:
        old = env.entries[meta.index]
        env.entries[meta.index] = _dotenv.Entry(_dotenv.COMMENT, text + old.eol, old.lineno, eol=old.eol)
        return
    pos = env.index()[key]
    env.entries.insert(pos, env.make_comment(text))


def _append_key(env: _dotenv.DotEnv, key: str, value: str, fields, after: str | None = None) -> None:
    entry = env.make_assignment(key, value)
    comment = env.make_comment(meta_text(key, fields))
    if after is not None and after in env.index():
        pos = env.index()[after] + 1
        if pos == len(env.entries) and not env.entries[-1].eol:
            env.ensure_final_newline()
            entry.set_eol("")
        env.entries[pos:pos] = [comment, entry]
        return
    had_final_newline = not env.entries or bool(env.entries[-1].eol)
    env.ensure_final_newline()
    env.entries.extend([comment, entry])
    if not had_final_newline:
        # the file had no final newline: keep it that way.
        entry.set_eol("")


def _copy_value(dest: _dotenv.Entry, src: _dotenv.Entry) -> None:
    """Give ``dest`` the exact value text and quoting of ``src`` (no decode/encode round trip)."""
    dest.quote, dest.raw_value = src.quote, src.raw_value
    dest.raw = dest.head + src.quote + src.raw_value + src.quote + dest.tail + dest.eol


def _register(sink, value: str | None) -> None:
    if sink is not None and value and len(value) >= MIN_MASK_LENGTH:
        sink.add(value)


def rotate(path: str, secrets: list, *, force: bool = False, create: bool = True, mode="0600", owner=None,
           group=None, backup: bool = False, check_mode: bool = False, now: datetime.datetime | None = None,
           sensitive: set | None = None) -> dict:
    """Rotate ``secrets`` in the .env at ``path``; returns names, fingerprints and times, never a value.

    ``sensitive`` (a set, e.g. AnsibleModule.no_log_values) receives every value we read or write,
    so a caller can mask them should one ever reach output by accident.
    """
    try:
        specs = normalize_specs(secrets)
        file_mode = parse_mode(mode)
        resolve_ids(owner, group)  # an unknown user/group fails before anything is decided
    except RunbookError as err:
        raise RunbookError("%s: %s" % (path, err)) from None
    now = (now or utcnow()).astimezone(datetime.timezone.utc).replace(microsecond=0)
    stamp = format_time(now)
    # a symlinked .env (/srv/app/.env -> /etc/app/env) is updated where it points, not replaced
    target = os.path.realpath(path)
    directory = os.path.dirname(target)

    # ---- read ----------------------------------------------------------------------------
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise RunbookError("%s: cannot stat: %s" % (path, describe_oserror(exc))) from None
    if st is None:
        if not create:
            raise RunbookError("%s: file does not exist and create is false" % path)
        if not os.path.isdir(directory):
            raise RunbookError("%s: directory %s does not exist" % (path, directory))
        original = b""
    else:
        if not stat.S_ISREG(st.st_mode):
            raise RunbookError("%s: not a regular file" % path)
        try:
            with open(target, "rb") as handle:
                original = handle.read()
        except OSError as exc:
            raise RunbookError("%s: cannot read: %s" % (path, describe_oserror(exc))) from None
    env = _dotenv.parse(original, path)
    before_env = _dotenv.parse(original, path)

    result = {
        "path": path, "changed": False, "rotated": [], "created": [], "kept": [], "removed": [],
        "previous": [], "fingerprints": {}, "rotated_at": {}, "backup_file": None,
    }

    # ---- decide (and apply to the in-memory model; check mode stops before writing) -------
    pending = {}  # check mode: name -> diff line of a value that would be generated
    for spec in specs:
        name = spec["name"]
        entry = env.get(name)
        meta = find_meta(env, name)
        current = entry.value if entry is not None else None
        _register(sensitive, current)
        supplied = spec["value"]
        action = None
        if supplied is not None:
            _register(sensitive, supplied)
            if entry is None:
                action = "create"
            elif current != supplied:
                action = "rotate"
        else:
            known_fp = verified_fingerprint(entry, meta)
            rotated_at = meta.time("rotated_at") if known_fp else None
            if entry is None:
                action = "create"
            elif force or spec["force"]:
                action = "rotate"
            elif spec["max_age_days"] is not None:
                # unknown age (no metadata, or the value was edited by hand) counts as too old
                if rotated_at is None or now - rotated_at >= datetime.timedelta(days=spec["max_age_days"]):
                    action = "rotate"

        prev_name = name + PREVIOUS_SUFFIX
        if action is not None:
            if supplied is not None:
                new_value = supplied
                fields = [("rotated_at", stamp), ("source", "supplied")]
            elif check_mode:
                # nothing is written, so no value is made: none can leak, and no fingerprint is
                # shown for a value that will never exist
                new_value = None
                fields = [("rotated_at", stamp)]
                pending[name] = "%s: would be %s" % (name, "generated" if action == "create" else "rotated")
            else:
                new_value = generate(spec["format"], spec["bytes"], spec["length"])
                _register(sensitive, new_value)
                fields = [("rotated_at", stamp), ("fingerprint", fingerprint(new_value))]
            if action == "create":
                _append_key(env, name, new_value or "", fields)
                result["created"].append(name)
            else:
                old_fp = verified_fingerprint(entry, meta)
                if spec["keep_previous"]:
                    prev_fields = [("retired_at", stamp)] + ([("fingerprint", old_fp)] if old_fp else [])
                    if env.get(prev_name) is None:
                        _append_key(env, prev_name, "", prev_fields, after=name)
                    else:
                        _set_meta(env, prev_name, prev_fields)
                    _copy_value(env.get(prev_name), entry)
                    result["previous"].append(prev_name)
                if new_value is not None:
                    entry.set_value(new_value)
                _set_meta(env, name, fields)
                result["rotated"].append(name)
        else:
            result["kept"].append(name)

        # expire an old <NAME>_PREVIOUS we wrote (never one we did not write)
        if prev_name not in result["previous"]:
            prev = env.get(prev_name)
            prev_meta = find_meta(env, prev_name)
            retired = prev_meta.time("retired_at")
            if prev is not None and retired is not None:
                _register(sensitive, prev.value)
                if now - retired >= datetime.timedelta(days=spec["previous_ttl_days"]):
                    _remove_key(env, prev_name)
                    result["removed"].append(prev_name)

        final = env.get(name)
        final_meta = find_meta(env, name)
        result["fingerprints"][name] = None if name in pending else verified_fingerprint(final, final_meta)
        result["rotated_at"][name] = final_meta.fields.get("rotated_at") if final_meta.present else None

    new_data = env.serialize()
    content_changed = st is None or new_data != original or bool(pending)
    attrs_changed = st is not None and attrs_differ(target, file_mode, owner, group)
    result["changed"] = content_changed or attrs_changed

    before_lines, after_lines = [], []
    for spec in specs:
        for key in (spec["name"], spec["name"] + PREVIOUS_SUFFIX):
            if key == spec["name"] or before_env.get(key) is not None or env.get(key) is not None:
                before_lines.append(describe(before_env, key))
                after_lines.append(pending.get(key) or describe(env, key))
    if st is None:
        before_lines = ["(file absent)"]
    elif attrs_changed:
        before_lines.append("file: mode %04o uid %d gid %d" % (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        uid, gid = resolve_ids(owner, group)
        after_lines.append("file: mode %04o uid %d gid %d" % (
            file_mode if file_mode is not None else stat.S_IMODE(st.st_mode),
            st.st_uid if uid == -1 else uid, st.st_gid if gid == -1 else gid))
    result["diff"] = {"before": "\n".join(before_lines) + "\n", "after": "\n".join(after_lines) + "\n",
                      "before_header": path, "after_header": path}

    if not result["changed"]:
        return result
    # what the real run would fail on fails here, so check mode does not predict a success
    _check_can_write(path, directory, st, content_changed, owner=owner, group=group)
    if check_mode:
        return result

    # ---- apply ----------------------------------------------------------------------------
    remove_stale_temps(directory)  # what a killed run (kill -9, power loss) left behind
    if content_changed:
        if backup and st is not None:
            result["backup_file"] = _backup_name(target, now)
            copy_file(target, result["backup_file"], mode=0o600)
        # keep the current owner/group unless asked otherwise: the app must still read its .env
        write_owner = owner if owner not in (None, "") else (st.st_uid if st is not None else None)
        write_group = group if group not in (None, "") else (st.st_gid if st is not None else None)
        write_file(target, new_data, mode=file_mode if file_mode is not None else 0o600,
                   owner=write_owner, group=write_group)
    else:
        apply_attrs(target, file_mode, owner, group)
    return result


def _check_can_write(path: str, directory: str, st, content_changed: bool, *, owner, group) -> None:
    """Raise what the apply step would hit: an unwritable directory, or a chown only root may do."""
    euid, egid = os.geteuid(), os.getegid()
    if content_changed and not os.access(directory, os.W_OK | os.X_OK):
        # the new file (and a backup) is a temp file in that directory, renamed into place
        try:
            read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        cause = "read-only file system" if read_only else "no write and search permission for uid %d" % euid
        raise RunbookError("%s: directory %s is not writable (%s): the file is replaced via a temp file there"
                           % (path, directory, cause))
    if euid == 0:
        return
    uid, gid = resolve_ids(owner, group)
    if not content_changed and st.st_uid != euid:
        raise RunbookError("%s: cannot change its mode/owner/group: it belongs to uid %d and we run as uid %d, "
                           "not root (use become)" % (path, st.st_uid, euid))
    how = "as asked"
    if content_changed and st is not None and (uid == -1 or gid == -1):
        # the rewritten file keeps the current owner/group unless told otherwise
        how = "kept from the current file" if uid == gid == -1 else "as asked, the rest kept from the current file"
        uid = st.st_uid if uid == -1 else uid
        gid = st.st_gid if gid == -1 else gid
    if uid not in (-1, euid) or gid not in (-1, egid, *os.getgroups()):
        raise RunbookError("%s: cannot write it as uid %d gid %d: it must get owner uid %d group gid %d (%s), and "
                           "only root can give a file to another user or group (use become)"
                           % (path, euid, egid, euid if uid == -1 else uid, egid if gid == -1 else gid, how))


def _backup_name(path: str, now: datetime.datetime) -> str:
    base = "%s.%s.bak" % (path, now.strftime("%Y%m%dT%H%M%SZ"))
    candidate = base
    counter = 1
    while os.path.lexists(candidate):
        candidate = "%s.%d" % (base, counter)
        counter += 1
    return candidate
