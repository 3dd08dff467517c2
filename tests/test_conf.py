"""secret.conf parsing: virConf syntax, typed options, errors naming file and line."""
from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import programs

from secretbus.core import errors
from secretbus.store.conf import SecretConf, load_conf, parse_conf, resolve_readers

F = "/etc/libvirt/secret.conf"


def parse(text: str) -> SecretConf:
    return parse_conf(text, F)


def conf_error(text: str) -> str:
    with pytest.raises(errors.ConfigError) as ei:
        parse(text)
    return str(ei.value)


# --- syntax forms ------------------------------------------------------------

def test_empty_and_comment_only_files_give_defaults():
    assert parse("") == SecretConf(path=Path(F))
    assert parse("\n\n   \n") == SecretConf(path=Path(F))
    c = parse("# secret.conf\n#secrets_encryption_key = \"/x\"\n  # indented comment\n")
    assert c.encrypt_data is None and c.secrets_encryption_key is None
    assert c.encryption_scheme == "aes256gcm" and c.private_value_readers == ()


def test_shipped_libvirt_sample_parses():
    text = ('# Master configuration file for the secrets driver.\n'
            '#\n'
            '#secrets_encryption_key = "/run/libvirt/secrets/secret-encryption-key"\n'
            '#encrypt_data = 1\n')
    assert parse(text) == SecretConf(path=Path(F))


def test_double_and_single_quoted_strings():
    c = parse('secrets_encryption_key = "/k/a b"\nencryption_scheme = \'aes256cbc\'\n')
    assert c.secrets_encryption_key == "/k/a b"
    assert c.encryption_scheme == "aes256cbc"


def test_quotes_of_the_other_kind_are_plain_characters():
    c = parse("secrets_encryption_key = '/k/\"x\"'\n")
    assert c.secrets_encryption_key == '/k/"x"'


def test_triple_quoted_string():
    c = parse('secrets_encryption_key = """/k/x"""\nencrypt_data = 1\n')
    assert c.secrets_encryption_key == "/k/x" and c.encrypt_data is True


def test_triple_quoted_string_spanning_lines_keeps_line_numbers():
    # The key path can't contain a newline sensibly, so use the value in an unknown key
    # and check a later error still names the right line.
    msg = conf_error('other = """a\nb\nc"""\nencrypt_data = 7\n')
    assert msg == f"{F}:4: 'encrypt_data' must be 0 or 1"


def test_integers_and_signs():
    assert parse("encrypt_data = 1").encrypt_data is True
    assert parse("encrypt_data = 0").encrypt_data is False
    assert parse("encrypt_data = +1").encrypt_data is True
    assert parse("encrypt_data=0").encrypt_data is False  # no blanks needed


def test_comment_after_value_and_semicolons():
    c = parse('encrypt_data = 1 # turn it on\n'
              'secrets_encryption_key = "/k" ;  encryption_scheme = "aes256cbc" # two\n')
    assert c.encrypt_data is True
    assert c.secrets_encryption_key == "/k"
    assert c.encryption_scheme == "aes256cbc"


def test_hash_inside_string_is_not_a_comment():
    assert parse('secrets_encryption_key = "/k/#1"  # c\n').secrets_encryption_key == "/k/#1"


def test_crlf_line_endings():
    c = parse('encrypt_data = 1\r\nsecrets_encryption_key = "/k"\r\n')
    assert c.encrypt_data is True and c.secrets_encryption_key == "/k"


def test_lists_single_line_multi_line_trailing_comma_and_empty():
    assert parse('private_value_readers = [ "qemu", 107 ]').private_value_readers == ("qemu", 107)
    assert parse('private_value_readers = []').private_value_readers == ()
    assert parse('private_value_readers = [ "a", ]').private_value_readers == ("a",)
    c = parse('private_value_readers = [\n'
              '    "qemu",\n'
              "    'nova',\n"
              '    0,\n'
              ']\n'
              'encrypt_data = 0\n')
    assert c.private_value_readers == ("qemu", "nova", 0)
    assert c.encrypt_data is False


