"""Every CLI command, option and setting is documented."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli import build_parser
from search.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _commands(sub, f"{prefix}{name} ")


def test_every_command_and_option_is_in_the_cli_doc():
    for name, sub in _commands(build_parser()):
        assert f"`{name}" in CLI_DOC, f"command {name!r} missing from docs/cli.md"
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in CLI_DOC, f"{name} {option} missing from docs/cli.md"


def test_every_setting_is_in_the_cli_doc():
    for field in Settings.model_fields:
        assert f"| `{field}` |" in CLI_DOC, f"setting {field!r} missing from docs/cli.md"


def test_readme_has_two_setup_commands_and_the_main_job():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up")[1].split("```bash")[1].split("```")[0]
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()] == [
        "bash scripts/install.sh",
        "python3 -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in ci and "python3 -m pytest" in ci
    for command in ("histosearch model fetch", "histosearch index", "histosearch serve", "histosearch reindex"):
        assert command in readme


def test_every_route_is_in_the_api_doc(tmp_path):
    from search.core.settings import load_settings
    from webui.app import create_app

    api_doc = (ROOT / "docs" / "api.md").read_text()
    app = create_app(load_settings(data_dir=tmp_path))
    paths = set(app.openapi()["paths"])
    for route in app.router.routes:
        # Routers included with include_router keep their routes (pages are left out of the schema) there.
        for sub in getattr(getattr(route, "original_router", None), "routes", [route]):
            paths.add(sub.path)
    assert {"/", "/cases", "/tiles/{tile_id}", "/api/search"} <= paths
    for path in paths - {"/openapi.json", "/static"}:
        assert f"`{path}" in api_doc or f" {path}`" in api_doc or f" {path}?" in api_doc, f"{path} missing"


def test_every_error_code_is_in_the_api_doc():
    from search.core.errors import HistosearchError

    api_doc = (ROOT / "docs" / "api.md").read_text()

    def subclasses(cls: type) -> list[type]:
        return [sub for child in cls.__subclasses__() for sub in (child, *subclasses(child))]

    # The error hierarchy's codes, and those the web layer renders for framework errors (webui/).
    codes = {cls.code for cls in subclasses(HistosearchError)} | {
        "validation",
        "method_not_allowed",
        "http_error",
        "internal",
    }
    for code in codes:
        assert f"`{code}`" in api_doc, f"error code {code!r} missing from docs/api.md"
