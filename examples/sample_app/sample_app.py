#!/usr/bin/env python3
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""sample_app: the tiny SQLite-backed HTTP app the runbook.sqlite_app collection deploys in its
demo, molecule scenarios and upgrade/DR playbooks. It is a test subject, not a product.

    python3 sample_app.py serve|migrate|version

Standard library only, Python >= 3.9. One source file serves every release: make-release.sh
rewrites the APP_VERSION line below, and the behaviour follows APP_VERSION:

    1   schema 1: items(id, body, created_at)
    2   schema 2: adds items.tags TEXT DEFAULT ''
    3   deliberately BROKEN: its migration to schema 3 rewrites every row (body upper-cased,
        tags set to 'v3') and sets user_version 3, but the code also needs a column
        items.priority that no migration creates. `migrate` succeeds, the process stays up and
        /healthz is 200, but /readyz is 503 for ever. So a failed upgrade to 3 has changed the
        data: only a restore of the pre-upgrade backup brings the rows (and schema 2) back. Used
        by the upgrade playbook's rollback tests.
    4+  healthy releases with no schema change (behave like 2), for fix-forward tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sqlite3
import ssl
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

APP_VERSION = 2

MAX_BODY_BYTES = 64 * 1024
MAX_ITEM_CHARS = 10000
BUSY_TIMEOUT_MS = 5000

# Every migration this source knows: (schema version it produces, SQL statements).
_MIGRATIONS = [
    (1, [
        "CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT NOT NULL, created_at TEXT)",
    ]),
    (2, [
        "ALTER TABLE items ADD COLUMN tags TEXT DEFAULT ''",
    ]),
    # Only release 3 ships it: a data migration that changes every existing row. Releases 2 and
    # 4+ still read a schema-3 database (newer schema: ready, with a note), with the changed rows.
    (3, [
        "UPDATE items SET body = upper(body), tags = 'v3'",
    ]),
]

# Columns of items the code of release 3 needs that no migration creates (what makes it broken).
_V3_MISSING_COLUMNS = ("priority",)


def expected_schema(version=None):
    """Schema version the code of release ``version`` needs to be ready."""
    version = APP_VERSION if version is None else version
    if version <= 1:
        return 1
    if version == 3:
        return 3  # the broken release: its schema 3 lacks a column the code needs
    return 2


def shipped_migrations(version=None):
    """Migrations release ``version`` ships (only v3 ships the data migration to schema 3)."""
    version = APP_VERSION if version is None else version
    top = 1 if version <= 1 else 3 if version == 3 else 2
    return [m for m in _MIGRATIONS if m[0] <= top]


def required_columns(version=None):
    """Columns of items release ``version`` cannot run without but no migration creates."""
    version = APP_VERSION if version is None else version
    return _V3_MISSING_COLUMNS if version == 3 else ()


class AppError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# configuration


class Config:
    def __init__(self, environ):
        self.data_dir = environ.get("SAMPLE_APP_DATA_DIR") or "./.data"
        db = environ.get("SAMPLE_APP_DB") or os.path.join(self.data_dir, "app.db")
        self.db = db
        self.listen = environ.get("SAMPLE_APP_LISTEN") or "127.0.0.1:8080"
        self.host, self.port = parse_listen(self.listen)
        secret = environ.get("HMAC_SECRET", "")
        previous = environ.get("HMAC_SECRET_PREVIOUS", "")
        self.secret = secret.encode() if secret else None
        self.previous_secret = previous.encode() if previous else None
        self.tls_mode = (environ.get("SAMPLE_APP_TLS") or "auto").lower()
        if self.tls_mode not in ("auto", "on", "off"):
            raise AppError("SAMPLE_APP_TLS=%s: must be one of auto, on, off" % self.tls_mode)
        self.cert = os.path.join(self.data_dir, "certs", "server.crt")
        self.key = os.path.join(self.data_dir, "certs", "server.key")

    def use_tls(self):
        have = os.path.isfile(self.cert) and os.path.isfile(self.key)
        if self.tls_mode == "off":
            return False
        if self.tls_mode == "on" and not have:
            raise AppError(
                "SAMPLE_APP_TLS=on: %s and %s must both exist" % (self.cert, self.key))
        return have


def parse_listen(value):
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise AppError("SAMPLE_APP_LISTEN=%s: expected HOST:PORT" % value)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port_num = int(port)
    except ValueError:
        raise AppError("SAMPLE_APP_LISTEN=%s: port %r is not a number" % (value, port)) from None
    if not 0 <= port_num <= 65535:
        raise AppError("SAMPLE_APP_LISTEN=%s: port out of range" % value)
    return host, port_num


def fingerprint(secret):
    """Short, non-reversible identifier of a secret (never the secret itself)."""
    if not secret:
        return None
    return hashlib.sha256(secret).hexdigest()[:12]


def sign(secret, payload):
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------------------------
# database


def connect(path, create=False):
    if not create and not os.path.exists(path):
        raise AppError("%s: database does not exist" % path)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
    return conn


def schema_version(conn):
    return conn.execute("PRAGMA user_version").fetchone()[0]


