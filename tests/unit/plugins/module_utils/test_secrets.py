# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import stat
import tempfile

import pytest

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv, _fileio, _secrets
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError

T0 = datetime.datetime(2026, 1, 1, 3, 0, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)

BASE = (
    b"# Production settings\n"
    b"export APP_ENV=production\n"
    b"\n"
    b'DATABASE_URL="sqlite:///var/app.db?mode=rw#frag" # keep\n'
    b"HMAC_SECRET=oldhmacvalue0123456789\n"
    b"AUTH_SECRET='old-auth-secret-value'   # single quoted\n"
    b'export API_KEY="old \\"api\\" key"\n'
    b"GREETING=caf\xc3\xa9\n"
)


def _env(tmp_path, data=BASE, name=".env"):
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return str(path)


def _values(path):
    env = _dotenv.parse(open(path, "rb").read())
    return {e.key: e.value for e in env.entries if e.kind == _dotenv.ASSIGN}


def _state(path):
    data = open(path, "rb").read()
    st = os.stat(path)
    listing = sorted(os.listdir(os.path.dirname(path)))
    return hashlib.sha256(data).hexdigest(), st.st_mtime_ns, stat.S_IMODE(st.st_mode), listing


def _no_value_in(result, values):
    text = json.dumps(result)
    for value in values:
        assert value not in text


# --------------------------------------------------------------------------- generation

@pytest.mark.parametrize("nbytes", [16, 32, 48, 64])
def test_hex_matches_openssl_rand_hex(nbytes):
    value = _secrets.generate("hex", nbytes)
    assert re.fullmatch("[0-9a-f]{%d}" % (2 * nbytes), value)


@pytest.mark.parametrize("nbytes", [16, 32, 33, 64])
def test_base64_decodes_to_exactly_n_bytes(nbytes):
    value = _secrets.generate("base64", nbytes)
    assert "\n" not in value
    assert len(base64.b64decode(value, validate=True)) == nbytes


@pytest.mark.parametrize("nbytes", [16, 32, 33])
def test_urlsafe_is_unpadded_and_decodes_to_n_bytes(nbytes):
    value = _secrets.generate("urlsafe", nbytes)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", value)
    assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) == nbytes


def test_alphanumeric_length():
    value = _secrets.generate("alphanumeric", length=40)
    assert re.fullmatch("[A-Za-z0-9]{40}", value)


def test_values_differ_between_calls():
    assert _secrets.generate("hex") != _secrets.generate("hex")


def test_fingerprint_is_short_stable_and_domain_separated():
    fp = _secrets.fingerprint("abc")
    assert re.fullmatch("[0-9a-f]{12}", fp)
    assert fp == _secrets.fingerprint("abc")
    assert fp != hashlib.sha256(b"abc").hexdigest()[:12]


# --------------------------------------------------------------------------- rotation

