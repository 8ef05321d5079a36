"""Snapshots: a stream's KV cache and every piece of state needed to continue it bit-exactly, in one
safetensors file (never pickle).

Layout: tensors `layers.{i}.keys` / `layers.{i}.values` ([B, H_kv, S, D] each: the cache, which under
bounded memory is the working set), `book.index` and `book.last_keys` (bounded memory: the pages'
mean pre-RoPE keys and the newest page's keys), and str->str metadata:

    format, format_version   what this file is and which reader it needs
    state                    JSON: the engine state (state.py), the cache's spans, the stream's next
                             frame, chunk boundaries, the dialogue so far; under bounded memory the
                             budget, every page's place and time, retention scores, and the archive's
                             manifest: one immutable file per archived page (written once, by the first
                             snapshot or spill that needs it, never again) with its sha256
    config                   JSON: SessionConfig.to_dict() (sampling, chunking, history mode, ...)
    model_id, model_fingerprint (the config and a sample of the weights: fingerprint.py), dtype,
    video_sha256, video_path, sampled_fps, total_frames, ...
    versions                 JSON: library versions that wrote it
    checksum                 sha256 over the tensor bytes and every other metadata value

Writes go to a temporary file in the same folder, are fsync'ed and renamed into place, so a crash
or a full disk never leaves half a snapshot where a good one was. Reads check the file's sha256
(when the store recorded it), then the header's structure, then identity (model, config, video,
format), then the tensors, and only then touch the live engine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hf
from .config import SessionConfig
from .errors import UserError
from .kvcache import Span
from .memory import Budget
from .models import Loaded
from .pages import PageInfo
from .state import EngineState
from .stream import Stream
from .video import sha256_file

FORMAT = "streamchat-snapshot"
FORMAT_VERSION = 2  # 2: engine state with a version, cache spans, bounded memory's pages and archive
READS_VERSIONS = ("1", "2")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a bigger length means a damaged file
SUFFIX = ".safetensors"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class SnapshotError(UserError):
    """A snapshot that cannot be restored here: damaged, or made for another model, video or reader."""


class SnapshotWriteError(RuntimeError):
    """Writing failed (full disk, permissions); the temporary file is gone and older snapshots stay."""


def versions() -> dict:
    import numpy
    import safetensors

    import streamchat

    return {
        "streamchat": streamchat.__version__,
        "torch": torch.__version__,
        "transformers": hf.transformers_version(),
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- writing ------------------------------------------------------------------------------------


@dataclass
class Written:
    path: Path
    bytes: int
    sha256: str
    seconds: float


def stream_state(stream: Stream, chunks: list | None = None, dialogue: list | None = None) -> dict:
    """Everything besides the cache's rows that the engine and the stream need to go on where they
    stopped (archive pages not yet on disk are written now, once)."""
    e = stream.engine
    state = {
        **e.state.to_json(),
        "next_frame": stream.next_frame,
        "cache_tokens": e.cache_tokens,
        "spans": [sp.to_json() for sp in e.cache.spans],
        "budget": e.budget.to_json(),
        "chunks": chunks or [],  # [frame_first, frame_last, padded, cache_tokens_after] per chunk
        "dialogue": dialogue or [],  # {at_s, question, token_ids} per turn
    }
    if e.bounded:
        archive = e.book.archive
        if archive.spill_dir is None:
            raise SnapshotWriteError("a bounded stream's snapshot needs a folder for its archive pages (spill_dir)")
        manifest = []
        for page in sorted(archive.pages):
            path = archive.write(page)
            stored = archive.pages[page]
            manifest.append([page, path.name, stored.sha256, stored.nbytes])
        state.update(pages=[p.to_json() for p in e.book.pages], scores=e.book.scores, archive=manifest)
    return state


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the raw tensor bytes (name order) and the other metadata values (key order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    for key in sorted(k for k in metadata if k != "checksum"):
        digest.update(key.encode() + b"\0" + metadata[key].encode() + b"\0")
    return digest.hexdigest()


def build(stream: Stream, *, video_path: str, video_sha256: str, session: str = "", chunks=None, dialogue=None) -> tuple[dict, dict]:
    """The tensors and metadata of a snapshot of `stream` (nothing is written)."""
    e = stream.engine
    loaded = e.loaded
    tensors: dict[str, torch.Tensor] = {}
    for i, (keys, values) in enumerate(hf.cache_layers(e.cache.hf)):
        # keys, values: [B, H_kv, S, D]; crop() leaves non-contiguous views that safetensors refuses
        tensors[f"layers.{i}.keys"] = keys.detach().to("cpu").contiguous()
        tensors[f"layers.{i}.values"] = values.detach().to("cpu").contiguous()
    try:
        state = stream_state(stream, chunks, dialogue)
    except OSError as exc:
        raise SnapshotWriteError(f"could not write the archive pages of the snapshot ({exc.strerror or exc}); free some disk space and save again") from exc
    if e.bounded and e.book.index is not None:
        tensors["book.index"] = e.book.index[: len(e.book.pages)].detach().to("cpu").contiguous()
        tensors["book.last_keys"] = e.book.last_keys.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "session": session,
        "state": json.dumps(state),
        "config": json.dumps(e.config.to_dict(), sort_keys=True),
        "config_fingerprint": e.config.fingerprint(),
        "model_id": loaded.model_id,
        "model_fingerprint": loaded.fingerprint,
        "dtype": dtype_name(loaded.dtype),
        "device": str(loaded.device),
        "n_layers": str(sum(1 for name in tensors if name.startswith("layers.")) // 2),
        "video_path": str(video_path),
        "video_sha256": video_sha256,
        "sampled_fps": repr(float(stream.fps)),
        "total_frames": str(stream.total_frames),
        "versions": json.dumps(versions(), sort_keys=True),
    }
    metadata["checksum"] = _checksum(tensors, metadata)
    return tensors, metadata


def _write_tensors(tensors: dict, metadata: dict, path: Path) -> None:
    """One seam for tests that simulate a full disk."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def write(tensors: dict, metadata: dict, path: Path) -> Written:
    """Write atomically: temp file in the same folder, fsync, rename, fsync the folder."""
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_tensors(tensors, metadata, tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapshotWriteError(
            f"could not write the snapshot {path} ({reason}); the previous snapshot is kept, "
            f"free some disk space and save again"
        ) from exc
    _fsync_dir(path.parent)
    return Written(path, size, digest, time.perf_counter() - t0)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save(stream: Stream, path: Path, *, video_path: str, video_sha256: str, session: str = "", chunks=None, dialogue=None) -> Written:
    tensors, metadata = build(stream, video_path=video_path, video_sha256=video_sha256, session=session, chunks=chunks, dialogue=dialogue)
    return write(tensors, metadata, path)


# --- reading ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A parsed, structurally valid snapshot; `check` and `restore` come next."""

    path: Path
    metadata: dict[str, str]
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    state: dict
    config: SessionConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the others (book.*)
    legacy: bool = False  # `check` accepted it by the fingerprint of a streamchat that did not hash weights

    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    @property
    def model_fingerprint(self) -> str:
        return self.metadata["model_fingerprint"]

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def video_sha256(self) -> str:
        return self.metadata["video_sha256"]

    @property
    def versions(self) -> dict:
        return json.loads(self.metadata.get("versions") or "{}")

    @property
    def cache_tokens(self) -> int:
        return int(self.state["cache_tokens"])

    def version_warnings(self) -> list[str]:
        """Libraries that changed since the snapshot was written (continuation may then differ in the last bits),
        and, for a snapshot from before weights were fingerprinted that `check` accepted, that its weights went unchecked."""
        from .fingerprint import LEGACY_WARNING

        now, then = versions(), self.versions
        legacy = [LEGACY_WARNING.format(what=f"snapshot {self.path.name}", model=self.model_id)] if self.legacy else []
        return legacy + [
            f"snapshot written with {lib} {then[lib]}, running {now[lib]}; answers may differ slightly"
            for lib in ("torch", "transformers")
            if lib in then and then[lib] != now.get(lib)
        ]

    def check(self, loaded: Loaded, *, config: SessionConfig | None = None, video_sha256: str | None = None) -> None:
        """Raise SnapshotError unless this snapshot belongs to `loaded`'s model, `config` and the video."""
        where = self.path.name
        if self.model_id != loaded.model_id:
            raise SnapshotError(f"snapshot {where} was made with model {self.model_id}, not {loaded.model_id}; resume with --model {self.model_id}")
        self.legacy = bool(loaded.legacy_fingerprint) and self.model_fingerprint == loaded.legacy_fingerprint
        if self.model_fingerprint != loaded.fingerprint and not self.legacy:
            raise SnapshotError(
                f"snapshot {where} was made with other weights or architecture of model {self.model_id} "
                f"(fingerprint {self.model_fingerprint}, loaded model {loaded.fingerprint}); its cache does not fit this model: "
                "load the checkpoint it was made with, or run the session again"
            )
        if self.dtype != dtype_name(loaded.dtype):
            raise SnapshotError(f"snapshot {where} holds {self.dtype} tensors but the model is loaded in {dtype_name(loaded.dtype)}; resume with --dtype {self.dtype}")
        if config is not None and config.to_dict() != self.config.to_dict():
            raise SnapshotError(f"snapshot {where} was made with other session settings (config {self.config.fingerprint()}, session {config.fingerprint()}); the store and the file disagree")
        if video_sha256 is not None and video_sha256 != self.video_sha256:
            raise SnapshotError(
                f"snapshot {where} was made from another video (sha256 {self.video_sha256[:12]}…, this video {video_sha256[:12]}…); "
                f"pass the original video ({self.metadata.get('video_path')})"
            )
        tc = hf.text_config(loaded.model)
        n_layers = int(tc.num_hidden_layers)
        if self.layers and len(self.layers) != n_layers:
            raise SnapshotError(f"snapshot {where} has {len(self.layers)} layers, the model has {n_layers}; it was made for another model")
        head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        for keys, values in self.layers:
            if keys.shape[1] != tc.num_key_value_heads or keys.shape[3] != head_dim:
                raise SnapshotError(f"snapshot {where} holds [B, H_kv, S, D] = {list(keys.shape)}, the model needs H_kv={tc.num_key_value_heads}, D={head_dim}")

    def restore(self, stream: Stream) -> None:
        """Put the cache and state into `stream` (call `check` first); nothing is changed if a check fails."""
        s = self.state
        if abs(float(self.metadata["sampled_fps"]) - stream.fps) > 1e-9 or int(self.metadata["total_frames"]) != stream.total_frames:
            raise SnapshotError(
                f"snapshot {self.path.name} samples {self.metadata['total_frames']} frames at {self.metadata['sampled_fps']} fps, "
                f"the video now gives {stream.total_frames} at {stream.fps}; the video or its sampling changed"
            )
        if not 0 <= s["next_frame"] <= stream.total_frames:
            raise SnapshotError(f"snapshot {self.path.name} stopped at frame {s['next_frame']}, past the video's {stream.total_frames}")
        e = stream.engine
        budget = s.get("budget")
        if budget is not None and budget["mode"] != e.budget.mode:
            raise SnapshotError(
                f"snapshot {self.path.name} was made under {budget['mode']} memory, the stream now plans {e.budget.mode} memory; "
                f"resume with the same --memory and budgets"
            )
        bounded = budget is not None and budget["mode"] == "bounded"
        spans = [Span(int(t), None if p is None else int(p)) for t, p in s.get("spans", [])]
        if "spans" not in s and self.cache_tokens:  # format 1: an exact cache, its rows not told apart
            spans = [Span(self.cache_tokens)]
        if spans and sum(sp.tokens for sp in spans) != self.cache_tokens:
            raise _damaged(self.path, "the cache's spans do not add up to its tokens")
        archive = []
        if bounded:
            folder = e.book.archive.spill_dir
            for page, name, digest, nbytes in s["archive"]:
                path = (folder / name) if folder is not None else None
                if path is None or not path.is_file():
                    raise SnapshotError(f"snapshot {self.path.name} needs archive page file {name} in {folder}, which is missing; restore an earlier snapshot or run the session again")
                archive.append((int(page), path, digest, int(nbytes)))
        # every check passed: from here on only assignments and copies into the planned buffers
        e.state = EngineState.from_json(s)
        e.cache.truncate(0)
        e.cache.spans = []
        if self.layers:
            with torch.inference_mode():  # the planned buffers are inference tensors
                hf.cache_append_rows(e.cache.hf, self.layers)  # fills the buffers plan() sized; no second cache
        e.cache.spans = spans
        e.book.pages = [PageInfo.from_json(d) for d in s.get("pages", [])]
        e.book.scores = [float(x) for x in s.get("scores", [])]
        if bounded:
            e.budget = Budget(**budget)
            dev = e.loaded.device
            e.book.index = self.tensors["book.index"].to(dev) if "book.index" in self.tensors else None
            e.book.last_keys = self.tensors["book.last_keys"].to(dev) if "book.last_keys" in self.tensors else None
            for page, path, digest, nbytes in archive:
                e.book.archive.adopt(page, path, digest, nbytes)
        stream.next_frame = s["next_frame"]


def _damaged(path: Path, detail: str) -> SnapshotError:
    return SnapshotError(f"snapshot {path} is damaged ({detail}); restore an earlier one (`resume --from N`) or run the session again")


def read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """The tensor index, the metadata and the data length, checked against the file's size.

    A truncated or scribbled file gives SnapshotError here, before safetensors parses anything.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _damaged(path, f"only {size} bytes")
            n = int.from_bytes(raw, "little")
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise _damaged(path, f"header length {n} does not fit a {size}-byte file; truncated?")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path} is missing; it was moved or deleted (`streamchat sessions show` lists the session's snapshots)") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _damaged(path, "no metadata")
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        try:
            a, b = (int(x) for x in info["data_offsets"])
            nbytes = math.prod(int(d) for d in info["shape"]) * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"bad entry for tensor {name!r}") from None
        if not 0 <= a <= b <= data_len or b - a != nbytes:
            raise _damaged(path, f"tensor {name!r} reaches past the end of the file; truncated?")
        end = max(end, b)
    if end != data_len:
        raise _damaged(path, f"{data_len - end} bytes after the last tensor" if end < data_len else "truncated")
    return header, meta, data_len


def read(path: Path, *, expected_sha256: str | None = None) -> Snapshot:
    """Parse and verify a snapshot file without touching any live state."""
    path = Path(path)
    if expected_sha256:
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {path} is missing; it was moved or deleted (`streamchat sessions show` lists the session's snapshots)") from None
        if actual != expected_sha256:
            raise _damaged(path, f"sha256 {actual[:12]}… differs from the recorded {expected_sha256[:12]}…")
    header, meta, _ = read_header(path)
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a streamchat snapshot (format {meta.get('format')!r})")
    if meta.get("format_version") not in READS_VERSIONS:
        raise SnapshotError(
            f"snapshot {path} has format version {meta.get('format_version')}, this streamchat reads versions {' and '.join(READS_VERSIONS)}; "
            f"use the streamchat that wrote it, or run the session again"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    if _checksum(tensors, meta) != meta.get("checksum"):
        raise _damaged(path, "checksum of tensors and metadata does not match")
    try:
        state = json.loads(meta["state"])
        config = SessionConfig.from_dict(json.loads(meta["config"]))
        n_layers = int(meta["n_layers"])
        layers = [(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]) for i in range(n_layers)]
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"missing or bad field {exc}") from None
    extra = {name: t for name, t in tensors.items() if not name.startswith("layers.")}
    if len(tensors) - len(extra) != 2 * n_layers or not set(extra) <= {"book.index", "book.last_keys"}:
        raise _damaged(path, f"{len(tensors)} tensors for {n_layers} layers")
    for keys, values in layers:
        if keys.shape != values.shape or keys.dim() != 4 or keys.shape[2] != state["cache_tokens"]:
            raise _damaged(path, f"layer shapes {list(keys.shape)} / {list(values.shape)} do not match {state['cache_tokens']} cache tokens")
        if _DTYPE_NAMES.get(keys.dtype) is None or dtype_name(keys.dtype) != meta["dtype"]:
            raise _damaged(path, f"tensor dtype {keys.dtype} is not the recorded {meta['dtype']}")
    return Snapshot(path, meta, layers, state, config, extra)


def load(path: Path, stream: Stream, *, expected_sha256: str | None = None, video_sha256: str | None = None) -> Snapshot:
    """Read, check against `stream`'s model and config, and restore into it; all checks before any change."""
    snap = read(path, expected_sha256=expected_sha256)
    snap.check(stream.engine.loaded, config=stream.engine.config, video_sha256=video_sha256)
    snap.restore(stream)
    return snap
