#!/usr/bin/python
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: secret_rotate
short_description: Rotate secrets in a .env file without ever returning, logging or diffing them
version_added: 0.1.0
description:
  - Creates or rotates secrets (HMAC keys, session secrets, API keys) in a dotenv file, the way
    C(openssl rand -hex 32) / C(openssl rand -base64 32) runbooks do by hand.
  - A secret is written when it is missing, when O(force) or O(secrets[].force) is set, when it is
    older than O(secrets[].max_age_days), or, for a supplied O(secrets[].value), when the file holds a
    different value. Otherwise nothing is written and the task is not changed.
  - Everything else in the file is kept byte for byte (comments, blank lines, ordering, C(export)
    prefixes, quoting, CRLF line endings, a missing final newline, keys with C(.) or C(-) such as
    C(spring.datasource.url) that docker compose reads). A file that cannot be read back exactly (a
    malformed line, a duplicate key) is refused with its line number and left untouched.
  - "The rotation time of each key is recorded in a comment line managed by this module directly
    above the key, for example
    C(# runbook.sqlite_app: HMAC_SECRET rotated_at=2026-11-23T03:00:00Z fingerprint=3f2a9c01be77)."
  - Values are never returned, logged or shown in a diff. Fingerprints (12 hex digits of a
    domain-separated SHA-256) are shown only for values this module generated.
  - The file is written atomically (temp file, fsync, rename) with mode O(mode); its owner and group
    are kept unless O(owner)/O(group) are given.
author:
  - runbook.sqlite_app maintainers (@runbook)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - Check mode reports which names would be created, rotated or removed and writes nothing.
      - It generates no value, so names that would be created or rotated have a V(null) fingerprint.
      - What the real run could not do (the directory is not writable, or keeping or setting the owner
        or group needs root) fails in check mode too, with the same message.
  diff_mode:
    support: full
    details:
      - The diff lists names with fingerprints and rotation times, never values.
      - "In check mode a name that would get a new value shows as C(NAME: would be generated) or
        C(NAME: would be rotated), without a fingerprint."
  platform:
    platforms: posix
options:
  path:
    description: The dotenv file.
    type: path
    required: true
  secrets:
    description:
      - The secrets to manage in O(path).
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description:
          - Variable name, V([A-Za-z_][A-Za-z0-9_]*).
          - C(<name>_PREVIOUS) is reserved for the previous value (see O(secrets[].keep_previous)).
        type: str
        required: true
      format:
        description:
          - How a generated value looks.
          - V(hex) is like C(openssl rand -hex N) (2 x O(secrets[].bytes) characters).
          - V(base64) is like C(openssl rand -base64 N), on one line.
          - V(urlsafe) is URL-safe base64 of N random bytes without padding.
          - V(alphanumeric) is O(secrets[].length) letters and digits.
        type: str
        choices: [hex, base64, urlsafe, alphanumeric]
        default: hex
      bytes:
        description: Random bytes for V(hex), V(base64) and V(urlsafe) (16 to 4096).
        type: int
        default: 32
      length:
        description: Length of an V(alphanumeric) value (22 to 4096).
        type: int
        default: 32
      value:
        description:
          - A value supplied from elsewhere (a vault) instead of a generated one.
          - Written only when the file holds a different value. It may not contain a line break.
          - Its fingerprint is never recorded or shown, since a weak value could be guessed from it.
        type: str
      max_age_days:
        description:
          - Rotate a generated value once it is this many days old (by its recorded C(rotated_at)).
          - A value without a record of ours, or edited by hand since, has an unknown age and is rotated.
          - Cannot be combined with O(secrets[].value).
        type: int
      force:
        description: Rotate this secret now. Has no effect on a supplied O(secrets[].value).
        type: bool
        default: false
      keep_previous:
        description:
          - When rotating, keep the old value as C(<name>_PREVIOUS) so the app can accept both
            during a grace period.
        type: bool
        default: false
      previous_ttl_days:
        description:
          - Remove a C(<name>_PREVIOUS) written by this module once it is this many days old.
        type: int
        default: 7
  force:
    description: Rotate every generated secret in O(secrets) now.
    type: bool
    default: false
  create:
    description: Create O(path) when it does not exist. When V(false), a missing file is an error.
    type: bool
    default: true
  mode:
    description: Octal mode of the file, for example V('0600').
    type: raw
    default: '0600'
  owner:
    description: Owner of the file. Default is to keep the current owner (or the caller for a new file).
    type: str
  group:
    description: Group of the file. Default is to keep the current group (or the caller's for a new file).
    type: str
  backup:
    description:
      - Before changing the file, keep a copy (mode 0600) named C(<path>.<YYYYMMDDTHHMMSSZ>.bak).
      - The copy holds the old secrets; remove it when no longer needed.
    type: bool
    default: false
notes:
  - The metadata comment travels with the file through backups and restores and holds no secret.
  - Double-quoted values are used only for supplied values containing a single quote; some dotenv
    readers interpolate C($) inside them.
seealso:
  - name: Secret rotation design
    description: How rotation ages, fingerprints and previous values work (docs/secrets.md in the collection).
    link: https://github.com/runbook/sqlite_app/blob/main/docs/secrets.md
"""

EXAMPLES = r"""
- name: Rotate the HMAC secret every 90 days, keeping the old one for a week
  runbook.sqlite_app.secret_rotate:
    path: /srv/app/.env
    owner: app
    group: app
    secrets:
      - name: HMAC_SECRET
        max_age_days: 90
        keep_previous: true
        previous_ttl_days: 7
      - name: AUTH_SECRET
        format: base64
        max_age_days: 90
      - name: HARVEST_API_KEY
        value: "{{ vault_harvest_api_key }}"
  notify: Restart app

- name: Rotate everything now (incident response), keeping a backup of the old file
  runbook.sqlite_app.secret_rotate:
    path: /srv/app/.env
    force: true
    backup: true
    secrets:
      - name: HMAC_SECRET
      - name: AUTH_SECRET
        format: base64
"""

RETURN = r"""
rotated:
  description: Names whose existing value was replaced (or would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: [HMAC_SECRET]
created:
  description: Names that were missing and were added (or would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: [AUTH_SECRET]
kept:
  description: Names left as they were.
  returned: always
  type: list
  elements: str
  sample: [HARVEST_API_KEY]
previous:
  description: C(<name>_PREVIOUS) names written with the old value.
  returned: always
  type: list
  elements: str
  sample: [HMAC_SECRET_PREVIOUS]
removed:
  description: Expired C(<name>_PREVIOUS) names that were removed.
  returned: always
  type: list
  elements: str
  sample: []
fingerprints:
  description:
    - Name to fingerprint of the value now in the file; V(null) when not shown (a supplied value,
      or a value this module did not generate).
    - In check mode, V(null) for names in RV(created) and RV(rotated), since check mode generates no
      value and there is nothing to fingerprint.
  returned: always
  type: dict
  sample: {HMAC_SECRET: 9f8e7d6c5b4a, HARVEST_API_KEY: null}
rotated_at:
  description:
    - Name to the recorded rotation time (ISO 8601, UTC); V(null) when unknown.
    - In check mode, names that would be created or rotated show the time of this run.
  returned: always
  type: dict
  sample: {HMAC_SECRET: "2026-11-23T03:00:00Z"}
backup_file:
  description: The backup copy made because O(backup) was set, or V(null).
  returned: always
  type: str
  sample: /srv/app/.env.20261123T030000Z.bak
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.runbook.sqlite_app.plugins.module_utils._module import run_engine  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._secrets import FORMATS, rotate  # noqa: E402


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            secrets=dict(
                type="list", elements="dict", required=True, no_log=False,
                options=dict(
                    name=dict(type="str", required=True),
                    format=dict(type="str", default="hex", choices=list(FORMATS)),
                    bytes=dict(type="int", default=32),
                    length=dict(type="int", default=32),
                    value=dict(type="str", no_log=True),
                    max_age_days=dict(type="int"),
                    force=dict(type="bool", default=False),
                    keep_previous=dict(type="bool", default=False, no_log=False),
                    previous_ttl_days=dict(type="int", default=7),
                ),
            ),
            force=dict(type="bool", default=False),
            create=dict(type="bool", default=True),
            mode=dict(type="raw", default="0600"),
            owner=dict(type="str"),
            group=dict(type="str"),
            backup=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    params = module.params
    run_engine(module, lambda: rotate(
        params["path"], params["secrets"], force=params["force"], create=params["create"],
        mode=params["mode"], owner=params["owner"], group=params["group"], backup=params["backup"],
        check_mode=module.check_mode, sensitive=module.no_log_values,
    ))


if __name__ == "__main__":
    main()
