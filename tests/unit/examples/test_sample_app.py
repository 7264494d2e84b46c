# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Black-box tests of examples/sample_app: releases are built with make-release.sh, each app runs
as a subprocess on 127.0.0.1 with a real SQLite file under tmp_path."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[3] / "examples" / "sample_app"
MAKE_RELEASE = APP_DIR / "make-release.sh"
SECRET = "unit-test-secret-0123456789"

pytestmark = pytest.mark.skipif(
    not MAKE_RELEASE.is_file() or shutil.which("bash") is None,
    reason="examples/sample_app/make-release.sh or bash not available",
)


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="session")
def releases(tmp_path_factory):
    """{version: directory holding that release's unpacked files}, built by make-release.sh."""
    out = tmp_path_factory.mktemp("dist")
    unpacked = {}
    for version in (1, 2, 3):
        res = subprocess.run(
            ["bash", str(MAKE_RELEASE), str(version), str(out)],
            capture_output=True, text=True, check=True)
        archive = Path(res.stdout.strip())
        assert archive == out / ("sample-app-%d.tar.gz" % version)
        dest = tmp_path_factory.mktemp("release-%d" % version)
        with tarfile.open(archive) as tar:
            assert sorted(tar.getnames()) == ["VERSION", "sample_app.py"]
            tar.extractall(dest)  # noqa: S202 - our own archive
        unpacked[version] = dest
    return unpacked


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(data_dir, port=None, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAMPLE_APP_") and not k.startswith("HMAC_SECRET")}
    env["SAMPLE_APP_DATA_DIR"] = str(data_dir)
    if port is not None:
        env["SAMPLE_APP_LISTEN"] = "127.0.0.1:%d" % port
    env["HMAC_SECRET"] = SECRET
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cmd(release, command, env):
    return subprocess.run(
        [sys.executable, str(release / "sample_app.py"), command],
        env=env, capture_output=True, text=True, timeout=30, check=False)


class Running:
    def __init__(self, release, env, scheme="http", context=None):
        self.port = int(env["SAMPLE_APP_LISTEN"].rsplit(":", 1)[1])
        self.base = "%s://127.0.0.1:%d" % (scheme, self.port)
        self.context = context
        self.stderr_path = Path(env["SAMPLE_APP_DATA_DIR"]).parent / (
            "serve-%d.log" % self.port)
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(release / "sample_app.py"), "serve"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("app exited %s: %s" % (self.proc.returncode, self.log()))
            try:
                self.request("GET", "/healthz")
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        "app did not answer /healthz: %s" % self.log()) from None
                time.sleep(0.05)

    def log(self):
        self.stderr.flush()
        return self.stderr_path.read_text()

    def request(self, method, path, body=None, headers=None):
        """(status, headers, raw body bytes); never raises on HTTP error statuses."""
        data = None if body is None else (body if isinstance(body, bytes) else
                                          json.dumps(body).encode())
        # self.base is always http(s)://127.0.0.1:<port>
        req = urllib.request.Request(  # noqa: S310
            self.base + path, data=data, method=method, headers=headers or {})
        try:
            # the URL is always http(s)://127.0.0.1:<port>/...
            with urllib.request.urlopen(req, timeout=10, context=self.context) as resp:  # noqa: S310
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def json(self, method, path, body=None, headers=None):
        status, _headers, raw = self.request(method, path, body, headers)
        return status, json.loads(raw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path):
    started = []

    def _serve(release, env, **kwargs):
        app = Running(release, env, **kwargs)
        started.append(app)
        return app

    yield _serve
    for app in started:
        app.stop()


def sign(secret, payload):
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------
# releases


def test_releases_bake_their_version(releases):
    for version, where in releases.items():
        assert (where / "VERSION").read_text() == "%d\n" % version
        res = run_cmd(where, "version", app_env(where))
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == str(version)


def test_release_archive_is_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        subprocess.run(["bash", str(MAKE_RELEASE), "2", str(out)], check=True,
                       capture_output=True)
    assert (a / "sample-app-2.tar.gz").read_bytes() == (b / "sample-app-2.tar.gz").read_bytes()


