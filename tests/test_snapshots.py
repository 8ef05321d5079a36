"""Snapshot files: bit-exact round trip, what they hold, and every way a file can be wrong."""

import dataclasses
import errno
import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streamchat import hf, snapshots
from streamchat.clips import make_clip
from streamchat.config import SessionConfig
from streamchat.models import load
from streamchat.snapshots import SnapshotError, SnapshotWriteError
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource, sha256_file


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random", device="cpu", dtype="float32")  # pinned: the default is a GPU where there is one


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path, seconds=3, fps=24, width=112, height=112)
    return path


@pytest.fixture(scope="module")
def config():
    return SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=8).validate()


def new_stream(tiny, clip, config) -> Stream:
    return Stream(tiny, VideoSource(clip, config.sampling), config)


@pytest.fixture
def saved(tiny, clip, config, tmp_path):
    """A stream stopped at 1.6 s (7 frames sampled, the 7th waiting for its pair) after one rolled-back turn."""
    stream = new_stream(tiny, clip, config)
    stream.encode_until(stream.frames_at(1.6))
    stream.engine.ask("What is red?")
    written = snapshots.save(stream, tmp_path / "s" / "snapshot-1.safetensors", video_path=str(clip), video_sha256=sha256_file(clip))
    return stream, written


def layers_equal(a, b) -> bool:
    la, lb = hf.cache_layers(a), hf.cache_layers(b)
    return len(la) == len(lb) and all(torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(la, lb))


def test_restored_stream_continues_bit_identically(tiny, clip, config, saved):
    stream, written = saved
    assert stream.next_frame == 6 and stream.engine.block_frames == 6  # an odd 7th frame waits
    restored = new_stream(tiny, clip, config)
    t0 = time.perf_counter()
    snap = snapshots.load(written.path, restored, expected_sha256=written.sha256, video_sha256=sha256_file(clip))
    restore_s = time.perf_counter() - t0
    assert snap.cache_tokens == stream.engine.cache_tokens == restored.engine.cache_tokens == 74
    assert layers_equal(stream.engine.cache.hf, restored.engine.cache.hf)
    assert restored.engine.cursor == stream.engine.cursor and restored.next_frame == 6
    assert restored.engine.pending == stream.engine.pending
    assert restored.engine.transcript == stream.engine.transcript
    assert (restored.engine.frames_seen, restored.engine.chunks_encoded, restored.engine.turns) == (6, 2, 1)

    for s in (stream, restored):
        s.encode_until(s.total_frames)
    a, b = stream.engine.ask("Anything blue?"), restored.engine.ask("Anything blue?")
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8
    assert float((a.first_logits - b.first_logits).abs().max()) == 0.0
    assert layers_equal(stream.engine.cache.hf, restored.engine.cache.hf)
    print(f"snapshot {written.bytes} bytes, 74 tokens, saved in {written.seconds * 1000:.1f} ms, restored in {restore_s * 1000:.1f} ms")