def test_create_in_missing_file_then_idempotent(tmp_path):
    path = str(tmp_path / "app.env")
    specs = [{"name": "HMAC_SECRET"}, {"name": "AUTH_SECRET", "format": "base64"}]
    result = _secrets.rotate(path, specs, now=T0)
    assert result["changed"] and result["created"] == ["HMAC_SECRET", "AUTH_SECRET"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    values = _values(path)
    assert len(values["HMAC_SECRET"]) == 64
    assert len(base64.b64decode(values["AUTH_SECRET"])) == 32
    assert result["fingerprints"]["HMAC_SECRET"] == _secrets.fingerprint(values["HMAC_SECRET"])
    assert result["rotated_at"]["HMAC_SECRET"] == "2026-01-01T03:00:00Z"
    _no_value_in(result, values.values())
    text = open(path).read()
    assert ("# runbook.sqlite_app: HMAC_SECRET rotated_at=2026-01-01T03:00:00Z fingerprint=%s\nHMAC_SECRET="
            % result["fingerprints"]["HMAC_SECRET"]) in text

    again = _secrets.rotate(path, specs, now=T0 + DAY)
    assert not again["changed"]
    assert again["kept"] == ["HMAC_SECRET", "AUTH_SECRET"]
    assert _values(path) == values


def test_rotation_keeps_every_other_byte(tmp_path):
    path = _env(tmp_path)
    specs = [{"name": "HMAC_SECRET", "force": True}, {"name": "AUTH_SECRET", "force": True},
             {"name": "API_KEY", "force": True}]
    old = _values(path)
    result = _secrets.rotate(path, specs, now=T0)
    assert result["rotated"] == ["HMAC_SECRET", "AUTH_SECRET", "API_KEY"]
    new = _values(path)
    lines = open(path, "rb").read().split(b"\n")
    fps = result["fingerprints"]
    assert lines == [
        b"# Production settings",
        b"export APP_ENV=production",
        b"",
        b'DATABASE_URL="sqlite:///var/app.db?mode=rw#frag" # keep',
        b"# runbook.sqlite_app: HMAC_SECRET rotated_at=2026-01-01T03:00:00Z fingerprint=" + fps["HMAC_SECRET"].encode(),
        b"HMAC_SECRET=" + new["HMAC_SECRET"].encode(),
        b"# runbook.sqlite_app: AUTH_SECRET rotated_at=2026-01-01T03:00:00Z fingerprint=" + fps["AUTH_SECRET"].encode(),
        b"AUTH_SECRET='" + new["AUTH_SECRET"].encode() + b"'   # single quoted",
        b"# runbook.sqlite_app: API_KEY rotated_at=2026-01-01T03:00:00Z fingerprint=" + fps["API_KEY"].encode(),
        b'export API_KEY="' + new["API_KEY"].encode() + b'"',
        b"GREETING=caf\xc3\xa9",
        b"",
    ]
    for key in ("HMAC_SECRET", "AUTH_SECRET", "API_KEY"):
        assert new[key] != old[key]
    _no_value_in(result, list(old.values())[2:5] + [new["HMAC_SECRET"], new["AUTH_SECRET"], new["API_KEY"]])


def test_crlf_and_missing_final_newline_survive(tmp_path):
    path = _env(tmp_path, b"# c\r\nexport A=1\r\nHMAC_SECRET='x'")
    _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True, "keep_previous": True},
                           {"name": "NEW_KEY", "format": "urlsafe"}], now=T0)
    data = open(path, "rb").read()
    assert data.startswith(b"# c\r\nexport A=1\r\n# runbook.sqlite_app: HMAC_SECRET ")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert not data.endswith(b"\n")
    values = _values(path)
    assert values["HMAC_SECRET_PREVIOUS"] == "x"
    assert re.search(rb"\r\nNEW_KEY=[A-Za-z0-9_-]{43}\Z", data)


def test_existing_key_without_record_is_kept_without_max_age(tmp_path):
    path = _env(tmp_path)
    before = _state(path)
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET"}], now=T0)
    assert not result["changed"] and result["kept"] == ["HMAC_SECRET"]
    assert result["fingerprints"] == {"HMAC_SECRET": None}  # not ours: not shown
    assert _state(path) == before


def test_max_age_with_faked_clock(tmp_path):
    path = str(tmp_path / ".env")
    specs = [{"name": "HMAC_SECRET", "max_age_days": 90}]
    _secrets.rotate(path, specs, now=T0)
    first = _values(path)["HMAC_SECRET"]
    assert not _secrets.rotate(path, specs, now=T0 + 89 * DAY)["changed"]
    assert _values(path)["HMAC_SECRET"] == first
    result = _secrets.rotate(path, specs, now=T0 + 90 * DAY)
    assert result["rotated"] == ["HMAC_SECRET"]
    assert result["rotated_at"]["HMAC_SECRET"] == "2026-04-01T03:00:00Z"
    assert _values(path)["HMAC_SECRET"] != first
    assert not _secrets.rotate(path, specs, now=T0 + 91 * DAY)["changed"]


def test_max_age_rotates_unknown_or_hand_edited_age(tmp_path):
    path = _env(tmp_path)
    specs = [{"name": "HMAC_SECRET", "max_age_days": 90}]
    assert _secrets.rotate(path, specs, now=T0)["rotated"] == ["HMAC_SECRET"]  # no record: unknown age
    # an operator pastes a new value by hand: the recorded fingerprint no longer matches
    data = open(path, "rb").read()
    data = re.sub(rb"\nHMAC_SECRET=[0-9a-f]+", b"\nHMAC_SECRET=pasted-by-hand-0000000", data)
    open(path, "wb").write(data)
    result = _secrets.rotate(path, specs, now=T0 + DAY)
    assert result["rotated"] == ["HMAC_SECRET"]


