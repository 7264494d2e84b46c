# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Pack the collection's engines (plugins/module_utils/_*.py) into one tar, on the controller.

Usage: pack_engines.py SOURCE_DIR. Prints the path of the new tar (in a fresh temp directory the
role removes afterwards). Members keep the package path the wrappers import from, are owned by
root with mode 0644 and sorted by name, so the same files always give the same archive.
"""

import glob
import os
import sys
import tarfile
import tempfile

PACKAGE = "ansible_collections/runbook/sqlite_app/plugins/module_utils"


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: pack_engines.py SOURCE_DIR\n")
        return 2
    sources = sorted(glob.glob(os.path.join(argv[1], "_*.py")))
    if not sources:
        sys.stderr.write("pack_engines.py: no engines in %s\n" % argv[1])
        return 1
    out = os.path.join(tempfile.mkdtemp(prefix="runbook-host-tools-"), "engines.tar")
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for source in sources:
            info = tar.gettarinfo(source, arcname="%s/%s" % (PACKAGE, os.path.basename(source)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o644
            info.mtime = int(info.mtime)
            with open(source, "rb") as handle:
                tar.addfile(info, handle)
    sys.stdout.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
