#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cert_install
short_description: Install a TLS certificate and key pair, checked before it goes live
version_added: 0.1.0
description:
  - Installs a certificate (leaf plus chain) and its private key into O(dest_dir) as
    C(<base_name>.crt) and C(<base_name>.key), from inline PEM (O(source=content)), from files on the
    target such as C(/etc/letsencrypt/live/NAME/) (O(source=files)), or as a self-signed pair that is
    generated and renewed on the target (O(source=self_signed)).
  - Before anything is written every PEM block is parsed, the private key is checked to match the leaf
    certificate, the chain is put in order (leaf first, whatever the input order) and every
    certificate's signature is verified with the next one's public key, the leaf is checked to be
    valid now with at least O(min_days_remaining) days left, and optionally that it covers every name
    in O(expected_names). Any failure leaves the installed files untouched.
  - The files are written to temp files in O(dest_dir), fsynced and given their owner, group and mode,
    then published with back-to-back renames (key first, then the O(chain_file), the certificate last).
    A symlink in place of one of the files is replaced by a regular file; the link's target is left alone.
  - Idempotent by content - when the installed files already hold the same certificates and key,
    nothing is written and their modification times do not move; a wrong mode, owner or group is
    fixed in place (RV(ignore:changed=true)) without rewriting the content.
  - The installed key is always written B(unencrypted), in PKCS#8 PEM, even when the source key is
    encrypted (O(key_passphrase)) or in a traditional format. Protect it with O(key_mode), O(owner)
    and O(group).
  - The result never contains key material; the diff shows fingerprints and dates only.
author:
  - runbook.sqlite_app maintainers (@runbook)
requirements:
  - cryptography >= 3.4 on the target (C(python3-cryptography) on Debian/Ubuntu)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - Runs the same checks and decision as a real run and writes nothing; an unknown O(owner) or
        O(group) fails as it would in a real run. For O(source=self_signed)
        a new pair is generated in memory, so the reported fingerprint and dates of a pair that
        would be (re)generated are a preview and differ from the real run's.
  diff_mode:
    support: full
    details:
      - Before and after SHA-256 fingerprints and validity dates of the leaf certificate, never key material.
  platform:
    platforms: posix