def test_top_level_force_rotates_all(tmp_path):
    path = str(tmp_path / ".env")
    specs = [{"name": "A_SECRET"}, {"name": "B_SECRET"}]
    _secrets.rotate(path, specs, now=T0)
    old = _values(path)
    result = _secrets.rotate(path, specs, force=True, now=T0 + DAY)
    assert result["rotated"] == ["A_SECRET", "B_SECRET"]
    new = _values(path)
    assert all(new[k] != old[k] for k in old)


def test_previous_is_kept_then_expires(tmp_path):
    path = str(tmp_path / ".env")
    spec = {"name": "HMAC_SECRET", "keep_previous": True, "previous_ttl_days": 7}
    first = _secrets.rotate(path, [spec], now=T0)
    v1 = _values(path)["HMAC_SECRET"]
    second = _secrets.rotate(path, [dict(spec, force=True)], now=T0 + DAY)
    assert second["rotated"] == ["HMAC_SECRET"] and second["previous"] == ["HMAC_SECRET_PREVIOUS"]
    values = _values(path)
    assert values["HMAC_SECRET_PREVIOUS"] == v1
    text = open(path).read()
    assert ("# runbook.sqlite_app: HMAC_SECRET_PREVIOUS retired_at=2026-01-02T03:00:00Z fingerprint=%s\n"
            "HMAC_SECRET_PREVIOUS=%s\n" % (first["fingerprints"]["HMAC_SECRET"], v1)) in text
    assert text.index("HMAC_SECRET=") < text.index("HMAC_SECRET_PREVIOUS=")
    # within the ttl: nothing to do
    assert not _secrets.rotate(path, [spec], now=T0 + 7 * DAY)["changed"]
    # ttl over: the previous value and its record go, nothing else moves
    result = _secrets.rotate(path, [spec], now=T0 + 8 * DAY)
    assert result["changed"] and result["removed"] == ["HMAC_SECRET_PREVIOUS"]
    assert "HMAC_SECRET_PREVIOUS" not in open(path).read()
    assert _values(path) == {"HMAC_SECRET": values["HMAC_SECRET"]}
    _no_value_in(result, [v1, values["HMAC_SECRET"]])


def test_previous_not_written_by_us_is_never_removed(tmp_path):
    path = _env(tmp_path, b"HMAC_SECRET_PREVIOUS=manual\n")
    before = _state(path)
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET_X"}], check_mode=True, now=T0)
    assert result["removed"] == []
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET", "previous_ttl_days": 0}], check_mode=True, now=T0)
    assert result["removed"] == [] and result["created"] == ["HMAC_SECRET"]
    assert _state(path) == before


def test_previous_keeps_old_quoting(tmp_path):
    path = _env(tmp_path)
    _secrets.rotate(path, [{"name": "API_KEY", "force": True, "keep_previous": True}], now=T0)
    assert b'\nHMAC_SECRET_PREVIOUS' not in open(path, "rb").read()
    assert b'\nAPI_KEY_PREVIOUS="old \\"api\\" key"\n' in open(path, "rb").read()


def test_supplied_value_changes_only_when_different(tmp_path):
    path = _env(tmp_path)
    supplied = "vault-value with 'quote' and $dollar"
    result = _secrets.rotate(path, [{"name": "API_KEY", "value": supplied}], now=T0)
    assert result["rotated"] == ["API_KEY"]
    assert result["fingerprints"] == {"API_KEY": None}  # supplied: never fingerprinted
    assert _values(path)["API_KEY"] == supplied
    assert "source=supplied" in open(path).read()
    assert _secrets.fingerprint(supplied) not in open(path).read()
    _no_value_in(result, [supplied, 'old "api" key'])
    before = _state(path)
    again = _secrets.rotate(path, [{"name": "API_KEY", "value": supplied, "force": True}], force=True, now=T0 + DAY)
    assert not again["changed"] and again["kept"] == ["API_KEY"]
    assert _state(path) == before


