"""Model loading: a hub id, a local directory, `tiny-shapes`, `tiny-random` or `random:<arch>`; device and dtype."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hf
from .errors import UserError
from .fingerprint import legacy_fingerprint, model_fingerprint

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
TINY = "tiny-random"
TINY_SHAPES = "tiny-shapes"  # the trained toy checkpoint inside the package (its README.md is the model card)
BUILT_IN = (TINY_SHAPES, TINY)  # models that need no download


def checkpoint_source(model_id: str) -> str:
    """What a checkpoint model id loads from: tiny-shapes' directory inside the package (loaded as any
    user's local checkpoint is), else the id itself (a hub id or a local directory)."""
    if model_id == TINY_SHAPES:
        return str(Path(__file__).parent / "checkpoints" / TINY_SHAPES)
    return model_id


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


def _qwen25vl_variant(text: dict, vision: dict, tie: bool) -> dict:
    """The 3B dict with the fields that differ in a larger published checkpoint replaced."""
    import copy

    arch = copy.deepcopy(QWEN25VL_3B)
    arch["text_config"].update(text, tie_word_embeddings=tie)
    arch["vision_config"].update(vision)
    arch["tie_word_embeddings"] = tie
    return arch


# The larger published architectures: only the fields below differ from the 3B (token ids, rope_theta 1e6,
# mrope_section [16, 24, 24], rms_norm_eps 1e-6, max_position_embeddings 128000, and the vision tower's
# depth 32 / hidden 1280 / 16 heads / patch 14 / window 112 / full attention at [7, 15, 23, 31] are shared).
# Where each number comes from: docs/models.md. out_hidden_size is the text hidden size in every one.
QWEN25VL_7B = _qwen25vl_variant(
    dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
         num_key_value_heads=4),
    dict(out_hidden_size=3584),  # vision MLP 3420 wide, as in the 3B
    tie=False,
)
QWEN25VL_32B = _qwen25vl_variant(
    dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
         num_key_value_heads=8),
    dict(out_hidden_size=5120, intermediate_size=3456),  # 32B and 72B: vision MLP 3456 wide (3B, 7B: 3420)
    tie=False,
)
QWEN25VL_72B = _qwen25vl_variant(
    dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
         num_key_value_heads=8),
    dict(out_hidden_size=8192, intermediate_size=3456),
    tie=False,
)
RANDOM_ARCHS = {"qwen2.5-vl-3b": QWEN25VL_3B, "qwen2.5-vl-7b": QWEN25VL_7B, "qwen2.5-vl-32b": QWEN25VL_32B,
                "qwen2.5-vl-72b": QWEN25VL_72B}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Loaded:
    """A model with its processor and what identifies it."""

    model: object
    processor: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # the config and a sample of the weights (fingerprint.py): a snapshot restores only into the same model
    devices: tuple = ()  # every device the model computes on, `device` (where inputs go) first
    legacy_fingerprint: str = ""  # what records made before weights were fingerprinted carry (fingerprint.py)

    def __post_init__(self):
        if not self.devices:
            self.devices = (self.device,)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def split(self) -> bool:
        """True when accelerate spread the model over several devices (--device-map)."""
        return hf.is_split(self.model)


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


def load(model_id: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
         device_map: str | dict | None = None, main_device: str | None = None) -> Loaded:
    """Load `model_id`; bad ids, missing weights and an unreachable hub become one-line UserErrors.

    `device_map` ("auto", "balanced" or {module: device}) spreads the model over devices through
    accelerate instead of `device`; `main_device` is accelerate's main device for tiny-random and
    random:<arch> ("cpu" makes the map's "cpu" parts compute on the CPU, not offloaded)."""
    if device_map is not None:
        if device not in (None, "auto"):
            raise UserError(f"give --device or --device-map, not both (got --device {device})")
        return _load_on_map(model_id, device_map, main_device, dtype)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if model_id == TINY:
        from .tiny import build_tiny

        model, processor = build_tiny()
        model = model.to(device=dev, dtype=dt)
    elif model_id.startswith("random:"):
        config = random_config(model_id)
        torch.manual_seed(0)
        model = hf.build_from_config(config, dtype=dt, device=dev)
        processor = _random_processor()
    else:
        model, processor = _load_real(checkpoint_source(model_id), dev, dt)
    model.eval()
    fingerprint = model_fingerprint(model)  # before speed_up, which pads and fuses weights
    if dev.startswith("cuda") and not hf.is_split(model):
        hf.speed_up(model)  # the same function in faster kernels: vision MLP 3420 -> 3456 wide, fused norms
    devices = tuple(hf.model_devices(model)) if hf.is_split(model) else (torch.device(dev),)  # several GPUs: "auto"
    return Loaded(model, processor, model_id, devices[0], dt, fingerprint, devices, legacy_fingerprint(model.config))


def random_config(model_id: str):
    """The transformers config of `random:<arch>` (no weights are made)."""
    arch = model_id.split(":", 1)[1]
    if arch not in RANDOM_ARCHS:
        known = ", ".join(f"random:{a}" for a in RANDOM_ARCHS)
        raise UserError(f"unknown architecture {arch!r} in --model {model_id}; known: {known}")
    config = hf.qwen25vl_config(**RANDOM_ARCHS[arch])
    config.name_or_path = model_id
    return config


