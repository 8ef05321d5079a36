"""Container facts ffmpeg's errors do not give: whether an MP4/MOV file has its index at all."""

from __future__ import annotations

import struct
from pathlib import Path

_ISO_BRANDS = (b"ftyp", b"styp")  # the first box of an ISO base-media file (mp4, mov, m4v, 3gp)


def lacks_moov(path: str | Path, max_boxes: int = 100_000) -> bool:
    """True for an MP4/MOV file whose top-level boxes end without a `moov` (the index of every
    frame). A recorder or download that stopped early leaves such a file; ffmpeg cannot read any
    frame of it, so re-encoding cannot help: it has to be exported or fetched again."""
    try:
        with open(path, "rb") as f:
            size_total = f.seek(0, 2)
            f.seek(0)
            offset = 0
            for number in range(max_boxes):
                header = f.read(8)
                if len(header) < 8:
                    return True
                size, kind = struct.unpack(">I4s", header)
                if number == 0 and kind not in _ISO_BRANDS:
                    return False  # not an ISO base-media file: another container, or not a video
                if kind == b"moov":
                    return False
                if size == 1:  # 64-bit size follows the type
                    large = f.read(8)
                    if len(large) < 8:
                        return True
                    size = struct.unpack(">Q", large)[0]
                elif size == 0:  # the box runs to the end of the file
                    return True
                if size < 8:
                    return False  # not a box structure we understand: say nothing
                offset += size
                if offset >= size_total:
                    return True
                f.seek(offset)
    except OSError:
        return False
    return False