def test_supplied_value_equal_to_file_is_not_changed(tmp_path):
    path = _env(tmp_path)
    before = _state(path)
    result = _secrets.rotate(path, [{"name": "AUTH_SECRET", "value": "old-auth-secret-value"}], now=T0)
    assert not result["changed"]
    assert _state(path) == before


def test_check_mode_writes_nothing(tmp_path):
    path = _env(tmp_path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = _state(path)
    specs = [{"name": "HMAC_SECRET", "force": True, "keep_previous": True}, {"name": "NEW_SECRET"}]
    result = _secrets.rotate(path, specs, check_mode=True, backup=True, now=T0)
    assert result["changed"]
    assert result["rotated"] == ["HMAC_SECRET"] and result["created"] == ["NEW_SECRET"]
    assert result["backup_file"] is None
    assert _state(path) == before


def test_check_mode_does_not_create_a_missing_file(tmp_path):
    path = str(tmp_path / ".env")
    result = _secrets.rotate(path, [{"name": "A"}], check_mode=True)
    assert result["changed"] and result["created"] == ["A"]
    assert os.listdir(str(tmp_path)) == []


def _record_generate(monkeypatch):
    """Replace the generator with one that records every value it hands out."""
    made = []
    real = _secrets.generate

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(_secrets, "generate", recording)
    return made


def test_check_mode_generates_no_value(tmp_path, monkeypatch):
    path = _env(tmp_path)
    before = _state(path)
    made = _record_generate(monkeypatch)
    specs = [{"name": "HMAC_SECRET", "force": True, "keep_previous": True},
             {"name": "AUTH_SECRET", "format": "base64", "keep_previous": True},
             {"name": "NEW_SECRET", "format": "alphanumeric"}, {"name": "NEW_TOKEN", "format": "urlsafe"}]
    result = _secrets.rotate(path, specs, force=True, check_mode=True, backup=True, now=T0)
    assert result["changed"]
    assert result["rotated"] == ["HMAC_SECRET", "AUTH_SECRET"] and result["created"] == ["NEW_SECRET", "NEW_TOKEN"]
    assert made == []
    assert _state(path) == before
    assert result["diff"]["after"] == (
        "HMAC_SECRET: would be rotated\n"
        "HMAC_SECRET_PREVIOUS: present (fingerprint not shown), retired_at 2026-01-01T03:00:00Z\n"
        "AUTH_SECRET: would be rotated\n"
        "AUTH_SECRET_PREVIOUS: present (fingerprint not shown), retired_at 2026-01-01T03:00:00Z\n"
        "NEW_SECRET: would be generated\n"
        "NEW_TOKEN: would be generated\n")
    # positive control: the same run for real goes through the recorder, and nothing it made is returned
    real = _secrets.rotate(path, specs, force=True, backup=True, now=T0)
    assert len(made) == 4 and set(made) <= set(_values(path).values())
    _no_value_in(real, made)


def test_check_mode_fingerprints_are_null_real_ones_match_the_file(tmp_path):
    path = str(tmp_path / ".env")
    first = _secrets.rotate(path, [{"name": "HMAC_SECRET"}], now=T0)
    old_fp = first["fingerprints"]["HMAC_SECRET"]
    assert old_fp == _secrets.fingerprint(_values(path)["HMAC_SECRET"])
    specs = [{"name": "HMAC_SECRET", "force": True, "keep_previous": True}, {"name": "AUTH_SECRET"}]
    check = _secrets.rotate(path, specs, check_mode=True, now=T0 + DAY)
    assert check["rotated"] == ["HMAC_SECRET"] and check["created"] == ["AUTH_SECRET"]
    assert check["fingerprints"] == {"HMAC_SECRET": None, "AUTH_SECRET": None}
    assert check["rotated_at"] == {"HMAC_SECRET": "2026-01-02T03:00:00Z", "AUTH_SECRET": "2026-01-02T03:00:00Z"}
    assert check["diff"]["before"] == ("HMAC_SECRET: fingerprint %s, rotated_at 2026-01-01T03:00:00Z\n"
                                       "HMAC_SECRET_PREVIOUS: absent\nAUTH_SECRET: absent\n" % old_fp)
    # the old value's fingerprint is real (it is in the file); the new one does not exist yet
    assert check["diff"]["after"] == ("HMAC_SECRET: would be rotated\n"
                                      "HMAC_SECRET_PREVIOUS: fingerprint %s, retired_at 2026-01-02T03:00:00Z\n"
                                      "AUTH_SECRET: would be generated\n" % old_fp)
    real = _secrets.rotate(path, specs, now=T0 + DAY)
    values = _values(path)
    assert real["fingerprints"] == {"HMAC_SECRET": _secrets.fingerprint(values["HMAC_SECRET"]),
                                    "AUTH_SECRET": _secrets.fingerprint(values["AUTH_SECRET"])}
    assert real["fingerprints"]["HMAC_SECRET"] != old_fp
    assert "HMAC_SECRET: fingerprint %s," % real["fingerprints"]["HMAC_SECRET"] in real["diff"]["after"]


def test_mode_is_enforced_and_reported(tmp_path):
    path = _env(tmp_path)
    os.chmod(path, 0o644)
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET"}], now=T0)
    assert result["changed"] and result["kept"] == ["HMAC_SECRET"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "mode 0644" in result["diff"]["before"] and "mode 0600" in result["diff"]["after"]
    assert open(path, "rb").read() == BASE


def test_backup_copy_is_private(tmp_path):
    path = _env(tmp_path)
    os.chmod(path, 0o640)
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], backup=True, now=T0)
    backup = result["backup_file"]
    assert backup == path + ".20260101T030000Z.bak"
    assert open(backup, "rb").read() == BASE
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    second = _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], backup=True, now=T0)
    assert second["backup_file"] == backup + ".1"