options:
  source:
    description:
      - Where the certificate and key come from.
      - V(content) uses O(cert_content), O(key_content) and O(chain_content).
      - V(files) reads O(cert_path), O(key_path) and O(chain_path) on the target.
      - V(self_signed) generates a pair for O(common_name) when none is installed, when the installed
        key does not match the certificate, when it expires within O(renew_before_days) days, or when
        O(common_name), O(subject_alt_names), O(key_type) or O(rsa_bits) no longer match it; otherwise the
        installed files are left alone.
    type: str
    required: true
    choices: [content, files, self_signed]
  cert_content:
    description:
      - PEM certificate(s) for O(source=content) - the leaf, optionally followed by its chain in any order.
    type: str
  key_content:
    description:
      - PEM private key for O(source=content).
    type: str
  chain_content:
    description:
      - More PEM certificates of the chain for O(source=content).
    type: str
  cert_path:
    description:
      - Path on the target of the certificate for O(source=files), for example
        C(/etc/letsencrypt/live/NAME/fullchain.pem) or C(cert.pem).
    type: path
  key_path:
    description:
      - Path on the target of the private key for O(source=files), for example C(privkey.pem).
    type: path
  chain_path:
    description:
      - Path on the target of more chain certificates for O(source=files), for example C(chain.pem).
    type: path
  common_name:
    description:
      - Subject common name of the self-signed certificate; required for O(source=self_signed).
    type: str
  subject_alt_names:
    description:
      - Subject alternative names of the self-signed certificate, such as V(DNS:example.com) or
        V(IP:127.0.0.1). A name without a prefix is a DNS name.
      - When empty, the certificate gets O(common_name) as its only subject alternative name.
    type: list
    elements: str
  days:
    description:
      - Validity of a generated self-signed certificate in days. Must be larger than O(renew_before_days).
    type: int
    default: 365
  key_type:
    description:
      - Key of a generated self-signed certificate - V(ec) is ECDSA on P-256, V(rsa) is RSA of O(rsa_bits) bits.
    type: str
    choices: [ec, rsa]
    default: ec
  rsa_bits:
    description:
      - RSA key size for O(key_type=rsa).
    type: int
    default: 2048
  renew_before_days:
    description:
      - With O(source=self_signed), generate a new pair when the installed certificate expires within
        this many days (or has expired).
    type: int
    default: 30
  dest_dir:
    description:
      - Directory the pair is installed into, for example C(/srv/app/.data/certs). It must exist.
    type: path
    required: true
  base_name:
    description:
      - File name stem - the certificate goes to C(<base_name>.crt), the key to C(<base_name>.key).
    type: str
    default: server
  chain_file:
    description:
      - File name in O(dest_dir) for the chain (the certificates after the leaf), for example V(chain.crt).
      - When set, C(<base_name>.crt) holds the leaf only and this file the chain (empty when there is none).
      - When unset, C(<base_name>.crt) holds the leaf followed by its chain.
    type: str
  min_days_remaining:
    description:
      - Fail when the leaf certificate has fewer days left than this. Not used with O(source=self_signed),
        which renews instead (see O(renew_before_days)).
    type: int
    default: 7
  expected_names:
    description:
      - Fail unless each of these names is covered by the leaf's subject alternative names.
        A wildcard V(*.example.com) covers V(www.example.com) but not V(example.com).
        IP addresses match V(IP:) entries.
    type: list
    elements: str
  key_passphrase:
    description:
      - Passphrase of an encrypted source key. The installed key is written unencrypted.
    type: str
  cert_mode:
    description:
      - Mode of the certificate and chain files. Quote it (V('0644')) so YAML keeps it octal.
    type: raw
    default: '0644'
  key_mode:
    description:
      - Mode of the key file. Quote it (V('0600')).
    type: raw
    default: '0600'
  owner:
    description:
      - Owner of the installed files (name or uid); unset leaves the owner of the writing user.
    type: str
  group:
    description:
      - Group of the installed files (name or gid).
    type: str
  backup:
    description:
      - Before replacing the pair, keep copies of the installed files with a C(.YYYYMMDDTHHMMSSZ) suffix
        (UTC) in O(dest_dir); their paths are returned in RV(backup_files).
    type: bool
    default: false
notes:
  - The same engine is installed on hosts by the C(tls) role and run as a certbot deploy hook with
    plain C(python3) and a JSON file holding these options.
seealso:
  - name: Let's Encrypt certbot deploy hooks
    description: How certbot runs a command after each renewal.
    link: https://eff-certbot.readthedocs.io/en/stable/using.html#renewing-certificates
"""

EXAMPLES = r"""
- name: Install the Let's Encrypt pair for the app
  runbook.sqlite_app.cert_install:
    source: files
    cert_path: /etc/letsencrypt/live/app.example.com/fullchain.pem
    key_path: /etc/letsencrypt/live/app.example.com/privkey.pem
    dest_dir: /srv/app/.data/certs
    expected_names: [app.example.com]
    owner: app
    group: app
    backup: true
  register: tls_cert

- name: Development - a self-signed pair, renewed 30 days before it expires
  runbook.sqlite_app.cert_install:
    source: self_signed
    common_name: localhost
    subject_alt_names: [localhost, "IP:127.0.0.1"]
    dest_dir: /srv/app/.data/certs

- name: Install a pair from the vault, chain in a file of its own
  runbook.sqlite_app.cert_install:
    source: content
    cert_content: "{{ vault_tls_cert }}"
    key_content: "{{ vault_tls_key }}"
    key_passphrase: "{{ vault_tls_key_passphrase }}"
    dest_dir: /srv/app/.data/certs
    chain_file: chain.crt