def test_multi_line_list_keeps_line_numbers():
    msg = conf_error('private_value_readers = [\n "a",\n "b"\n]\nencrypt_data = "x"\n')
    assert msg == f"{F}:5: expected 0 or 1 for 'encrypt_data' (got a string)"


# --- syntax errors name file and line --------------------------------------------

@pytest.mark.parametrize("text, line, what", [
    ('encrypt_data 1\n', 1, "expecting an assignment"),
    ('\n\n= 1\n', 3, "expecting a name"),
    ('_x = 1\n', 1, "expecting a name"),
    ('encrypt_data =\n', 1, "expecting a value"),
    ('encrypt_data = ', 1, "expecting a value"),
    ('encrypt_data = yes\n', 1, "expecting a value"),
    ('encrypt_data = -\n', 1, "unterminated number"),
    ('encrypt_data = 1 2\n', 1, "expecting a separator"),
    ('encrypt_data = 1x\n', 1, "expecting a separator"),
    ('# c\nsecrets_encryption_key = "/k\n', 2, "unterminated string"),
    ("secrets_encryption_key = '/k\nencrypt_data = 1\n", 1, "unterminated string"),
    ('a = 1\nb = """never closed\n\n', 2, "unterminated string"),
    ('a = 1\nprivate_value_readers = [ "a",\n "b"\n', 2, "list is not closed with ]"),
    ('private_value_readers = [ "a" "b" ]\n', 1, "expecting a separator in list"),
    ('private_value_readers = [\n "a", # comment\n]\n', 2, "expecting a value"),
    ('private_value_readers = [ , ]\n', 1, "expecting a value"),
])
def test_syntax_errors(text, line, what):
    assert conf_error(text) == f"{F}:{line}: {what}"


def test_non_utf8_file_names_line(tmp_path):
    p = tmp_path / "secret.conf"
    p.write_bytes(b"encrypt_data = 1\n# caf\xe9\n")
    with pytest.raises(errors.ConfigError, match=rf"^{p}:2: not valid UTF-8$"):
        load_conf(p)


# --- typed options ------------------------------------------------------------

@pytest.mark.parametrize("text, what", [
    ('encrypt_data = 2', "'encrypt_data' must be 0 or 1"),
    ('encrypt_data = -1', "'encrypt_data' must be 0 or 1"),
    ('encrypt_data = "1"', "expected 0 or 1 for 'encrypt_data' (got a string)"),
    ('encrypt_data = [1]', "expected 0 or 1 for 'encrypt_data' (got a list)"),
    ('secrets_encryption_key = 1', "expected a string for 'secrets_encryption_key' (got an integer)"),
    ('secrets_encryption_key = ["/k"]', "expected a string for 'secrets_encryption_key' (got a list)"),
    ('secrets_encryption_key = ""', "'secrets_encryption_key' must not be empty"),
    ('secrets_encryption_key = "key.bin"', "'secrets_encryption_key' must be an absolute path"),
    ('encryption_scheme = "aes128"', "'encryption_scheme' must be \"aes256gcm\" or \"aes256cbc\", not 'aes128'"),
    ('encryption_scheme = "AES256GCM"', "'encryption_scheme' must be \"aes256gcm\" or \"aes256cbc\", not 'AES256GCM'"),
    ('encryption_scheme = 1', "expected a string for 'encryption_scheme' (got an integer)"),
    ('private_value_readers = "qemu"', "expected a list for 'private_value_readers' (got a string)"),
    ('private_value_readers = 107', "expected a list for 'private_value_readers' (got an integer)"),
    ('private_value_readers = [ -1 ]', "'private_value_readers' entries must be user names or uids"),
    ('private_value_readers = [ "" ]', "'private_value_readers' entries must be user names or uids"),
    ('private_value_readers = [ [ "a" ] ]', "'private_value_readers' entries must be user names or uids"),
    ('private_value_readers = [ 4294967295 ]', "'private_value_readers' entries must be user names or uids"),
])
def test_wrong_types(text, what):
    assert conf_error("# header\n" + text + "\n") == f"{F}:2: {what}"