def is_blank(conn):
    return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


@contextlib.contextmanager
def write_transaction(conn):
    """BEGIN IMMEDIATE ... COMMIT; any error (even KeyboardInterrupt) rolls back and re-raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(path, bootstrap_only=False):
    """Apply pending shipped migrations in one transaction. Returns (before, after).

    With ``bootstrap_only`` only a brand-new (blank) database is initialised; an existing older
    schema is left alone (serve never migrates data behind the operator's back)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    conn = connect(path, create=True)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise AppError("%s: could not switch to WAL (journal_mode=%s)" % (path, mode))
        with write_transaction(conn):
            before = schema_version(conn)
            if before == 0 and not is_blank(conn):
                raise AppError(
                    "%s: user_version is 0 but the database has tables; not a sample_app "
                    "database" % path)
            if bootstrap_only and before != 0:
                return before, before
            after = before
            for target, statements in shipped_migrations():
                if target <= before:
                    continue
                for statement in statements:
                    conn.execute(statement)
                after = target
            if after != before:
                conn.execute("PRAGMA user_version = %d" % after)
        return before, after
    finally:
        conn.close()


def readiness(cfg):
    """(ready, details) for /readyz."""
    want = expected_schema()
    details = {"version": APP_VERSION, "expected_schema": want}
    try:
        conn = connect(cfg.db)
        try:
            have = schema_version(conn)
            details["schema"] = have
            conn.execute("SELECT count(*) FROM items").fetchone()
            columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
        finally:
            conn.close()
    except (AppError, sqlite3.Error) as err:
        details["reason"] = "database not usable: %s" % err
        return False, details
    if have < want:
        details["reason"] = (
            "schema %d is older than this release expects (%d); run `sample_app.py migrate`"
            % (have, want))
        return False, details
    missing = [name for name in required_columns() if name not in columns]
    if missing:
        details["reason"] = (
            "schema %d has no column items.%s, which this release expects (no migration creates it)"
            % (have, ", items.".join(missing)))
        return False, details
    if have > want:
        details["note"] = "schema %d is newer than this release expects (%d)" % (have, want)
    return True, details


# --------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "sample_app"
    protocol_version = "HTTP/1.1"

    @property
    def cfg(self):
        return self.server.cfg

    def log_message(self, fmt, *args):  # noqa: A002 - signature from the base class
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))
        sys.stderr.flush()

    def send_json(self, status, obj):
        payload = (json.dumps(obj, sort_keys=True) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-App-Version", str(APP_VERSION))
        self.send_header("X-Signature", "sha256=" + sign(self.cfg.secret, payload))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def read_body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            raise _HttpError(400, "bad Content-Length")
        if length > MAX_BODY_BYTES:
            raise _HttpError(413, "body larger than %d bytes" % MAX_BODY_BYTES)
        return self.rfile.read(length)

    def verify_signature(self, payload):
        """A request may carry X-Signature: sha256=<hex HMAC of the body>. If it does, it must
        verify with HMAC_SECRET or HMAC_SECRET_PREVIOUS (rotation window)."""
        given = self.headers.get("X-Signature")
        if given is None:
            return None
        given = given.strip()
        if given.startswith("sha256="):
            given = given[len("sha256="):]
        for name, secret in (("current", self.cfg.secret),
                             ("previous", self.cfg.previous_secret)):
            if secret and hmac.compare_digest(given, sign(secret, payload)):
                return name
        raise _HttpError(401, "X-Signature does not verify with the current or previous key")

    def dispatch(self, method):
        path = self.path.split("?", 1)[0]
        route = self.routes.get((method, path))
        if route is None:
            known = {p for (_m, p) in self.routes}
            raise _HttpError(405 if path in known else 404, "no route %s %s" % (method, path))
        route(self)

    def handle_method(self, method):
        try:
            self.dispatch(method)
        except _HttpError as err:
            self.send_json(err.status, {"error": err.message})
        except sqlite3.Error as err:
            self.send_json(503, {"error": "database: %s" % err})

    def do_GET(self):  # noqa: N802 - http.server naming
        self.handle_method("GET")

    def do_HEAD(self):  # noqa: N802
        self.handle_method("GET")

    def do_POST(self):  # noqa: N802
        self.handle_method("POST")

    # routes

    def healthz(self):
        self.send_json(200, {"status": "ok", "version": APP_VERSION})

    def readyz(self):
        ready, details = readiness(self.cfg)
        details["status"] = "ready" if ready else "not ready"
        self.send_json(200 if ready else 503, details)

    def keyinfo(self):
        self.send_json(200, {
            "current": fingerprint(self.cfg.secret),
            "previous": fingerprint(self.cfg.previous_secret),
        })

    def _require_ready(self):
        ready, details = readiness(self.cfg)
        if not ready:
            raise _HttpError(503, details["reason"])

    def list_items(self):
        self._require_ready()
        if expected_schema() >= 2:
            query = "SELECT id, body, created_at, tags FROM items ORDER BY id"
        else:
            query = "SELECT id, body, created_at FROM items ORDER BY id"
        conn = connect(self.cfg.db)
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(query).fetchall()
        finally:
            conn.close()
        self.send_json(200, [dict(r) for r in rows])

    def create_item(self):
        self._require_ready()
        raw = self.read_body()
        self.verify_signature(raw)
        try:
            doc = json.loads(raw.decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError):
            raise _HttpError(400, "body is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("body"), str) or not doc["body"]:
            raise _HttpError(400, 'expected a JSON object {"body": "<non-empty string>"}')
        if len(doc["body"]) > MAX_ITEM_CHARS:
            raise _HttpError(400, "body longer than %d characters" % MAX_ITEM_CHARS)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        item = {"body": doc["body"], "created_at": now}
        if expected_schema() >= 2:
            tags = doc.get("tags", "")
            if not isinstance(tags, str):
                raise _HttpError(400, "tags must be a string")
            item["tags"] = tags
        conn = connect(self.cfg.db)
        try:
            with write_transaction(conn):
                if "tags" in item:
                    cur = conn.execute(
                        "INSERT INTO items (body, created_at, tags) VALUES (?, ?, ?)",
                        (item["body"], item["created_at"], item["tags"]))
                else:
                    cur = conn.execute("INSERT INTO items (body, created_at) VALUES (?, ?)",
                                       (item["body"], item["created_at"]))
                item["id"] = cur.lastrowid
        finally:
            conn.close()
        self.send_json(201, item)

    def stats(self):
        self._require_ready()
        conn = connect(self.cfg.db)
        try:
            count = conn.execute("SELECT count(*) FROM items").fetchone()[0]
            schema = schema_version(conn)
        finally:
            conn.close()
        self.send_json(200, {"items": count, "schema": schema, "version": APP_VERSION})

    routes = {
        ("GET", "/healthz"): healthz,
        ("GET", "/readyz"): readyz,
        ("GET", "/keyinfo"): keyinfo,
        ("GET", "/items"): list_items,
        ("POST", "/items"): create_item,
        ("GET", "/stats"): stats,
    }


class _HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class AppServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, cfg, ssl_context=None):
        self.cfg = cfg
        self.ssl_context = ssl_context
        if ":" in cfg.host:
            self.address_family = socket.AF_INET6
        super().__init__((cfg.host, cfg.port), Handler)

    def finish_request(self, request, client_address):
        # Runs in the per-request thread: the TLS handshake never blocks the accept loop.
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as err:
                sys.stderr.write("%s TLS handshake failed: %s\n" % (client_address[0], err))
                return
        super().finish_request(request, client_address)


# --------------------------------------------------------------------------------------------
# commands


def cmd_version(_cfg_env):
    print(APP_VERSION)
    return 0


def cmd_migrate(environ):
    cfg = Config(environ)
    before, after = migrate(cfg.db)
    want = expected_schema()
    if after == before:
        print("%s: schema %d, nothing to migrate" % (cfg.db, after))
    else:
        print("%s: migrated schema %d -> %d" % (cfg.db, before, after))
    if required_columns():
        # Only the deliberately broken v3 gets here: it succeeds but leaves the app not ready.
        print("%s: note: this release expects schema %d with column items.%s, which no migration "
              "creates" % (cfg.db, want, ", items.".join(required_columns())))
    return 0


def cmd_serve(environ):
    cfg = Config(environ)
    if not cfg.secret:
        raise AppError("HMAC_SECRET is not set: refusing to start (set it in the app's .env)")
    tls = cfg.use_tls()
    # A brand-new database is initialised; an existing older schema is left for `migrate`.
    before, after = migrate(cfg.db, bootstrap_only=True)
    if before != after:
        log("initialised new database %s at schema %d" % (cfg.db, after))
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cfg.cert, cfg.key)
        except (ssl.SSLError, OSError) as err:
            raise AppError(
                "%s / %s: cannot load TLS key pair: %s" % (cfg.cert, cfg.key, err)) from None
    try:
        server = AppServer(cfg, ctx)
    except OSError as err:
        raise AppError("SAMPLE_APP_LISTEN=%s: cannot listen: %s" % (cfg.listen, err)) from None
    host, port = server.server_address[:2]
    ready, details = readiness(cfg)
    log("sample_app %d listening on %s://%s:%d (db %s, schema %s, %s)" % (
        APP_VERSION, "https" if tls else "http", host, port, cfg.db, details.get("schema"),
        "ready" if ready else "NOT READY: " + details["reason"]))

    def _stop(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    log("sample_app stopped")
    return 0


def log(message):
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


COMMANDS = {"serve": cmd_serve, "migrate": cmd_migrate, "version": cmd_version}


def main(argv=None, environ=None):
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    if len(argv) != 1 or argv[0] not in COMMANDS:
        sys.stderr.write("usage: sample_app.py serve|migrate|version\n")
        return 64
    os.umask(0o077)
    try:
        return COMMANDS[argv[0]](environ)
    except AppError as err:
        log("sample_app: error: %s" % err)
        return 2
    except sqlite3.Error as err:
        log("sample_app: database error: %s" % err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