"""

RETURN = r"""
subject:
  description: Subject of the leaf certificate (RFC 4514).
  returned: success
  type: str
  sample: CN=app.example.com
subject_alt_names:
  description: Subject alternative names of the leaf, prefixed C(DNS:), C(IP:), C(email:) or C(URI:).
  returned: success
  type: list
  elements: str
  sample: ["DNS:app.example.com", "IP:127.0.0.1"]
issuer:
  description: Issuer of the leaf certificate (RFC 4514).
  returned: success
  type: str
  sample: CN=R11,O=Let's Encrypt,C=US
not_before:
  description: Start of the leaf's validity, ISO 8601 UTC.
  returned: success
  type: str
  sample: "2025-01-01T00:00:00Z"
not_after:
  description: End of the leaf's validity, ISO 8601 UTC.
  returned: success
  type: str
  sample: "2025-04-01T00:00:00Z"
days_remaining:
  description: Whole days until RV(not_after).
  returned: success
  type: int
  sample: 89
sha256_fingerprint:
  description:
    - SHA-256 fingerprint of the leaf certificate (DER), upper-case hex pairs joined by colons, as
      C(openssl x509 -noout -fingerprint -sha256) prints it.
  returned: success
  type: str
  sample: "AB:CD:...:EF"
key_type:
  description: Key algorithm of the installed key.
  returned: success
  type: str
  sample: ec
chain_length:
  description: Number of certificates installed, the leaf included (1 for a self-signed pair).
  returned: success
  type: int
  sample: 2
cert_file:
  description: Path of the installed certificate.
  returned: success
  type: str
  sample: /srv/app/.data/certs/server.crt
key_file:
  description: Path of the installed private key.
  returned: success
  type: str
  sample: /srv/app/.data/certs/server.key
chain_file:
  description: Path of the installed chain file, or V(null) when O(chain_file) is unset.
  returned: success
  type: str
  sample: /srv/app/.data/certs/chain.crt
backup_files:
  description: Backup copies made of the replaced files (in check mode, those that would be made).
  returned: success
  type: list
  elements: str
  sample: ["/srv/app/.data/certs/server.crt.20250101T120000Z", "/srv/app/.data/certs/server.key.20250101T120000Z"]
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.runbook.sqlite_app.plugins.module_utils._module import run_engine  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._x509 import install  # noqa: E402


def main():
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="str", required=True, choices=["content", "files", "self_signed"]),
            cert_content=dict(type="str"),
            key_content=dict(type="str", no_log=True),
            chain_content=dict(type="str"),
            cert_path=dict(type="path"),
            key_path=dict(type="path", no_log=False),
            chain_path=dict(type="path"),
            common_name=dict(type="str"),
            subject_alt_names=dict(type="list", elements="str"),
            days=dict(type="int", default=365),
            key_type=dict(type="str", default="ec", choices=["ec", "rsa"]),
            rsa_bits=dict(type="int", default=2048),
            renew_before_days=dict(type="int", default=30),
            dest_dir=dict(type="path", required=True),
            base_name=dict(type="str", default="server"),
            chain_file=dict(type="str"),
            min_days_remaining=dict(type="int", default=7),
            expected_names=dict(type="list", elements="str"),
            key_passphrase=dict(type="str", no_log=True),
            cert_mode=dict(type="raw", default="0644"),
            key_mode=dict(type="raw", default="0600", no_log=False),
            owner=dict(type="str"),
            group=dict(type="str"),
            backup=dict(type="bool", default=False),
        ),
        required_if=[
            ("source", "content", ("cert_content", "key_content")),
            ("source", "files", ("cert_path", "key_path")),
            ("source", "self_signed", ("common_name",)),
        ],
        mutually_exclusive=[
            ("cert_content", "cert_path"),
            ("key_content", "key_path"),
            ("chain_content", "chain_path"),
        ],
        supports_check_mode=True,
    )
    run_engine(module, lambda: install(module.params, check_mode=module.check_mode))


if __name__ == "__main__":
    main()
