"""The core never imports the UI: headless modules load without Textual (harlequin's check)."""

from __future__ import annotations

import json
import subprocess
import sys

# every headless module; a missing one fails the test (a rename must update this list, not skip it)
HEADLESS = [
    "streamchat.engine", "streamchat.store", "streamchat.replay", "streamchat.session", "streamchat.stream",
    "streamchat.offline", "streamchat.compare", "streamchat.snapshots", "streamchat.cli", "streamchat.layout",
    "streamchat.state", "streamchat.kvcache", "streamchat.memory", "streamchat.archive", "streamchat.pages",
    "streamchat.bench_long",
]


def test_core_modules_import_without_textual():
    """Each module in turn, in a fresh interpreter: the first one that pulls in Textual is named."""
    code = (
        "import importlib, json, sys\n"
        "ui = lambda: sorted(m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'streamchat.app')))\n"
        "report = {}\n"
        f"for name in {HEADLESS!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        report[name] = 'missing: ' + str(exc)\n"
        "        continue\n"
        "    report[name] = ui()\n"
        "print(json.dumps(report))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {name: [] for name in HEADLESS}


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
