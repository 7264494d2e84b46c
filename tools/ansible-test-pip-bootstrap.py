"""Stand-in for the get-pip script ansible-test downloads into ~/.ansible/test/cache.

ansible-test creates its sanity virtualenvs without pip and fetches a get-pip script from a host
this lab cannot reach. This script does the same job with what Python ships: ensurepip installs
the bundled pip, then pip installs the exact packages ansible-test asked for (from PyPI, with the
machine's pip configuration). ansible-test runs it with get-pip's arguments; the two get-pip-only
flags are dropped. ensurepip runs in a child process because it blanks pip's configuration in the
process that calls it.
"""
import subprocess
import sys

GET_PIP_ONLY_FLAGS = {"--no-setuptools", "--no-wheel"}

subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
packages = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_FLAGS]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "-q"] + packages))
