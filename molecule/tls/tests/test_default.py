"""Verify the tls role on a real systemd container (testinfra)."""

import time

GW = "/srv/gateway/.data/certs"
DEMO = "/srv/demo/.data/certs"
LIVE = "/etc/letsencrypt/live/demo"
VAULT = "/srv/vault/certs"
HOOK = "/etc/letsencrypt/renewal-hooks/deploy/demo.sh"


def fingerprint(host, path):
    out = host.check_output("openssl x509 -noout -fingerprint -sha256 -in %s", path)
    return out.split("=", 1)[1].strip()


def served_fingerprint(host, port, extra=""):
    cmd = ("echo | openssl s_client -connect 127.0.0.1:%d %s 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
           % (port, extra))
    for _attempt in range(30):
        res = host.run(cmd)
        if res.rc == 0 and "=" in res.stdout:
            return res.stdout.split("=", 1)[1].strip()
        time.sleep(0.5)
    raise AssertionError("nothing serves TLS on 127.0.0.1:%d: %s" % (port, res.stderr))


def starts(host, unit):
    return len(host.file("/run/%s-starts" % unit).content_string.splitlines())


def assert_pair(host, certs, user):
    crt = host.file(certs + "/server.crt")
    key = host.file(certs + "/server.key")
    assert (crt.user, crt.group, crt.mode) == (user, user, 0o644)
    assert (key.user, key.group, key.mode) == (user, user, 0o600)
    cert_pub = host.check_output("openssl x509 -noout -pubkey -in %s", crt.path)
    key_pub = host.check_output("openssl pkey -pubout -in %s", key.path)
    assert cert_pub == key_pub
    assert "PRIVATE KEY" in host.check_output("head -n 1 %s", key.path)
    assert "ENCRYPTED" not in host.check_output("head -n 1 %s", key.path)


def test_self_signed_pair_modes_owner_and_match(host):
    assert_pair(host, GW, "gateway")
    text = host.check_output("openssl x509 -noout -text -in %s/server.crt", GW)
    assert "DNS:localhost" in text
    assert "IP Address:127.0.0.1" in text


def test_self_signed_pair_is_served_after_the_restart(host):
    # The unit idled until the pair existed: serving it proves the handler restarted it.
    assert served_fingerprint(host, 8443, "-CAfile %s/server.crt -verify_return_error -verify_ip 127.0.0.1" % GW) \
        == fingerprint(host, GW + "/server.crt")
    # Started in prepare, restarted once by converge; the idempotence and check runs did not restart it.
    assert starts(host, "gateway") == 2


def test_letsencrypt_pair_installed_with_chain(host):
    assert_pair(host, DEMO, "demo")
    assert fingerprint(host, DEMO + "/server.crt") == fingerprint(host, LIVE + "/cert.pem")
    assert host.file(DEMO + "/server.crt").content_string.count("BEGIN CERTIFICATE") == 2
    crt = DEMO + "/server.crt"
    verify = host.run("openssl verify -CAfile /root/fake-ca/root.crt -untrusted %s %s", crt, crt)
    assert verify.rc == 0, verify.stderr
    assert served_fingerprint(host, 8444, "-CAfile /root/fake-ca/root.crt -verify_return_error "
                              "-verify_hostname demo.example.test -servername demo.example.test") \
        == fingerprint(host, LIVE + "/cert.pem")


def test_content_pair_installed_checked_and_private(host):
    # Installed from PEM content (the lineage as converge read it, before the hook tests renew it), by
    # the tls role alone: it made the certificate directory itself.
    certs = host.file(VAULT)
    assert (certs.is_directory, certs.user, certs.mode) == (True, "root", 0o750)
    assert_pair(host, VAULT, "root")
    crt = VAULT + "/server.crt"
    assert host.file(crt).content_string.count("BEGIN CERTIFICATE") == 2
    verify = host.run("openssl verify -CAfile /root/fake-ca/root.crt -untrusted %s %s", crt, crt)
    assert verify.rc == 0, verify.stderr
    assert "DNS:demo.example.test" in host.check_output("openssl x509 -noout -ext subjectAltName -in %s", crt)


def test_hook_files(host):
    hook = host.file(HOOK)
    assert hook.is_file
    assert (hook.user, hook.mode) == ("root", 0o755)
    conf = host.file("/etc/runbook-sqlite-app/tls/demo.json")
    assert (conf.user, conf.mode) == ("root", 0o600)
    assert host.file("/usr/local/sbin/runbook-cert-install").mode == 0o755


def test_hook_ignores_other_lineages(host):
    before = fingerprint(host, DEMO + "/server.crt")
    host.check_output("/usr/local/bin/fake-le-issue")
    out = host.run("RENEWED_LINEAGE=/etc/letsencrypt/live/other %s", HOOK)
    assert out.rc == 0, out.stderr
    assert out.stdout == ""
    assert fingerprint(host, DEMO + "/server.crt") == before


def test_hook_installs_a_renewal_and_restarts_the_app(host):
    # test_hook_ignores_other_lineages issued a new leaf already; issue another to be independent.
    host.check_output("/usr/local/bin/fake-le-issue")
    before = fingerprint(host, DEMO + "/server.crt")
    renewed = fingerprint(host, LIVE + "/cert.pem")
    assert renewed != before
    starts_before = starts(host, "demo")

    out = host.run("RENEWED_LINEAGE=%s %s", LIVE, HOOK)
    assert out.rc == 0, out.stderr
    assert '"changed": true' in out.stdout

    assert fingerprint(host, DEMO + "/server.crt") == renewed
    assert_pair(host, DEMO, "demo")
    assert starts(host, "demo") == starts_before + 1
    assert served_fingerprint(host, 8444, "-CAfile /root/fake-ca/root.crt -verify_return_error") == renewed
    # The expiry metric follows the renewal (the hook rewrites it, not only the next role run).
    end = host.check_output("date -d \"$(openssl x509 -enddate -noout -in %s/cert.pem | cut -d= -f2)\" +%%s", LIVE)
    metric = host.check_output("cat /var/lib/node_exporter/textfile_collector/*.prom")
    assert 'runbook_sqlite_tls_not_after_timestamp_seconds{cert="%s/server.crt"} %s.0' % (DEMO, end) in metric
    # tls_backup: the replaced pair was kept, the key copy no more readable than 0600.
    backups = host.check_output("ls %s", DEMO).split()
    assert any(name.startswith("server.key.") for name in backups)
    for name in backups:
        if name.startswith("server.key."):
            assert host.file(DEMO + "/" + name).mode & 0o077 == 0

    # A second run changes nothing and does not restart.
    again = host.run("RENEWED_LINEAGE=%s %s", LIVE, HOOK)
    assert again.rc == 0, again.stderr
    assert '"changed": false' in again.stdout
    assert starts(host, "demo") == starts_before + 1


def test_hook_refuses_a_broken_renewal(host):
    installed = fingerprint(host, DEMO + "/server.crt")
    # A key that does not belong to the live certificate: the hook must fail and keep the pair.
    host.check_output("cp %s/privkey.pem /root/privkey.keep", LIVE)
    try:
        host.check_output("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s/privkey.pem", LIVE)
        res = host.run("RENEWED_LINEAGE=%s %s", LIVE, HOOK)
        assert res.rc != 0
        assert "mismatch" in res.stderr
        assert fingerprint(host, DEMO + "/server.crt") == installed
        assert_pair(host, DEMO, "demo")
    finally:
        host.check_output("cp /root/privkey.keep %s/privkey.pem", LIVE)
