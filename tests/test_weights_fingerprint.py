"""The model fingerprint covers the weights, not only the config: the same weights give the same
fingerprint in any dtype and placement, other weights a different one, and a snapshot made with
other weights is refused with one line (exit code 2 through the CLI)."""

import copy
import dataclasses
import json

import pytest
import torch

from streamchat import hf, snapshots
from streamchat.cli import main
from streamchat.clips import make_clip
from streamchat.config import SessionConfig
from streamchat.fingerprint import config_fingerprint, model_fingerprint, sample_index
from streamchat.models import load
from streamchat.snapshots import SnapshotError
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource, sha256_file

from test_multi_device import CPU_DISK  # the vision tower, a decoder layer and the head offloaded
PERTURBED = "model.language_model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=2, fps=24, width=112, height=112)


def save_checkpoint(tiny, path):
    """tiny-random as a checkpoint directory (a copy: save_pretrained edits the saved model's config)."""
    copy.deepcopy(tiny.model).save_pretrained(path)
    tiny.processor.save_pretrained(path)
    return path


def with_weights_changed(model, *, scale: float = 1e-2, element: int | None = None):
    """A copy of `model` with one weight changed: noise over the whole tensor, or `scale` added to one element."""
    other = copy.deepcopy(model)
    weight = other.get_parameter(PERTURBED)
    with torch.no_grad():
        if element is None:
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            weight.add_(scale * noise.to(weight.dtype))
        else:
            weight.view(-1)[element] += scale
    return other


# --- the same weights, the same fingerprint --------------------------------------------------------


def test_the_same_weights_loaded_twice_in_float32_or_bfloat16_have_one_fingerprint(tiny):
    again = load("tiny-random", device="cpu", dtype="float32")
    half = load("tiny-random", device="cpu", dtype="bfloat16")
    assert len(tiny.fingerprint) == 16 and int(tiny.fingerprint, 16) >= 0
    assert again.fingerprint == tiny.fingerprint
    assert half.model.get_parameter(PERTURBED).dtype == torch.bfloat16
    assert half.fingerprint == tiny.fingerprint


def test_a_checkpoint_directory_in_float32_or_bfloat16_has_one_fingerprint(tiny, tmp_path):
    """A loaded checkpoint's config carries its dtype in the sub-configs too: none of it is the architecture."""
    ckpt = save_checkpoint(tiny, tmp_path / "ckpt")
    full, half = (load(str(ckpt), device="cpu", dtype=dt) for dt in ("float32", "bfloat16"))
    assert half.model.config.text_config.dtype == torch.bfloat16
    assert full.fingerprint == half.fingerprint


def test_offloaded_parameters_are_sampled_where_their_hooks_keep_them(tiny):
    """On a device map with cpu/disk parts the parameters read `meta`; their values come from accelerate's
    offload store, so the fingerprint is the one-device model's (a snapshot moves between the two)."""
    split = load("tiny-random", dtype="float32", device_map=CPU_DISK)
    assert split.model.get_parameter(PERTURBED).device.type == "meta"
    resting = dict(hf.named_weights(split.model))
    assert not [name for name, t in resting.items() if t.device.type == "meta"]
    assert torch.equal(resting[PERTURBED].float(), tiny.model.get_parameter(PERTURBED))
    assert split.fingerprint == tiny.fingerprint


# --- other weights, another fingerprint ------------------------------------------------------------


def test_changed_weights_change_the_fingerprint_but_not_the_config_hash(tiny):
    noisy = with_weights_changed(tiny.model)
    assert config_fingerprint(noisy.config) == config_fingerprint(tiny.model.config)
    assert model_fingerprint(noisy) != tiny.fingerprint
    assert model_fingerprint(copy.deepcopy(tiny.model)) == tiny.fingerprint  # the copy alone changes nothing


def test_one_sampled_element_changed_changes_the_fingerprint(tiny):
    numel = tiny.model.get_parameter(PERTURBED).numel()
    for element in (0, int(sample_index(numel)[100]), numel - 1):  # the first, one spaced, the last
        assert model_fingerprint(with_weights_changed(tiny.model, element=element)) != tiny.fingerprint, element