def _random_processor():
    from .tiny import CHAT_TEMPLATE, build_tokenizer

    with tempfile.TemporaryDirectory(prefix="streamchat-tok-") as tmp:
        tokenizer = build_tokenizer(Path(tmp), qwen_ids=True)
    return hf.default_processor(tokenizer, CHAT_TEMPLATE)


def parse_device_map(value: str | None) -> tuple[str | dict | None, str | None]:
    """--device-map: "auto", "balanced" or a JSON file, either {module: device} or
    {"device_map": {module: device}, "main_device": "cpu"}. Returns (map, main_device)."""
    if value is None or value in ("auto", "balanced"):
        return value, None
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--device-map {value}: not 'auto', 'balanced' or an existing JSON file of {{module: device}}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--device-map {value}: not valid JSON ({_first_line(exc)}); write {{\"module name\": \"cuda:0\", ...}}") from exc
    if isinstance(doc, dict) and isinstance(doc.get("device_map"), dict):
        main = doc.get("main_device")
        if main is not None and not isinstance(main, (str, int)):
            raise UserError(f"--device-map {value}: main_device must be a device such as \"cpu\" or \"cuda:0\"")
        doc, main = doc["device_map"], main
    else:
        main = None
    if not isinstance(doc, dict) or not doc or not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in doc.items()):
        raise UserError(f"--device-map {value}: must map module names to devices, e.g. {{\"model.visual\": \"cuda:0\", \"lm_head\": 1}}")
    return doc, main


_OFFLOAD_DIRS: list[str] = []


def _offload_dir(device_map) -> str | None:
    """A temporary folder for accelerate's "disk" parts (removed when the process ends)."""
    if not isinstance(device_map, dict) or "disk" not in device_map.values():
        return None
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="streamchat-offload-")
    if not _OFFLOAD_DIRS:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _OFFLOAD_DIRS])
    _OFFLOAD_DIRS.append(path)
    return path


def _load_on_map(model_id: str, device_map: str | dict, main_device, dtype: str | None) -> Loaded:
    uses_gpu = (isinstance(device_map, str) and torch.cuda.is_available()) or (
        isinstance(device_map, dict) and any(isinstance(v, int) or str(v).startswith("cuda") for v in device_map.values()))
    if uses_gpu and not torch.cuda.is_available():
        raise UserError("--device-map names a CUDA device, but no CUDA GPU is visible; map to cpu (or disk)")
    dt = pick_dtype(dtype, "cuda" if uses_gpu else "cpu")
    offload = _offload_dir(device_map)
    try:
        if model_id == TINY:
            from .tiny import build_tiny

            model, processor = build_tiny()
            model = model.to(dtype=dt)
            hf.dispatch(model, hf.resolve_map(model, device_map), offload, main_device)
        elif model_id.startswith("random:"):
            config = random_config(model_id)
            torch.manual_seed(0)
            model = hf.build_on_map(config, dtype=dt, device_map=device_map, offload_dir=offload, main_device=main_device)
            processor = _random_processor()
        else:
            if main_device is not None:
                raise UserError("--device-map: main_device applies to tiny-random and random:<arch> models; "
                                "for a checkpoint leave it out (accelerate runs cpu/disk parts on the first GPU)")
            model, processor = _load_real(checkpoint_source(model_id), None, dt, device_map=device_map, offload_folder=offload)
    except ValueError as exc:
        raise UserError(f"--device-map: {_first_line(exc)}") from exc
    model.eval()
    fingerprint = model_fingerprint(model)  # before speed_up, which pads and fuses weights
    devices = tuple(hf.model_devices(model))
    if devices[0].type == "cuda" and not hf.is_split(model):
        hf.speed_up(model)
    return Loaded(model, processor, model_id, devices[0], dt, fingerprint, devices, legacy_fingerprint(model.config))


def _load_real(model_id: str, dev: str | None, dt: torch.dtype, device_map=None, offload_folder: str | None = None):
    path = Path(model_id).expanduser()
    looks_local = path.exists() or model_id.startswith((".", "/", "~"))
    if looks_local:
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(
                f"--model {model_id}: not a model directory (no config.json); pass a Hugging Face id, "
                "a local checkpoint directory, or --model tiny-shapes / tiny-random"
            )
    if device_map is None:  # several GPUs: let accelerate spread the layers when one card is not enough
        device_map = "auto" if dev == "cuda" and torch.cuda.device_count() > 1 else dev
    extra = {"offload_folder": offload_folder} if offload_folder else {}
    try:
        return hf.load_pretrained(str(path) if looks_local else model_id, dtype=dt, device_map=device_map, local_only=looks_local or _offline(), **extra)
    except OSError as exc:
        if looks_local:
            raise UserError(f"--model {model_id}: could not load the checkpoint ({_first_line(exc)})") from exc
        try:  # a hub id already in the local cache loads without the network
            return hf.load_pretrained(model_id, dtype=dt, device_map=device_map, local_only=True, **extra)
        except OSError:
            pass
        raise UserError(
            f"could not fetch {model_id} from the Hugging Face hub (no network, or no such model): "
            "use --model tiny-shapes or tiny-random to try streamchat offline, or pass a local checkpoint directory"
        ) from exc


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
