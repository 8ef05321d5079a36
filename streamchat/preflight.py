"""Checks the CLI makes before any work starts: files it will write, the device name, the argv quirks.

Light on purpose (no torch): a bad path or device must cost a fraction of a second, not a model load.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import UserError

# The files each command writes, by its parsed attribute, with the flag to name in an error.
OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "compare": (("report", "--report"),),
    "replay": (("report", "--report"),),
    "bench": (("out", "--out"), ("report", "--report")),
    "make-clip": (("path", "PATH"),),
    "eval": (("out", "--out"),),
    "sessions export": (("output", "--output"),),
}

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def command_of(args) -> str:
    """'compare', 'sessions export', ...: the command (and action) that argparse picked."""
    name = getattr(args, "command", "") or ""
    action = getattr(args, f"{name}_command", None)
    return f"{name} {action}" if action else name


def writable_file(path: str | os.PathLike, flag: str, *, overwrite: bool = True) -> Path:
    """`path` as a Path once it is sure a file can be written there; its folder is created."""
    p = Path(path).expanduser()
    where = f"{flag} {path}" if flag.startswith("-") else str(path)
    if p.is_dir():
        raise UserError(f"{where} is a folder; give a file name inside it")
    if p.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --force to overwrite it, or pick another path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{where}: cannot create the folder {p.parent} ({exc.strerror}); pick a path you can write to") from exc
    try:  # permissions alone do not tell (root, read-only mounts, /proc): try a file there
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=".streamchat-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{where}: cannot write in {p.parent} ({exc.strerror}); pick a path you can write to") from exc
    return p


def check_outputs(args) -> None:
    """Every output path of the command, checked (and its folder created) before the work."""
    for attr, flag in OUTPUTS.get(command_of(args), ()):
        value = getattr(args, attr, None)
        if value:
            writable_file(value, flag, overwrite=attr != "path" or getattr(args, "force", True))


def check_device(args) -> None:
    device = getattr(args, "device", None)
    if device is not None and not _DEVICE_RE.match(device):
        raise UserError(f"--device {device!r} is not a device streamchat runs on; give cpu, cuda, cuda:N or auto")


def check(args) -> None:
    check_device(args)
    check_outputs(args)


def join_dash_values(argv: list[str], flags: tuple[str, ...] = ("--ask",)) -> list[str]:
    """`--ask -2:Q` as `--ask=-2:Q`: argparse takes a value that starts with '-' for an option and
    says only "expected one argument"; joined, the value reaches Ask.parse, which says what is wrong."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out
