"""Options that override a setting: one per setting that has one, typed and checked by the Settings model."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from search.cli import build_parser, main
from search.cli.options import setting_option, settings_from
from search.core.settings import Settings

# Each option that overrides a setting: the setting, its command line, and the typed value it must give.
SETTING_FLAGS = {
    "data_dir": (["--data-dir", "/tmp/hs", "serve"], Path("/tmp/hs")),
    "host": (["serve", "--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["serve", "--port", "9001"], 9001),
    "auth_token": (["serve", "--auth-token", "s3cret-token-16chars"], "s3cret-token-16chars"),
    "model": (["query", "--model-config", "conch_tiny"], "conch_tiny"),
    "checkpoint": (["query", "--checkpoint", "w.bin"], Path("w.bin")),
    "tokenizer": (["embed", "-o", "x.npy", "--tokenizer", "t.json"], Path("t.json")),
    "device": (["status", "--device", "cuda:1"], "cuda:1"),
    "dtype": (["index", "p", "--dtype", "bf16"], "bf16"),
    "batch_size": (["index", "p", "--batch-size", "7"], 7),
    "compile": (["serve", "--compile"], True),
    "gpu_decode": (["index", "p", "--gpu-decode"], True),
    "workers": (["reindex", "--workers", "3"], 3),
    "index_type": (["remove", "p", "--index-type", "hnsw"], "hnsw"),
    "ray_address": (["index", "p", "--ray", "head:6379"], "head:6379"),
    "ray_actors": (["reindex", "--ray-actors", "4"], 4),
}


def _setting_dests(parser: argparse.ArgumentParser) -> set[str]:
    dests = {a.dest for a in parser._actions if a.dest in Settings.model_fields}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                dests |= _setting_dests(sub)
    return dests


@pytest.mark.parametrize("field", list(SETTING_FLAGS))
def test_every_setting_option_overrides_its_setting_with_the_models_type(field, monkeypatch):
    monkeypatch.delenv(f"HISTOSEARCH_{field.upper()}", raising=False)
    argv, expected = SETTING_FLAGS[field]
    settings = settings_from(build_parser().parse_args(argv))
    assert getattr(settings, field) == expected and type(getattr(settings, field)) is type(expected)
    assert getattr(settings, field) != Settings.model_fields[field].default


def test_the_setting_options_are_exactly_those_listed():
    assert _setting_dests(build_parser()) == set(SETTING_FLAGS)


def test_setting_options_take_choices_and_ranges_from_the_model(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "p", "--index-type", "annoy"])
    err = capsys.readouterr().err
    assert "invalid choice: 'annoy'" in err and "'ivfpq'" in err
    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err
    # A bool setting is a --flag/--no-flag pair; a number-or-word setting takes either.
    args = build_parser().parse_args(["index", "p", "--no-compile", "--batch-size", "auto"])
    assert (args.compile, args.batch_size) == (False, "auto")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "p", "--batch-size", "lots"])
    assert "a whole number or auto" in capsys.readouterr().err
    with pytest.raises(TypeError, match="setting path_pattern"):
        parser = argparse.ArgumentParser()
        monkeypatch.setattr(Settings.model_fields["path_pattern"], "annotation", list[str])
        setting_option(parser, "path_pattern", help="a list has no option design")
