"""runsimexchange --keys: the keys file formats the simulator reads, and what it refuses."""

from __future__ import annotations

import json

import pytest
from django.core.management.base import CommandError

from exchanges.management.commands.runsimexchange import keys_load
from exchanges.simulator.wire import KeysFileError, ServerConfig, keys_parse


def test_keys_file_formats():
    listed = json.dumps([{"key": "key-a-0001", "secret": "secret-a"}, {"key": "key-b-0002", "secret": "secret-b"}])
    mapping = json.dumps({"key-a-0001": "secret-a", "key-b-0002": "secret-b"})
    lines = "# followers\nkey-a-0001:secret-a\n\n  key-b-0002 : secret-b  \n"
    for text in (listed, mapping, lines):
        assert keys_parse(text) == {"key-a-0001": "secret-a", "key-b-0002": "secret-b"}
    assert keys_parse("") == {}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("key-a:secret\nno-colon-here\n", "line 2"),
        ('[{"key": "key-a"}]', "entry 0"),
        ('[{"key": "key-a", "secret": "s"}, "x"]', "entry 1"),
        ("key-a:secret-1\nkey-a:secret-2\n", "line 2"),
        (":secret\n", "line 1"),
        ("[not json", "not valid JSON"),
    ],
)
def test_bad_keys_files_are_refused_naming_the_place(text, names):
    with pytest.raises(KeysFileError, match=names):
        keys_parse(text)


def test_secret_of_serves_every_registered_key_and_no_other():
    config = ServerConfig(api_key="main-key", api_secret="main-secret", keys={"key-a-0001": "secret-a"})
    assert config.secret_of("main-key") == "main-secret"
    assert config.secret_of("key-a-0001") == "secret-a"
    assert config.secret_of("key-b-0002") is None
    assert config.secret_of("") is None


def test_keys_load_reads_every_file_and_names_a_bad_one(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.txt"
    first.write_text(json.dumps([{"key": "key-a-0001", "secret": "secret-a"}]))
    second.write_text("key-b-0002:secret-b\nkey-a-0001:secret-a\n")
    assert keys_load([str(first), str(second)]) == {"key-a-0001": "secret-a", "key-b-0002": "secret-b"}
    clash = tmp_path / "c.txt"
    clash.write_text("key-a-0001:another-secret\n")
    with pytest.raises(CommandError, match="c.txt: key key-a-… has another secret"):
        keys_load([str(first), str(clash)])
    with pytest.raises(CommandError, match="missing.txt"):
        keys_load([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_text("only-a-key\n")
    with pytest.raises(CommandError, match="bad.txt: line 1"):
        keys_load([str(bad)])
