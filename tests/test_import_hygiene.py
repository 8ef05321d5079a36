"""The core never imports the UI: headless modules load without Textual (harlequin's check)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

CORE = ["streamchat.engine", "streamchat.store", "streamchat.stream", "streamchat.offline", "streamchat.compare"]
OPTIONAL = ["streamchat.replay", "streamchat.session", "streamchat.snapshots", "streamchat.cli"]


def test_core_modules_import_without_textual():
    modules = CORE + [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'streamchat.app')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_cli_parser_builds_without_textual():
    """`streamchat --help` registers `chat` and `demo` but leaves Textual unloaded until they run."""
    code = (
        "import sys\n"
        "from streamchat.cli import build_parser\n"
        "parser = build_parser()\n"
        "assert 'chat' in parser.format_help() and 'demo' in parser.format_help()\n"
        "print('textual' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False"
