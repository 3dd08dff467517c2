"""Text a library printed through sys.stdout, then the CLI with no output of its own.
argv: URI"""
import sys

from secretbus import cli

print("from a library")
sys.exit(cli.main(["-q", "-c", sys.argv[1], "secret-list"]))
