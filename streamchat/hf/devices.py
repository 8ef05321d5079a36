"""Models spread over several devices by accelerate's `device_map`: resolving a map, building or
dispatching a model on it, and where each part of a dispatched model runs.

A part runs on its hook's execution device, which is not always where its weights rest: accelerate
keeps "cpu" and "disk" parts' weights off the main device (their parameters read `meta`) and runs
them on the main device, loading the weights per forward. So every placement question here asks the
hooks first and the parameters second, never `model.device` (the first parameter's device, `meta`
for an offloaded vision tower).
"""

from __future__ import annotations

from typing import Any

import torch

OFFLOADED = ("cpu", "disk")


def is_split(model) -> bool:
    """True when accelerate placed the model's parts on more than one device (hooks move the data)."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1


def _as_device(dev: Any) -> torch.device:
    return torch.device(f"cuda:{dev}") if isinstance(dev, int) else torch.device(dev)


def execution_device(module) -> torch.device:
    """Where `module` computes: its own hook's execution device, else its first tensor's device (if
    not meta), else the execution device of a descendant's hook (an offloaded block hooks each leaf)."""
    for m in module.modules():
        for h in _hooks(m):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return _as_device(dev)
        if m is module:
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if t.device.type != "meta":
                    return t.device
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    raise RuntimeError(f"{type(module).__name__} has no weights on a device and no accelerate hook")


def input_device(model) -> torch.device:
    """Where token ids go in: the input embeddings' device."""
    return execution_device(model.model.language_model.embed_tokens)


def vision_device(model) -> torch.device:
    """Where the vision tower runs (pixels go there)."""
    return execution_device(model.model.visual)


def model_devices(model) -> list[torch.device]:
    """Every device the model computes on, the input device first (what timing syncs and what memory
    figures cover)."""
    if not is_split(model):
        return [input_device(model)]
    from .cache import layer_devices

    out: list[torch.device] = []
    for dev in [input_device(model), vision_device(model), *layer_devices(model), execution_device(model.lm_head)]:
        if dev not in out:
            out.append(dev)
    return out


def _hooks(module):
    hook = getattr(module, "_hf_hook", None)
    return getattr(hook, "hooks", None) or ([hook] if hook is not None else [])


def named_weights(model):
    """Every parameter by its full name (tied ones under each name) with the tensor that holds its
    values: the parameter itself, or for a part accelerate offloaded (the parameter reads `meta`) the
    tensor its hook loads before each forward, from CPU memory or the offload folder. Where no hook
    holds it, the `meta` parameter itself (its shape, no values)."""
    stores = []  # accelerate's OffloadedWeightsLoader(s), keyed by full parameter names
    for m in model.modules():
        for h in _hooks(m):
            wm = getattr(h, "weights_map", None)
            store = getattr(wm, "dataset", wm)  # a PrefixedDataset over the loader
            if store is not None and all(store is not s for s in stores):
                stores.append(store)
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.device.type == "meta":
            for store in stores:
                try:
                    param = store[name]
                    break
                except KeyError:
                    continue
        yield name, param


def resolve_map(model, device_map: str | dict, max_memory: dict | None = None) -> dict:
    """A concrete {module name: device} for `model` (built on `meta`): "auto" and "balanced" as
    transformers resolves them (weights balanced over the visible GPUs, whole decoder layers), a dict
    checked to name modules of the model and to cover every weight. ValueError says what is wrong."""
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced"):
            raise ValueError(f"device map {device_map!r} is not 'auto', 'balanced' or a {{module: device}} map")
        from transformers.integrations.accelerate import _get_device_map

        return dict(_get_device_map(model, device_map, max_memory, None))
    names = {name for name, _ in model.named_modules()}
    for name, dev in device_map.items():
        if name not in names:
            raise ValueError(f"{name!r} is not a module of this model (names look like model.visual, "
                             "model.language_model.layers.0, lm_head)")
        if not isinstance(dev, int) and dev not in OFFLOADED:
            try:
                d = torch.device(dev)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"{dev!r} (for {name}) is not a device: use cpu, disk, cuda:N or N") from exc
            if d.type not in ("cpu", "cuda"):
                raise ValueError(f"{dev!r} (for {name}) is not a device streamchat can run on: use cpu, disk, cuda:N or N")
        if (isinstance(dev, int) or str(dev).startswith("cuda")) and _as_device(dev).index is not None \
                and _as_device(dev).index >= torch.cuda.device_count():
            raise ValueError(f"{dev!r} (for {name}) is not a visible GPU ({torch.cuda.device_count()} visible)")
    from accelerate.utils import check_device_map

    check_device_map(model, device_map)  # every weight has a device
    return dict(device_map)


def dispatch(model, device_map: dict, offload_dir: str | None = None, main_device: Any = None):
    """Place `model`'s parts by `device_map` (accelerate's hooks move activations between devices;
    "cpu"/"disk" parts are offloaded to the main device's computation unless `main_device` is "cpu",
    in which case "cpu" parts compute on the CPU). `past_key_values` is never moved: each layer's
    cache stays where the engine put it, on that layer's device."""
    import logging

    from accelerate import dispatch_model

    log = logging.getLogger("accelerate.big_modeling")  # "Some parameters are on the meta device": stderr is for our errors
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        dispatch_model(model, device_map=device_map, main_device=main_device, offload_dir=offload_dir,
                       skip_keys=sorted(model._skip_keys_device_placement or ["past_key_values"]))
    finally:
        log.setLevel(level)
    model.hf_device_map = dict(device_map)
    return model


def build_on_map(config, *, dtype: torch.dtype, device_map: str | dict, offload_dir: str | None = None,
                 main_device: Any = None, max_memory: dict | None = None):
    """A model of `config`'s architecture with random weights, each part created on its device of
    the map (a 72B model never exists whole in host memory), then dispatched."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    dmap = resolve_map(model, device_map, max_memory)
    with torch.no_grad():
        for name, dev in dmap.items():
            part = model.get_submodule(name) if name else model
            part.to_empty(device="cpu" if dev in OFFLOADED else _as_device(dev))
            part.apply(model._init_weights)  # transformers' init, rotary inv_freq buffers included
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return dispatch(model.eval(), dmap, offload_dir, main_device)
