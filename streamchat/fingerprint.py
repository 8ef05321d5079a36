"""What identifies a model: its architecture (the config) and its weights, hashed into one short
fingerprint that snapshots and session rows carry, so a cache is only reused by the model that made it."""

from __future__ import annotations

import hashlib
import json

import torch

from . import hf

SAMPLE = 4096  # evenly spaced elements per parameter: enough to see any whole-tensor change
ENDS = 64  # plus the first and last ones: a bias or norm edited at its ends shows too
# where the model was loaded from and in which dtype: not part of the architecture (sub-configs carry them too)
VOLATILE = ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation")


def config_fingerprint(config) -> str:
    """sha256 of the architecture (the config without VOLATILE keys, at any depth), 16 hex digits."""
    return _digest(_architecture(_as_dict(config)))


def legacy_fingerprint(config) -> str:
    """The fingerprint snapshots and session rows carried before weights were fingerprinted (streamchat
    before 2026-12-02): sha256 of the config without the top-level VOLATILE keys. Such a record can
    only be checked against the architecture; restore and replay accept it with a warning."""
    return _digest({k: v for k, v in _as_dict(config).items() if k not in VOLATILE})


LEGACY_WARNING = ("{what} was made before streamchat fingerprinted weights: only the architecture of {model} could be "
                  "checked, not that its weights are the ones loaded now")


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _architecture(value):
    if isinstance(value, dict):
        return {k: _architecture(v) for k, v in value.items() if k not in VOLATILE}
    return value


def sample_index(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The flat positions sampled from a tensor of `numel` elements, sorted and unique: up to SAMPLE
    evenly spaced ones plus the first and last ENDS (every one when the tensor is small)."""
    k = min(SAMPLE, numel)
    spaced = torch.arange(k, dtype=torch.int64, device=device) * numel // k
    first = torch.arange(min(ENDS, numel), dtype=torch.int64, device=device)
    return torch.unique(torch.cat([first, spaced, numel - 1 - first]))


def weights_digest(model) -> str:
    """sha256 over every parameter in name order (tied ones under each of their names): its name, its
    shape and a strided sample of its values (sample_index), gathered on the parameter's own device in
    one indexing op and cast to bfloat16. So the same weights loaded in float32 or bfloat16, on the CPU
    or a GPU, on one device or spread by a device map, give the same digest (float16 too for a bfloat16
    checkpoint, whose values it holds exactly; float32 weights may round differently through it), and
    loading a 7B model costs a few hundred small gathers, not a pass over every byte (a change that
    spares every sampled element goes unseen; training or another checkpoint never does that).

    Parameters accelerate offloaded (the "cpu"/"disk" parts of a device map read `meta`) are sampled
    from where their hooks load them (once, as one forward would); an offloaded parameter whose values
    cannot be found there contributes its name and shape only."""
    digest = hashlib.sha256()
    for name, weight in sorted(hf.named_weights(model), key=lambda item: item[0]):
        digest.update(f"{name}\0{tuple(weight.shape)}\0".encode())
        if weight.device.type == "meta":
            continue
        with torch.no_grad():
            flat = weight.detach().reshape(-1)  # a view for every parameter (they are contiguous)
            values = flat[sample_index(flat.numel(), flat.device)].to(torch.bfloat16).cpu()
        digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """The architecture and the weights in 16 hex digits: what a snapshot and a session row record."""
    both = f"{config_fingerprint(model.config)}:{weights_digest(model)}".encode()
    return hashlib.sha256(both).hexdigest()[:16]
