"""Verify the data_dir role on a real systemd container (testinfra)."""


def test_user_and_group(host):
    user = host.user("gateway")
    assert user.exists
    assert user.group == "gateway"
    assert user.shell == "/usr/sbin/nologin"


def test_layout_modes_and_owners(host):
    data = host.file("/srv/gateway/.data")
    assert data.is_directory
    assert data.user == "gateway"
    assert data.mode == 0o750
    for sub in ("certs", "artifacts", "runs", "backups"):
        d = host.file("/srv/gateway/.data/" + sub)
        assert d.is_directory, sub
        assert (d.user, d.group, d.mode) == ("gateway", "gateway", 0o750), sub
    root = host.file("/srv/gateway")
    assert root.group == "gateway"
    assert root.mode == 0o750


def test_env_file_is_private(host):
    env = host.file("/srv/gateway/.data/.env")
    assert env.is_file
    assert (env.user, env.group, env.mode) == ("gateway", "gateway", 0o600)


def test_database_adopted_in_wal_mode_with_its_rows(host):
    db = host.file("/srv/gateway/.data/db.sqlite")
    assert db.user == "gateway"
    mode = host.check_output("sqlite3 /srv/gateway/.data/db.sqlite 'PRAGMA journal_mode;'")
    assert mode.strip() == "wal"
    assert host.check_output("sqlite3 /srv/gateway/.data/db.sqlite 'SELECT count(*) FROM t;'").strip() == "1"


def test_missing_database_was_skipped_not_created(host):
    assert not host.file("/srv/gateway/.data/missing.sqlite").exists
