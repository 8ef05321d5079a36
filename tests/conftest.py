"""Shared fixtures: an isolated STREAMCHAT_HOME, the tiny-random model, small generated clips."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def streamchat_home(tmp_path, monkeypatch):
    """Every test gets its own store; no test touches ./sessions or the network."""
    home = tmp_path / "home"
    monkeypatch.setenv("STREAMCHAT_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """The CPU suite stays on the CPU on a GPU host: `--device auto` (the CLI's default) and a load
    without a device mean cpu here, so float32 comparisons keep their tolerances. `@pytest.mark.gpu`
    tests keep the real choice."""
    if request.node.get_closest_marker("gpu") is not None:
        return
    import streamchat.models

    pick = streamchat.models.pick_device
    monkeypatch.setattr(streamchat.models, "pick_device", lambda device: pick("cpu" if device in (None, "auto") else device))


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny-random Qwen2.5-VL (float32, CPU), loaded once."""
    from streamchat.models import load

    return load("tiny-random", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def clip_24fps(tmp_path_factory):
    """3 s at 24 fps, 112x112: 72 frames."""
    from streamchat.clips import make_clip

    return make_clip(tmp_path_factory.mktemp("clips") / "clip24.mp4", seconds=3.0, fps=24.0, width=112, height=112)


@pytest.fixture(scope="session")
def clip_long(tmp_path_factory):
    """12 s at 8 fps, 112x112: at 2 fps, 24 frames whose temporal extent exceeds the spatial one."""
    from streamchat.clips import make_clip

    return make_clip(tmp_path_factory.mktemp("clips") / "clip_long.mp4", seconds=12.0, fps=8.0, width=112, height=112)
