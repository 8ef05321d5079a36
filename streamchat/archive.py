"""The archive of pages that left the GPU working set: exact copies of their rotated keys and values,
in host memory (pinned, when a GPU will read them back) up to a budget, then in files on disk.

Pinned memory comes from 1 GiB slabs cut into page-sized slots (torch's pinned allocator rounds every
block up to a power of two: a 9.4 MB page would take 16 MB), and a spilled page's slot is reused.

A page's file is written once and never changed (`page-<id>.safetensors` in the spill folder), and
its sha256 is taken then; snapshots list those files instead of copying them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError


class ArchiveError(UserError):
    """An archived page that cannot be read back (a moved or damaged file)."""


@dataclass
class Stored:
    keys: torch.Tensor | None  # [L, H_kv, N, Dh] on the host, or None once only on disk
    values: torch.Tensor | None
    nbytes: int
    file: Path | None = None
    sha256: str | None = None
    verified: bool = True  # a restored snapshot's file is checked against its sha256 on first read
    buffer: torch.Tensor | None = None  # the host memory behind keys and values


SLAB_BYTES = 2**30  # a power of two, so the pinned allocator adds nothing


@dataclass
class PageArchive:
    host_budget: int  # bytes of pages kept in host memory before spilling
    spill_dir: Path | None  # where pages spill to (None: never spill)
    pin: bool = False  # pinned host memory, so copies back to a GPU overlap
    pages: dict[int, Stored] = field(default_factory=dict)
    host_bytes: int = 0
    disk_bytes: int = 0
    spill_error: str | None = None  # the last failed spill (a full disk): pages then stay in memory
    _told: str | None = None
    _free: list = field(default_factory=list, repr=False)  # free pinned slots of `_slot_bytes`
    _slot_bytes: int = 0
    _slabs: list = field(default_factory=list, repr=False)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] of host memory: a pinned slot when pinning, else plain memory."""
        if not self.pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        if not self._slot_bytes:
            self._slot_bytes = nbytes
        if nbytes != self._slot_bytes or nbytes > SLAB_BYTES:  # pages of one stream share a size
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if not self._free:
            slab = torch.empty(SLAB_BYTES, dtype=torch.uint8, pin_memory=True)
            self._slabs.append(slab)
            self._free.extend(slab[i * nbytes : (i + 1) * nbytes] for i in range(SLAB_BYTES // nbytes))
        return self._free.pop()

    def __contains__(self, page: int) -> bool:
        return page in self.pages

    def __len__(self) -> int:
        return len(self.pages)

    def put(self, page: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep an exact host copy of a page's keys and values [L, H_kv, N, Dh]."""
        half = keys.numel() * keys.element_size()
        buf = self._buffer(2 * half)
        k = buf[:half].view(keys.dtype).view(keys.shape)
        v = buf[half:].view(values.dtype).view(values.shape)
        k.copy_(keys)
        v.copy_(values)
        nbytes = 2 * half
        self.pages[page] = Stored(k, v, nbytes, buffer=buf)
        self.host_bytes += nbytes
        self._spill()

    def _spill(self) -> None:
        """Move the oldest host pages to disk until the host holds at most `host_budget` bytes."""
        if self.spill_dir is None or self.host_bytes <= self.host_budget:
            return
        for page in sorted(p for p, s in self.pages.items() if s.keys is not None):
            if self.host_bytes <= self.host_budget:
                return
            try:
                self.write(page, durable=False)  # a spill is a cache: a snapshot makes its files durable
            except OSError as exc:
                self.spill_error = f"could not spill archive pages to {self.spill_dir} ({exc.strerror or exc}); they stay in host memory"
                return
            s = self.pages[page]
            if self.pin and s.buffer is not None and s.buffer.numel() == self._slot_bytes:
                self._free.append(s.buffer)
            s.keys = s.values = s.buffer = None
            self.host_bytes -= s.nbytes

    def news(self) -> str | None:
        """A spill failure not reported yet (each distinct one once), for a warning line."""
        if self.spill_error is None or self.spill_error == self._told:
            return None
        self._told = self.spill_error
        return self.spill_error

    def write(self, page: int, durable: bool = True) -> Path:
        """The page's file, written (atomically) if it is not on disk yet; `durable` (snapshots) also
        fsyncs it and takes its sha256, once."""
        from safetensors.torch import save_file

        s = self.pages[page]
        if s.file is not None:
            if durable and s.sha256 is None:
                with open(s.file, "rb+") as f:
                    os.fsync(f.fileno())
                s.sha256 = hashlib.sha256(s.file.read_bytes()).hexdigest()
            return s.file
        assert self.spill_dir is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"page-{page:07d}.safetensors"
        tmp = path.with_suffix(".partial")
        try:
            save_file({"keys": s.keys.contiguous(), "values": s.values.contiguous()}, str(tmp))
            digest = None
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        s.file, s.sha256 = path, digest
        self.disk_bytes += path.stat().st_size
        return path

    def get(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A page's keys and values [L, H_kv, N, Dh], from memory or from its file."""
        s = self.pages[page]
        if s.keys is not None:
            return s.keys, s.values
        from safetensors.torch import load

        try:
            data = s.file.read_bytes()
        except OSError as exc:
            raise ArchiveError(f"archive page {s.file} cannot be read ({exc.strerror or exc}); restore an earlier snapshot") from None
        if not s.verified:
            if hashlib.sha256(data).hexdigest() != s.sha256:
                raise ArchiveError(f"archive page {s.file} is damaged (sha256 differs from the snapshot's); restore an earlier snapshot")
            s.verified = True
        t = load(data)
        return t["keys"], t["values"]

    def adopt(self, page: int, path: Path, sha256: str, nbytes: int) -> None:
        """Register a page already on disk (a restored snapshot's), read on first use."""
        self.pages[page] = Stored(None, None, nbytes, Path(path), sha256, verified=False)
        self.disk_bytes += Path(path).stat().st_size