def test_snapshot_file_holds_every_layer_and_the_state_to_continue(tiny, clip, saved):
    stream, written = saved
    tc = hf.text_config(tiny.model)
    with safe_open(str(written.path), "pt") as f:
        names, meta = set(f.keys()), f.metadata()
        k0 = f.get_tensor("layers.0.keys")
    assert names == {f"layers.{i}.{kv}" for i in range(tc.num_hidden_layers) for kv in ("keys", "values")}
    assert list(k0.shape) == [1, tc.num_key_value_heads, 74, tc.hidden_size // tc.num_attention_heads]
    tensor_bytes = 2 * tc.num_hidden_layers * k0.numel() * k0.element_size()
    assert tensor_bytes < written.bytes < tensor_bytes + 16384  # the rest is the JSON header
    assert written.sha256 == sha256_file(written.path) and written.bytes == written.path.stat().st_size
    assert meta["format"] == "streamchat-snapshot" and meta["format_version"] == "2"
    assert meta["model_id"] == "tiny-random" and meta["model_fingerprint"] == tiny.fingerprint
    assert meta["dtype"] == "float32" and meta["video_sha256"] == sha256_file(clip)
    assert {"torch", "transformers", "safetensors", "streamchat"} <= set(json.loads(meta["versions"]))
    assert json.loads(meta["config"])["sampling"]["fps"] == 4
    state = json.loads(meta["state"])
    assert state["next_frame"] == 6 and state["cursor"]["block_start"] is not None and state["turns"] == 1
    assert state["transcript"][-1] == {"frames": [0, 1, 2, 3, 4, 5], "grid": [4, 4]}  # 112 px / 14 / merge 2
    assert state["pending"] == [] and state["cache_tokens"] == 74
    assert not list(written.path.parent.glob("*.partial"))


def test_flipped_byte_is_caught_by_the_recorded_sha256_and_by_the_checksum(saved):
    _, written = saved
    data = bytearray(written.path.read_bytes())
    data[-100] ^= 0x01  # inside layer tensors
    written.path.write_bytes(data)
    with pytest.raises(SnapshotError, match="damaged.*sha256"):
        snapshots.read(written.path, expected_sha256=written.sha256)
    with pytest.raises(SnapshotError, match="damaged.*checksum"):
        snapshots.read(written.path)  # a copied file with no store row still knows


@pytest.mark.parametrize("keep", [0, 5, 8, 60, 0.5, -1])
def test_truncated_snapshot_is_one_clear_error_never_a_crash(saved, keep):
    _, written = saved
    data = written.path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    written.path.write_bytes(data[:n])
    with pytest.raises(SnapshotError, match="damaged") as info:
        snapshots.read(written.path)
    assert "\n" not in str(info.value)


def test_scribbled_header_is_one_clear_error(saved):
    _, written = saved
    data = bytearray(written.path.read_bytes())
    data[10:20] = b"\xff" * 10  # inside the JSON header
    written.path.write_bytes(data)
    with pytest.raises(SnapshotError, match="damaged.*header"):
        snapshots.read(written.path)


def rewrite(path, **meta_changes):
    """The same tensors with changed metadata (the checksum is not updated, as an editor would not)."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **meta_changes}
    save_file(tensors, str(path), metadata=meta)


def test_snapshot_of_another_model_config_is_refused(tiny, clip, config, saved):
    _, written = saved
    other = dataclasses.replace(tiny, fingerprint="0123456789abcdef")
    snap = snapshots.read(written.path)
    with pytest.raises(SnapshotError, match="other weights or architecture of model tiny-random"):
        snap.check(other)
    with pytest.raises(SnapshotError, match="--dtype float32"):
        snap.check(dataclasses.replace(tiny, dtype=torch.bfloat16))
    with pytest.raises(SnapshotError, match="other session settings"):
        snap.check(tiny, config=dataclasses.replace(config, chunk_frames=2))
    with pytest.raises(SnapshotError, match="another video"):
        snap.check(tiny, video_sha256="0" * 64)
    rewrite(written.path, model_fingerprint="0123456789abcdef")
    with pytest.raises(SnapshotError, match="checksum"):  # an edited file no longer matches its checksum
        snapshots.read(written.path)


def test_other_format_version_is_refused(saved):
    _, written = saved
    rewrite(written.path, format_version="3")
    with pytest.raises(SnapshotError, match="format version 3, this streamchat reads versions 1 and 2"):
        snapshots.read(written.path)


def test_failed_restore_leaves_the_live_stream_untouched(tiny, clip, config, saved):
    _, written = saved
    live = new_stream(tiny, clip, config)
    live.encode_until(4)
    before = (live.engine.cache_tokens, live.engine.cursor.copy(), list(live.engine.pending), live.next_frame)
    with pytest.raises(SnapshotError, match="another video"):
        snapshots.load(written.path, live, video_sha256="f" * 64)
    with pytest.raises(SnapshotError, match="damaged"):
        snapshots.load(written.path, live, expected_sha256="0" * 64)
    assert (live.engine.cache_tokens, live.engine.cursor, live.engine.pending, live.next_frame) == before


def test_full_disk_removes_the_temp_file_and_keeps_the_old_snapshot(saved, monkeypatch):
    stream, written = saved
    good = written.path.read_bytes()

    def full_disk(tensors, metadata, path):
        path.write_bytes(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshots, "_write_tensors", full_disk)
    stream.encode_until(stream.total_frames)
    with pytest.raises(SnapshotWriteError, match="No space left on device.*previous snapshot is kept") as info:
        snapshots.save(stream, written.path, video_path="v", video_sha256="x")
    assert "\n" not in str(info.value)
    assert written.path.read_bytes() == good
    assert sorted(p.name for p in written.path.parent.iterdir()) == ["snapshot-1.safetensors"]
    assert snapshots.read(written.path, expected_sha256=written.sha256).cache_tokens == 74


def test_an_empty_stream_round_trips(tiny, clip, config, tmp_path):
    stream = new_stream(tiny, clip, config)
    written = snapshots.save(stream, tmp_path / "empty.safetensors", video_path=str(clip), video_sha256="x")
    restored = new_stream(tiny, clip, config)
    snapshots.load(written.path, restored, expected_sha256=written.sha256)
    assert restored.engine.cache_tokens == 0 and restored.engine.pending == stream.engine.pending
    for s in (stream, restored):
        s.encode_until(4)
    assert stream.engine.ask("What?").token_ids == restored.engine.ask("What?").token_ids


def test_a_snapshot_from_other_library_versions_restores_with_a_warning(saved):
    _, written = saved
    snap = snapshots.read(written.path)
    assert snap.version_warnings() == []
    snap.metadata["versions"] = json.dumps({**snap.versions, "torch": "0.0.1"})
    [warning] = snap.version_warnings()
    assert "torch 0.0.1" in warning and torch.__version__ in warning
