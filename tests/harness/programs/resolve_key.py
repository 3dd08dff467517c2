"""Resolve the key with CREDENTIALS_DIRECTORY=DIR; print "no error" or the ConfigError.
argv: DIR"""
import sys

from secretbus.core import errors
from secretbus.store import conf, keys

try:
    keys.resolve_key(conf.SecretConf(), {"CREDENTIALS_DIRECTORY": sys.argv[1]})
    print("no error")
except errors.ConfigError as e:
    print(e)
