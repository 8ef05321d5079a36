"""Model loading: a hub id, a local directory, `tiny-random` or `random:<arch>`; device and dtype."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hf
from .errors import UserError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
TINY = "tiny-random"

# The real Qwen2.5-VL-3B-Instruct architecture (qwen25vl.md), for speed and memory work without weights.
QWEN25VL_3B = dict(
    text_config=dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
        bos_token_id=None,
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    ),
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    eos_token_id=151645,
    pad_token_id=151643,
    bos_token_id=None,
    tie_word_embeddings=True,
)
RANDOM_ARCHS = {"qwen2.5-vl-3b": QWEN25VL_3B}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Loaded:
    """A model with its processor and what identifies it."""

    model: object
    processor: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # sha256 of the config: a snapshot only restores into the same architecture

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def pick_device(device: str | None) -> str:
    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype and dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def config_fingerprint(config) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation"):
        d.pop(key, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load(model_id: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None) -> Loaded:
    """Load `model_id`; bad ids, missing weights and an unreachable hub become one-line UserErrors."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if model_id == TINY:
        from .tiny import build_tiny

        model, processor = build_tiny()
        model = model.to(device=dev, dtype=dt)
    elif model_id.startswith("random:"):
        arch = model_id.split(":", 1)[1]
        if arch not in RANDOM_ARCHS:
            raise UserError(f"unknown architecture {arch!r} in --model {model_id}; known: random:qwen2.5-vl-3b")
        from .tiny import CHAT_TEMPLATE, build_tokenizer

        config = hf.qwen25vl_config(**RANDOM_ARCHS[arch])
        config.name_or_path = model_id
        torch.manual_seed(0)
        model = hf.build_from_config(config, dtype=dt, device=dev)
        with tempfile.TemporaryDirectory(prefix="streamchat-tok-") as tmp:
            tokenizer = build_tokenizer(Path(tmp), qwen_ids=True)
        processor = hf.default_processor(tokenizer, CHAT_TEMPLATE)
    else:
        model, processor = _load_real(model_id, dev, dt)
    model.eval()
    if dev.startswith("cuda") and len(set((getattr(model, "hf_device_map", None) or {}).values())) <= 1:
        hf.speed_up(model)  # the same function in faster kernels: vision MLP 3420 -> 3456 wide, fused norms
    return Loaded(model, processor, model_id, torch.device(dev), dt, config_fingerprint(model.config))


def _load_real(model_id: str, dev: str, dt: torch.dtype):
    path = Path(model_id).expanduser()
    looks_local = path.exists() or model_id.startswith((".", "/", "~"))
    if looks_local:
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(
                f"--model {model_id}: not a model directory (no config.json); pass a Hugging Face id, "
                "a local checkpoint directory, or --model tiny-random"
            )
    # several GPUs: let accelerate spread the layers when one card is not enough
    device_map = "auto" if dev == "cuda" and torch.cuda.device_count() > 1 else dev
    try:
        return hf.load_pretrained(str(path) if looks_local else model_id, dtype=dt, device_map=device_map, local_only=looks_local or _offline())
    except OSError as exc:
        if looks_local:
            raise UserError(f"--model {model_id}: could not load the checkpoint ({_first_line(exc)})") from exc
        try:  # a hub id already in the local cache loads without the network
            return hf.load_pretrained(model_id, dtype=dt, device_map=device_map, local_only=True)
        except OSError:
            pass
        raise UserError(
            f"could not fetch {model_id} from the Hugging Face hub (no network, or no such model): "
            "use --model tiny-random to try streamchat offline, or pass a local checkpoint directory"
        ) from exc


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