def test_bad_list_element_names_its_own_line():
    msg = conf_error('private_value_readers = [\n "qemu",\n -5,\n]\n')
    assert msg == f"{F}:3: 'private_value_readers' entries must be user names or uids"


def test_duplicate_key_is_an_error_naming_both_lines():
    msg = conf_error('encrypt_data = 1\n# x\nencrypt_data = 0\n')
    assert msg == f"{F}:3: duplicate key 'encrypt_data' (first set at line 1)"


def test_unknown_key_warns_with_file_and_line(caplog):
    with caplog.at_level(logging.WARNING, logger="secretbus.conf"):
        c = parse('encrypt_data = 1\nsecret_encryption_key = "/typo"\n')
    assert c.encrypt_data is True and c.secrets_encryption_key is None
    msgs = [r.getMessage() for r in caplog.records if r.name == "secretbus.conf"]
    assert msgs == [f"{F}:2: unknown key 'secret_encryption_key' ignored"]


def test_known_keys_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="secretbus.conf"):
        parse('encrypt_data = 1\nsecrets_encryption_key = "/k"\n'
              'encryption_scheme = "aes256gcm"\nprivate_value_readers = []\n')
    assert caplog.records == []


def test_default_path_label_when_parsing_a_string():
    with pytest.raises(errors.ConfigError, match=r"^<string>:1: expecting a value$"):
        parse_conf("encrypt_data = ")


# --- files ------------------------------------------------------------------------

def test_missing_file_gives_defaults(tmp_path):
    assert load_conf(tmp_path / "nope.conf") == SecretConf()


def test_load_file(tmp_path):
    p = tmp_path / "secret.conf"
    p.write_text('secrets_encryption_key = "/var/k"\nencrypt_data = 1\n')
    assert load_conf(p) == SecretConf(path=p, encrypt_data=True, secrets_encryption_key="/var/k")


def test_error_in_file_names_the_file(tmp_path):
    p = tmp_path / "secret.conf"
    p.write_text('\nencrypt_data = "on"\n')
    with pytest.raises(errors.ConfigError) as ei:
        load_conf(p)
    assert str(ei.value) == f"{p}:2: expected 0 or 1 for 'encrypt_data' (got a string)"


def test_unreadable_file_is_an_error(tmp_path):
    # A directory where the file should be: open() fails even for root.
    p = tmp_path / "secret.conf"
    p.mkdir()
    with pytest.raises(errors.ConfigError, match=rf"^Failed to open file '{p}': Is a directory$"):
        load_conf(p)


def test_permission_denied_is_an_error(request):
    # root reads mode-000 files, so as root run the check as "nobody" in a child.
    d = Path(tempfile.mkdtemp())
    try:
        d.chmod(0o755)
        p = d / "secret.conf"
        p.write_text("encrypt_data = 1\n")
        p.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(errors.ConfigError) as ei:
                load_conf(p)
            out = str(ei.value)
        else:
            code = programs.source("load_conf")
            # The checkout (and its venv) may be unreachable for uid 65534: use the harness copy.
            py = request.getfixturevalue("unpriv_python")
            out = subprocess.run(py.argv("-c", code, str(p)), user=65534, cwd="/",
                                 capture_output=True, text=True, check=True,
                                 env=py.env()).stdout.strip()
        assert out == f"Failed to open file '{p}': Permission denied"
    finally:
        shutil.rmtree(d)


# --- readers ------------------------------------------------------------------------

def test_resolve_readers_names_and_uids():
    root = pwd.getpwuid(0).pw_name
    some = pwd.getpwall()[-1]
    c = parse(f'private_value_readers = [ "{root}", "{some.pw_name}", 4242, "4343" ]')
    assert resolve_readers(c) == frozenset({0, some.pw_uid, 4242, 4343})


def test_resolve_readers_empty():
    assert resolve_readers(SecretConf()) == frozenset()


def test_resolve_readers_unknown_name():
    c = parse('private_value_readers = [ "no-such-user-secretbus" ]')
    with pytest.raises(errors.ConfigError) as ei:
        resolve_readers(c)
    assert str(ei.value) == f"{F}: private_value_readers: unknown user 'no-such-user-secretbus'"