def test_the_digest_reads_a_sample_not_every_element(tiny):
    """What keeps loading a 7B model cheap: at most 4096 + 128 elements per parameter are read."""
    numel = tiny.model.get_parameter(PERTURBED).numel()
    sampled = set(sample_index(numel).tolist())
    assert numel > 4096 + 128 and len(sampled) <= 4096 + 128
    unsampled = next(i for i in range(numel) if i not in sampled)
    assert model_fingerprint(with_weights_changed(tiny.model, element=unsampled)) == tiny.fingerprint


# --- a snapshot made with other weights is refused ---------------------------------------------------


def test_snapshot_restored_into_other_weights_is_refused_in_one_line(tiny, clip, tmp_path):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=8).validate()
    stream = Stream(tiny, VideoSource(clip, config.sampling), config)
    stream.encode_until(stream.frames_at(1.0))
    written = snapshots.save(stream, tmp_path / "snapshot-1.safetensors", video_path=str(clip), video_sha256=sha256_file(clip))

    noisy = with_weights_changed(tiny.model)
    other = dataclasses.replace(tiny, model=noisy, fingerprint=model_fingerprint(noisy))
    target = Stream(other, VideoSource(clip, config.sampling), config)
    with pytest.raises(SnapshotError) as refused:
        snapshots.load(written.path, target, expected_sha256=written.sha256)
    line = str(refused.value)
    assert "\n" not in line
    assert "other weights or architecture of model tiny-random" in line and "run the session again" in line
    assert f"fingerprint {tiny.fingerprint}, loaded model {other.fingerprint}" in line
    assert target.engine.cache_tokens == 0  # nothing was restored
    snapshots.load(written.path, Stream(tiny, VideoSource(clip, config.sampling), config))  # the same weights: restored


def test_resume_after_the_checkpoint_changed_exits_2_and_replay_refuses(tiny, clip, tmp_path, capsys):
    """A local checkpoint retrained in place after the snapshot: same --model DIR, same config, other weights."""
    ckpt = save_checkpoint(tiny, tmp_path / "ckpt")
    rc = main(["run", str(clip), "--model", str(ckpt), "--fps", "4", "--max-new-tokens", "4", "--ask", "1:What is red?",
               "--until", "1", "--session", "w", "--snapshot", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["turns"]

    with_weights_changed(load(str(ckpt), device="cpu", dtype="float32").model).save_pretrained(ckpt)
    for argv in (["resume", "w"], ["replay", "w"]):
        rc = main(argv)
        out, err = capsys.readouterr()
        error = err.splitlines()[-1]  # before it, transformers' "Loading weights" bar for a checkpoint directory
        assert rc == 2 and out == "" and error.startswith("streamchat: error: "), (argv, rc, err)
        assert "Traceback" not in err and f"other weights or architecture of {ckpt}" in error.replace("model ", ""), err


# --- records made before weights were fingerprinted ----------------------------------------------------


def test_the_legacy_fingerprint_is_what_streamchat_recorded_before(tiny):
    """Pinned from the code before this change (commit 1c5e71a: `load("tiny-random", device="cpu",
    dtype="float32").fingerprint`, the config hash alone)."""
    assert tiny.legacy_fingerprint == "50b3f1238f3395f2" != tiny.fingerprint


def test_a_snapshot_from_before_restores_with_a_warning_and_another_one_is_refused(tiny, clip, tmp_path):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=8).validate()
    stream = Stream(tiny, VideoSource(clip, config.sampling), config)
    stream.encode_until(stream.frames_at(1.0))
    written = snapshots.save(stream, tmp_path / "snapshot-1.safetensors", video_path=str(clip), video_sha256=sha256_file(clip))
    # the model now loaded fingerprints weights; the snapshot's fingerprint is what the old code recorded for it
    now = dataclasses.replace(tiny, fingerprint="f" * 16, legacy_fingerprint=tiny.fingerprint)
    target = Stream(now, VideoSource(clip, config.sampling), config)
    snap = snapshots.load(written.path, target)
    assert target.engine.cache_tokens == stream.engine.cache_tokens
    assert snap.legacy and "made before streamchat fingerprinted weights" in snap.version_warnings()[0]
    other = dataclasses.replace(tiny, fingerprint="f" * 16, legacy_fingerprint="e" * 16)
    with pytest.raises(SnapshotError, match="other weights or architecture"):
        snapshots.load(written.path, Stream(other, VideoSource(clip, config.sampling), config))
