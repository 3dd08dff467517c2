"""Load a secret.conf and print the ConfigError, if any.  argv: PATH"""
import sys
from pathlib import Path

from secretbus.core import errors
from secretbus.store import conf

try:
    conf.load_conf(Path(sys.argv[1]))
except errors.ConfigError as e:
    print(e)