def test_owner_and_group_are_kept_when_not_given(tmp_path):
    path = _env(tmp_path)
    st = os.stat(path)
    _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], now=T0)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (st.st_uid, st.st_gid)


def test_symlinked_env_is_updated_in_place(tmp_path):
    real = _env(tmp_path, name="real.env")
    link = tmp_path / ".env"
    link.symlink_to("real.env")
    _secrets.rotate(str(link), [{"name": "NEW_SECRET"}], now=T0)
    assert link.is_symlink()
    assert "NEW_SECRET" in _values(real)


def test_dotted_and_dashed_keys_are_kept_and_a_secret_next_to_them_rotates(tmp_path):
    data = (b"spring.datasource.url=jdbc:sqlite:/var/app.db\n"
            b"HMAC_SECRET=oldhmacvalue0123456789\n"
            b"export my-app.feature-flag = 'on' # compose reads this\n"
            b"a.b-c=\"x y\"")
    path = _env(tmp_path, data)
    before = _state(path)
    kept = _secrets.rotate(path, [{"name": "HMAC_SECRET"}], now=T0)
    assert not kept["changed"] and _state(path) == before
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], now=T0)
    assert result["rotated"] == ["HMAC_SECRET"]
    new = _values(path)["HMAC_SECRET"]
    assert open(path, "rb").read() == (
        b"spring.datasource.url=jdbc:sqlite:/var/app.db\n"
        b"# runbook.sqlite_app: HMAC_SECRET rotated_at=2026-01-01T03:00:00Z fingerprint="
        + result["fingerprints"]["HMAC_SECRET"].encode() + b"\n"
        b"HMAC_SECRET=" + new.encode() + b"\n"
        b"export my-app.feature-flag = 'on' # compose reads this\n"
        b"a.b-c=\"x y\"")


def test_diff_has_names_and_fingerprints_only(tmp_path):
    path = str(tmp_path / ".env")
    first = _secrets.rotate(path, [{"name": "HMAC_SECRET"}], now=T0)
    old_value = _values(path)["HMAC_SECRET"]
    result = _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True, "keep_previous": True}], now=T0 + DAY)
    new_value = _values(path)["HMAC_SECRET"]
    old_fp, new_fp = first["fingerprints"]["HMAC_SECRET"], result["fingerprints"]["HMAC_SECRET"]
    assert result["diff"]["before"] == (
        "HMAC_SECRET: fingerprint %s, rotated_at 2026-01-01T03:00:00Z\n" % old_fp
        + "HMAC_SECRET_PREVIOUS: absent\n")
    assert result["diff"]["after"] == (
        "HMAC_SECRET: fingerprint %s, rotated_at 2026-01-02T03:00:00Z\n" % new_fp
        + "HMAC_SECRET_PREVIOUS: fingerprint %s, retired_at 2026-01-02T03:00:00Z\n" % old_fp)
    _no_value_in(result, [old_value, new_value])


