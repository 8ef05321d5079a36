"""What must fit in the model's context, checked once the model is loaded and before any frame is encoded."""

from __future__ import annotations

from . import hf
from .config import SessionConfig
from .layout import Vocab
from .errors import UserError
from .models import Loaded


def model_context(loaded: Loaded) -> int:
    """Positions the language model takes (max_position_embeddings), as the engine reads it."""
    return int(getattr(hf.text_config(loaded.model), "max_position_embeddings", 32768))


def shortest_prompt(loaded: Loaded, config: SessionConfig, pair_tokens: int = 0) -> int:
    """Tokens of the smallest prompt a question can have: the chat template around one frame pair
    (`pair_tokens` long) and a one-token question."""
    v = Vocab(loaded.tokenizer, config.system_prompt)
    template = v.head + v.user_open + [v.vision_start, v.vision_end] + v.turn_end + v.assistant_open
    return len(template) + pair_tokens + 1


def pair_tokens(loaded: Loaded, resized_height: int, resized_width: int) -> int:
    """Cache tokens one temporal patch (two frames) of this resized size takes."""
    vc = hf.vision_config(loaded.model)
    unit = vc.patch_size * vc.spatial_merge_size
    return (resized_height // unit) * (resized_width // unit)


def check_max_new_tokens(loaded: Loaded, config: SessionConfig, pair_tokens: int = 0) -> None:
    """Refuse, before any work, a --max-new-tokens that cannot fit in the context beside the shortest
    prompt: otherwise every question would fail only after the video was encoded."""
    context = model_context(loaded)
    room = context - shortest_prompt(loaded, config, pair_tokens)
    if config.max_new_tokens > room:
        raise UserError(
            f"--max-new-tokens {config.max_new_tokens} does not fit: {loaded.model_id} has a context of "
            f"{context} tokens and the shortest prompt (one frame pair and a question) takes "
            f"{context - room}; use --max-new-tokens {max(room, 1)} or less"
        )
