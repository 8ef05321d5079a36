"""Loading the model and processor, preprocessing frames, and reaching into the model's parts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


TRANSFORMERS_PINNED = "5.17.0"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def quiet() -> None:
    """Silence transformers' warnings (the CLI's stderr is for one-line errors and the progress bar)."""
    from transformers.utils import logging

    logging.set_verbosity_error()


# --- loading ------------------------------------------------------------------------------------


def load_pretrained(source: str, *, dtype: torch.dtype, device_map: Any, local_only: bool, **kwargs):
    """Load the real model class and processor from a hub id or a local directory (`kwargs`: more
    from_pretrained arguments, such as offload_folder for a device map with "disk" parts)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        source, dtype=dtype, device_map=device_map, local_files_only=local_only, attn_implementation="sdpa", **kwargs
    )
    processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    return model, processor


def build_from_config(config, *, dtype: torch.dtype, device: str):
    """A model of `config`'s architecture with random weights (for `random:<arch>`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def new_model(config):
    """A freshly initialised model of `config` (default init, float32, CPU)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(config)


def tokenizer_from_dir(path: str):
    """Qwen2's tokenizer class over a local tokenizer.json (5.x: one class, no slow/fast split)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(path)


def qwen25vl_config(**kwargs):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**kwargs)


def default_processor(tokenizer, chat_template: str | None = None):
    """transformers' Qwen2.5-VL processor around `tokenizer`, with the stock image/video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=chat_template,
    )


# --- preprocessing ------------------------------------------------------------------------------


def video_pixels(processor, frames: np.ndarray | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and patchify already-resized uint8 frames [N, H, W, 3] (numpy or a torch tensor) with
    the real video processor, on `device` if given (training patchifies on its GPU).

    Returns pixel_values [N/2 * gh * gw, C*2*14*14] (float32) and grid_thw [1, 3].
    """
    # as a channels-first tensor: the processor's own pixels, 6x faster than from a numpy array
    # (tests/test_equivalence.py compares with the processor given the numpy frames)
    if not isinstance(frames, torch.Tensor):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    video = frames.permute(0, 3, 1, 2)
    out = processor.video_processor(
        videos=[video],
        do_resize=False,  # streamchat resized the frames; both modes see the same pixels
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        return_tensors="pt",
        device=None if device is None else str(device),
    )
    return out["pixel_values_videos"], out["video_grid_thw"]


def processor_prompt_ids(processor, text: str, videos: list[np.ndarray], fps: float) -> dict:
    """The processor's own output for a rendered prompt and its videos (to check streamchat's layout)."""
    return processor(
        text=[text],
        videos=videos,
        videos_kwargs=dict(fps=fps, do_sample_frames=False, do_resize=False, cap_pixels_per_frame=False),
        return_tensors="pt",
    )


def text_config(model):
    return model.config.text_config


def vision_config(model):
    return model.config.vision_config


# --- submodules (parameter counts for the benchmark's floors) ------------------------------------


def language_model(model):
    """The text decoder: embeddings and layers, no lm_head (5.x: `model.model.language_model`)."""
    return model.model.language_model


def vision_tower(model):
    """The vision transformer with its patch embedding and merger (5.x: `model.model.visual`)."""
    return model.model.visual