def test_sensitive_sink_receives_values(tmp_path):
    path = _env(tmp_path)
    sink = set()
    _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}, {"name": "X_KEY", "value": "supplied-123456"}],
                    now=T0, sensitive=sink)
    assert {"oldhmacvalue0123456789", "supplied-123456", _values(path)["HMAC_SECRET"]} <= sink


# --------------------------------------------------------------------------- bad input

BAD_SPECS = [
    ([{"name": "1BAD"}], r"invalid name '1BAD'"),
    ([{"name": "BAD-NAME"}], r"invalid name"),
    ([{"name": "a.b"}], r"secrets\[0\]: invalid name 'a\.b': .*'\.' and '-' may appear in other keys"),
    ([{"format": "hex"}], r"invalid name None"),
    ([{"name": "A"}, {"name": "A"}], r"duplicate name A"),
    ([{"name": "A", "format": "rot13"}], r"unknown format 'rot13'"),
    ([{"name": "A", "value": "two\nlines"}], r"value contains a line break"),
    ([{"name": "A", "value": "x\r"}], r"value contains a line break"),
    ([{"name": "A", "bytes": 8}], r"bytes must be between 16 and 4096"),
    ([{"name": "A", "format": "alphanumeric", "length": 10}], r"length must be between 22"),
    ([{"name": "A", "value": "x", "max_age_days": 9}], r"max_age_days cannot rotate a supplied value"),
    ([{"name": "A"}, {"name": "A_PREVIOUS"}], r"A_PREVIOUS is managed as the previous value"),
    ([], r"non-empty list"),
]


@pytest.mark.parametrize("specs, message", BAD_SPECS)
def test_bad_specs_change_nothing(tmp_path, specs, message):
    path = _env(tmp_path)
    before = _state(path)
    with pytest.raises(RunbookError, match=message):
        _secrets.rotate(path, specs, now=T0)
    assert _state(path) == before


@pytest.mark.parametrize("data, message", [
    (b"A=1\nnot an assignment\n", r"\.env: line 2: not a KEY=value"),
    (b"HMAC_SECRET=1\nOTHER=2\nHMAC_SECRET=3\n", r"\.env: line 3: duplicate key HMAC_SECRET \(first set on line 1\)"),
    (b'A="open\n', r"\.env: line 1: double-quoted value of A is never closed"),
])
def test_bad_files_change_nothing(tmp_path, data, message):
    path = _env(tmp_path, data)
    before = _state(path)
    with pytest.raises(RunbookError, match=message):
        _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], now=T0)
    assert _state(path) == before


def test_missing_file_with_create_false(tmp_path):
    with pytest.raises(RunbookError, match=r"\.env: file does not exist and create is false"):
        _secrets.rotate(str(tmp_path / ".env"), [{"name": "A"}], create=False)
    assert os.listdir(str(tmp_path)) == []


def test_missing_directory(tmp_path):
    with pytest.raises(RunbookError, match=r"directory .*nope does not exist"):
        _secrets.rotate(str(tmp_path / "nope" / ".env"), [{"name": "A"}])


def test_not_a_regular_file(tmp_path):
    with pytest.raises(RunbookError, match="not a regular file"):
        _secrets.rotate(str(tmp_path), [{"name": "A"}])


def test_bad_mode(tmp_path):
    path = _env(tmp_path)
    with pytest.raises(RunbookError, match=r"mode 'u\+rw': give an octal string"):
        _secrets.rotate(path, [{"name": "A"}], mode="u+rw")


def test_unknown_owner(tmp_path):
    path = _env(tmp_path)
    before = _state(path)
    with pytest.raises(RunbookError, match="no such user"):
        _secrets.rotate(path, [{"name": "A"}], owner="no-such-user-runbook")
    assert _state(path) == before