@pytest.mark.parametrize("args", [[], ["1"], ["abc", "/tmp"], ["0", "/tmp"], ["-1", "/tmp"]])
def test_make_release_rejects_bad_arguments(args, tmp_path):
    res = subprocess.run(["bash", str(MAKE_RELEASE), *args], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert res.returncode == 64
    assert "usage" in res.stderr or "positive integer" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_usage_error(releases, tmp_path):
    res = run_cmd(releases[1], "frobnicate", app_env(tmp_path / ".data"))
    assert res.returncode == 64
    assert "usage" in res.stderr


# ---------------------------------------------------------------------------------------------
# serving


def test_healthz_readyz_and_signature(releases, tmp_path, serve):
    app = serve(releases[1], app_env(tmp_path / ".data", free_port()))
    status, headers, raw = app.request("GET", "/healthz")
    assert status == 200
    assert json.loads(raw) == {"status": "ok", "version": 1}
    assert headers["X-Signature"] == sign(SECRET, raw)
    assert headers["X-App-Version"] == "1"
    status, doc = app.json("GET", "/readyz")
    assert status == 200
    assert doc["status"] == "ready" and doc["schema"] == 1 and doc["expected_schema"] == 1
    assert "initialised new database" in app.log()
    # the database lives where the environment says, in WAL mode, not world-readable
    db = tmp_path / ".data" / "app.db"
    assert db.is_file()
    assert db.stat().st_mode & 0o077 == 0
    conn = sqlite3.connect(str(db))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


def test_db_path_remap(releases, tmp_path, serve):
    env = app_env(tmp_path / ".data", free_port(), SAMPLE_APP_DB=str(tmp_path / "var" / "app.db"))
    app = serve(releases[2], env)
    assert app.json("POST", "/items", {"body": "x"})[0] == 201
    assert (tmp_path / "var" / "app.db").is_file()
    assert not (tmp_path / ".data" / "app.db").exists()


def test_post_and_get_items(releases, tmp_path, serve):
    app = serve(releases[2], app_env(tmp_path / ".data", free_port()))
    status, item = app.json("POST", "/items", {"body": "first", "tags": "a,b"})
    assert status == 201
    assert item["id"] == 1 and item["body"] == "first" and item["tags"] == "a,b"
    assert item["created_at"].endswith("Z")
    assert app.json("POST", "/items", {"body": "second"})[0] == 201
    status, items = app.json("GET", "/items")
    assert status == 200
    got = [(i["id"], i["body"], i["tags"]) for i in items]
    assert got == [(1, "first", "a,b"), (2, "second", "")]
    assert app.json("GET", "/stats") == (200, {"items": 2, "schema": 2, "version": 2})


BAD_BODIES = [
    b"", b"not json", b"[]", b'{"body": ""}', b'{"body": 3}', b'{"text": "x"}',
    b'{"body": "x", "tags": 5}', b"\xff\xfe",
]


def test_post_rejects_bad_bodies(releases, tmp_path, serve):
    # one server for every case (starting one per case is slow on a busy runner)
    app = serve(releases[2], app_env(tmp_path / ".data", free_port()))
    for body in BAD_BODIES:
        status, doc = app.json("POST", "/items", body, {"Content-Type": "application/json"})
        assert status == 400, body
        assert doc["error"], body
    status, doc = app.json("POST", "/items", {"body": "x" * (70 * 1024)})
    assert status == 413
    assert app.json("GET", "/stats")[1]["items"] == 0


def test_unknown_route_and_method(releases, tmp_path, serve):
    app = serve(releases[1], app_env(tmp_path / ".data", free_port()))
    assert app.json("GET", "/nope")[0] == 404
    assert app.json("POST", "/healthz", {})[0] == 405


def test_signed_requests_verify_with_current_or_previous_secret(releases, tmp_path, serve):
    env = app_env(tmp_path / ".data", free_port(), HMAC_SECRET_PREVIOUS="old-secret")
    app = serve(releases[2], env)
    for secret in (SECRET, "old-secret"):
        payload = json.dumps({"body": "signed with " + secret}).encode()
        status, _doc = app.json("POST", "/items", payload, {"X-Signature": sign(secret, payload)})
        assert status == 201
    payload = b'{"body": "forged"}'
    status, doc = app.json("POST", "/items", payload, {"X-Signature": sign("wrong", payload)})
    assert status == 401
    assert "does not verify" in doc["error"]
    assert app.json("GET", "/stats")[1]["items"] == 2
    # key fingerprints, never the secrets
    status, raw_headers, raw = app.request("GET", "/keyinfo")
    assert SECRET.encode() not in raw and b"old-secret" not in raw
    doc = json.loads(raw)
    assert doc["current"] == hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    assert doc["previous"] == hashlib.sha256(b"old-secret").hexdigest()[:12]


def test_concurrent_writes(releases, tmp_path, serve):
    app = serve(releases[2], app_env(tmp_path / ".data", free_port()))
    statuses = []

    def post(n):
        statuses.append(app.json("POST", "/items", {"body": "n%d" % n})[0])

    threads = [threading.Thread(target=post, args=(n,)) for n in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [201] * 25
    assert app.json("GET", "/stats")[1]["items"] == 25


def test_missing_hmac_secret_refused(releases, tmp_path):
    port = free_port()
    env = app_env(tmp_path / ".data", port, HMAC_SECRET=None)
    res = subprocess.run([sys.executable, str(releases[1] / "sample_app.py"), "serve"],
                         env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 2
    assert "HMAC_SECRET is not set" in res.stderr
    assert not (tmp_path / ".data").exists()
    # an empty value is refused too
    env["HMAC_SECRET"] = ""
    res = run_cmd(releases[1], "serve", env)
    assert res.returncode == 2 and "HMAC_SECRET" in res.stderr


@pytest.mark.parametrize("listen", ["8080", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_listen_refused(releases, tmp_path, listen):
    res = run_cmd(releases[1], "serve",
                  app_env(tmp_path / ".data", SAMPLE_APP_LISTEN=listen))
    assert res.returncode == 2
    assert "SAMPLE_APP_LISTEN=%s" % listen in res.stderr


def test_default_listen_is_loopback(releases):
    source = (releases[1] / "sample_app.py").read_text()
    assert 'environ.get("SAMPLE_APP_LISTEN") or "127.0.0.1:8080"' in source


# ---------------------------------------------------------------------------------------------
# migrations and the broken release


def test_v1_to_v2_migration_keeps_rows(releases, tmp_path, serve):
    data = tmp_path / ".data"
    app = serve(releases[1], app_env(data, free_port()))
    for n in range(3):
        assert app.json("POST", "/items", {"body": "row %d" % n})[0] == 201
    assert app.stop() == 0

    # v2 code on a v1 schema: up (healthz) but not ready, and refuses data requests
    app = serve(releases[2], app_env(data, free_port()))
    assert app.json("GET", "/healthz") == (200, {"status": "ok", "version": 2})
    status, doc = app.json("GET", "/readyz")
    assert status == 503
    assert doc["schema"] == 1 and doc["expected_schema"] == 2
    assert "migrate" in doc["reason"]
    assert app.json("GET", "/items")[0] == 503
    assert app.json("POST", "/items", {"body": "too early"})[0] == 503
    app.stop()

    res = run_cmd(releases[2], "migrate", app_env(data))
    assert res.returncode == 0, res.stderr
    assert "migrated schema 1 -> 2" in res.stdout
    res = run_cmd(releases[2], "migrate", app_env(data))
    assert res.returncode == 0 and "nothing to migrate" in res.stdout

    app = serve(releases[2], app_env(data, free_port()))
    assert app.json("GET", "/readyz")[0] == 200
    status, items = app.json("GET", "/items")
    assert [i["body"] for i in items] == ["row 0", "row 1", "row 2"]
    assert all(i["tags"] == "" for i in items)
    assert app.json("GET", "/stats")[1] == {"items": 3, "schema": 2, "version": 2}


def test_migrate_fresh_database_and_idempotence(releases, tmp_path):
    env = app_env(tmp_path / ".data", SAMPLE_APP_DB=str(tmp_path / "var" / "app.db"))
    res = run_cmd(releases[2], "migrate", env)
    assert res.returncode == 0 and "migrated schema 0 -> 2" in res.stdout
    conn = sqlite3.connect(str(tmp_path / "var" / "app.db"))
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(items)")]
        assert cols == ["id", "body", "created_at", "tags"]
    finally:
        conn.close()
    before = (tmp_path / "var" / "app.db").read_bytes()
    assert run_cmd(releases[2], "migrate", env).returncode == 0
    assert (tmp_path / "var" / "app.db").read_bytes() == before


def test_migrate_refuses_foreign_database_unchanged(releases, tmp_path):
    data = tmp_path / ".data"
    data.mkdir()
    db = data / "app.db"
    conn = sqlite3.connect(str(db))
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    res = run_cmd(releases[2], "migrate", app_env(data))
    assert res.returncode == 2
    assert "not a sample_app database" in res.stderr
    conn = sqlite3.connect(str(db))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["other"]
    finally:
        conn.close()


def test_v3_is_broken_not_ready(releases, tmp_path, serve):
    data = tmp_path / ".data"
    assert run_cmd(releases[2], "migrate", app_env(data)).returncode == 0
    res = run_cmd(releases[3], "migrate", app_env(data))
    assert res.returncode == 0, res.stderr  # the migration "succeeds" ...
    assert "expects schema 3" in res.stdout
    app = serve(releases[3], app_env(data, free_port()))
    assert app.json("GET", "/healthz") == (200, {"status": "ok", "version": 3})
    # ... but the release never becomes ready
    for _attempt in range(3):
        status, doc = app.json("GET", "/readyz")
        assert status == 503
        assert doc["schema"] == 3 and doc["expected_schema"] == 3 and "items.priority" in doc["reason"]
        time.sleep(0.1)
    assert app.proc.poll() is None
    app.stop()
    # rolling back to v2 works on the same database
    app = serve(releases[2], app_env(data, free_port()))
    assert app.json("GET", "/readyz")[0] == 200


def test_old_code_on_newer_schema_is_ready_with_note(releases, tmp_path, serve):
    data = tmp_path / ".data"
    assert run_cmd(releases[2], "migrate", app_env(data)).returncode == 0
    app = serve(releases[1], app_env(data, free_port()))
    status, doc = app.json("GET", "/readyz")
    assert status == 200
    assert "newer" in doc["note"]
    assert app.json("POST", "/items", {"body": "from v1"})[0] == 201


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture
def certs(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make a self-signed certificate")
    certdir = tmp_path / ".data" / "certs"
    certdir.mkdir(parents=True)
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(certdir / "server.key"), "-out", str(certdir / "server.crt")],
        check=True, capture_output=True)
    return certdir


def test_tls_auto_serves_https_with_certs(releases, tmp_path, serve, certs):
    ctx = ssl.create_default_context(cafile=str(certs / "server.crt"))
    app = serve(releases[2], app_env(tmp_path / ".data", free_port()),
                scheme="https", context=ctx)
    assert app.json("GET", "/healthz") == (200, {"status": "ok", "version": 2})
    assert app.json("GET", "/readyz")[0] == 200
    assert "https://" in app.log()
    # plain HTTP on the TLS port does not get an answer
    with pytest.raises((OSError, urllib.error.URLError)):
        urllib.request.urlopen(  # noqa: S310 - fixed http://127.0.0.1 URL
            "http://127.0.0.1:%d/healthz" % app.port, timeout=5).read()
    # and the app keeps serving after that
    assert app.json("GET", "/healthz")[0] == 200


def test_tls_off_serves_http_even_with_certs(releases, tmp_path, serve, certs):
    app = serve(releases[2], app_env(tmp_path / ".data", free_port(), SAMPLE_APP_TLS="off"))
    assert app.json("GET", "/healthz")[0] == 200


def test_tls_on_without_certs_refused(releases, tmp_path):
    res = run_cmd(releases[2], "serve",
                  app_env(tmp_path / ".data", free_port(), SAMPLE_APP_TLS="on"))
    assert res.returncode == 2
    assert "server.crt" in res.stderr


def test_tls_bad_mode_refused(releases, tmp_path):
    res = run_cmd(releases[2], "serve",
                  app_env(tmp_path / ".data", free_port(), SAMPLE_APP_TLS="maybe"))
    assert res.returncode == 2
    assert "SAMPLE_APP_TLS=maybe" in res.stderr
