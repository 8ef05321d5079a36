"""The built-in `tiny-random` model: a small, deterministic Qwen2.5-VL built in-process, no download.

The tokenizer is a byte-level BPE trained on a few sentences, with Qwen's special tokens; the chat
template mirrors Qwen2.5-VL's; the processor is transformers' real Qwen2.5-VL processor. Weights are
random (seeded), with `lm_head` scaled so that greedy argmax is decisive.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same shape as Qwen2.5-VL's own template for a system prompt, user turns holding videos or text,
# and assistant turns; enough for `apply_chat_template` to render what streamchat prefills.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant.",
    "What is happening in the video?",
    "What color is the square? The square is red and it moves to the right.",
    "A green disc bounces across the frame while a blue bar appears.",
    "Describe the scene in one sentence.",
    "How many objects can you see? I can see three objects.",
    "The camera is still; the objects move from left to right.",
    "Summarize what happened so far in the clip.",
    "Is there anything blue? Yes, a blue bar appears in the second half.",
    "Where is the red square now? It is near the top of the frame.",
    "user assistant system video frame time second answer question",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 seconds minutes",
]

VOCAB_SIZE = 384
SEED = 0


# Qwen2.5-VL's real special-token ids, for `random:qwen2.5-vl-3b` (vocab 151936).
QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def build_tokenizer(out_dir: Path, qwen_ids: bool = False, corpus: list[str] = CORPUS, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE with Qwen's pre-tokenizer and special tokens, saved to out_dir and loaded back.

    With qwen_ids the special tokens get Qwen2.5-VL's real ids (unused ids are filler tokens that the
    merges never produce), so a model with the real vocabulary size can be driven by it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from . import hf

    pretokenize = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )

    def configure(tok):
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pretokenize), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    tok = configure(Tokenizer(models.BPE(unk_token=None)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if qwen_ids:
        trained = json.loads(tok.to_str())["model"]
        n_special = len(SPECIAL_TOKENS)
        vocab = {t: i - n_special for t, i in trained["vocab"].items() if t not in SPECIAL_TOKENS}
        first_special = min(QWEN_SPECIAL_IDS.values())
        for i in range(len(vocab), first_special):
            vocab[f"<|filler_{i}|>"] = i
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        tok = configure(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None)))
        for token, idx in sorted(QWEN_SPECIAL_IDS.items(), key=lambda kv: kv[1]):
            while tok.get_vocab_size(with_added_tokens=True) < idx:
                filler = tok.get_vocab_size(with_added_tokens=True)
                tok.add_special_tokens([AddedToken(f"<|reserved_{filler}|>", special=True)])
            tok.add_special_tokens([AddedToken(token, special=True)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "unk_token": None,
                "model_max_length": 131072 if qwen_ids else 32768,
                "extra_special_tokens": SPECIAL_TOKENS[1:],
            }
        )
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer = hf.tokenizer_from_dir(str(out_dir))
    if qwen_ids:
        for token, idx in QWEN_SPECIAL_IDS.items():
            assert tokenizer.convert_tokens_to_ids(token) == idx, (token, idx)
    return tokenizer


TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, fullatt_block_indexes=[1],
              patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
              tokens_per_second=2)  # tokens_per_second: the value in the real Qwen2.5-VL checkpoints


def toy_config(tokenizer, text: dict, vision: dict):
    """A Qwen2.5-VL config for a toy model over `tokenizer` (its size and special-token ids, untied head)."""
    from . import hf

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    special = dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                   tie_word_embeddings=False)
    return hf.qwen25vl_config(
        text_config=dict(text, vocab_size=len(tokenizer), **special),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special,
    )


def build_tiny():
    """Return (model, processor) for `tiny-random`: float32, on the CPU, same weights every call."""
    import torch

    from . import hf

    with tempfile.TemporaryDirectory(prefix="streamchat-tiny-") as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    config = toy_config(tokenizer, TEXT, VISION)
    config.name_or_path = "tiny-random"
    fork_devices = []  # keep the global RNG untouched for callers
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(SEED)
        model = hf.new_model(config)
        with torch.no_grad():
            # random init gives nearly flat logits; scaling makes greedy argmax decisive
            model.lm_head.weight.mul_(50.0)
    model.eval()
    processor = hf.default_processor(tokenizer, CHAT_TEMPLATE)
    return model, processor