def test_unwritable_directory(tmp_path, monkeypatch):
    path = _env(tmp_path)
    before = _state(path)
    if os.geteuid() != 0:
        os.chmod(str(tmp_path), 0o500)
    else:
        # root ignores permission bits: make the temp file creation fail the way EACCES does
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(_fileio.tempfile, "mkstemp", denied)
    try:
        with pytest.raises(RunbookError, match=r"\.env: (directory .* is not writable|cannot create a temp file"
                                               r" in .*: permission denied)"):
            _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], now=T0)
    finally:
        os.chmod(str(tmp_path), 0o700)
    monkeypatch.undo()
    assert _state(path) == before
    assert not [n for n in os.listdir(str(tmp_path)) if n.startswith(_fileio.TEMP_PREFIX)]
    assert tempfile.mkstemp  # the real one is back


def _pretend_not_root(monkeypatch, uid=4242, gid=4242):
    """Tests run as root: make rotate() see an unprivileged caller (the syscalls stay root's)."""
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.setattr(os, "getegid", lambda: gid)
    monkeypatch.setattr(os, "getgroups", lambda: [gid])


@pytest.mark.parametrize("check_mode", [True, False])
@pytest.mark.parametrize("case", [
    (None, None, r"kept from the current file"),
    (None, "4242", r"as asked, the rest kept from the current file"),
    ("0", "0", r"as asked"),
])
def test_not_root_cannot_give_the_file_away(tmp_path, monkeypatch, check_mode, case):
    owner, group, how = case
    path = _env(tmp_path)
    st = os.stat(path)
    if st.st_uid == 4242:
        pytest.skip("the test user is uid 4242")
    before = _state(path)
    _pretend_not_root(monkeypatch)
    want_gid = int(group) if group else st.st_gid
    message = (r"^%s: cannot write it as uid 4242 gid 4242: it must get owner uid %d group gid %d \(%s\), and only "
               r"root can give a file to another user or group \(use become\)$"
               % (re.escape(path), int(owner) if owner else st.st_uid, want_gid, how))
    with pytest.raises(RunbookError, match=message):
        _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], owner=owner, group=group,
                        check_mode=check_mode, backup=True, now=T0)
    assert _state(path) == before


@pytest.mark.parametrize("check_mode", [True, False])
def test_not_root_cannot_change_mode_of_a_file_it_does_not_own(tmp_path, monkeypatch, check_mode):
    path = _env(tmp_path)
    os.chmod(path, 0o644)
    if os.stat(path).st_uid == 4242:
        pytest.skip("the test user is uid 4242")
    before = _state(path)
    _pretend_not_root(monkeypatch)
    with pytest.raises(RunbookError, match=r"^%s: cannot change its mode/owner/group: it belongs to uid %d and we "
                                           r"run as uid 4242, not root" % (re.escape(path), os.stat(path).st_uid)):
        _secrets.rotate(path, [{"name": "HMAC_SECRET"}], check_mode=check_mode, now=T0)
    assert _state(path) == before


def test_not_root_owning_the_file_is_not_refused(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the file to uid 4242")
    path = _env(tmp_path)
    os.chown(path, 4242, 4242)
    _pretend_not_root(monkeypatch)
    assert _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], check_mode=True, now=T0)["changed"]
    assert _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], now=T0)["rotated"] == ["HMAC_SECRET"]
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (4242, 4242)


@pytest.mark.parametrize("check_mode", [True, False])
def test_directory_without_search_permission_fails_in_both_modes(tmp_path, monkeypatch, check_mode):
    path = _env(tmp_path)
    before = _state(path)
    directory = os.path.dirname(os.path.realpath(path))
    real_access = os.access

    def access(target, mode, **kwargs):
        # write but no search (x) permission: no file can be created there (root would get True)
        if os.fspath(target) == directory and mode & os.X_OK:
            return False
        return real_access(target, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(RunbookError, match=r"^%s: directory %s is not writable \(no write and search permission "
                                           r"for uid \d+\): the file is replaced via a temp file there$"
                                           % (re.escape(path), re.escape(directory))):
        _secrets.rotate(path, [{"name": "HMAC_SECRET", "force": True}], check_mode=check_mode, now=T0)
    monkeypatch.undo()
    assert _state(path) == before
