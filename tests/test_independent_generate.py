"""A client nobody here wrote: stock `model.generate(**processor(...))` against streamchat's streaming answer.

transformers 5.17 computes its own M-RoPE positions in `generate`, and they follow Qwen's reference
rule only under two conditions (qwen25vl.md): the text after a video resumes at s + max(H, W), which
is the reference's max + 1 only while the video's temporal extent stays within its spatial one; and
`second_per_grid_t` is truncated to an integer, which keeps the reference's temporal positions only
when 2 / fps is a whole number or every temporal patch falls before the first position step. The clips
below meet both (12 or 11 frames at 24 fps: 6 patches at 1/6 of a position each, all at t = s; 4
frames at 2 fps: t = s, s + 2 on a 4x4 grid), and each test checks that the condition holds before
it compares: transformers' own position ids must equal the independent reference.

Then stock attention (sdpa), the stock DynamicCache, greedy `generate`, float32 on the CPU, must give
streamchat's streaming answer token for token, and the same first-step logits (within 1e-4).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from streamchat.config import SessionConfig
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

from reference_qwen import processor_inputs, reference_positions, user

MAX_NEW = 12


@pytest.mark.parametrize(
    "clip,fps,frames",
    [("clip_24fps", 24.0, 12), ("clip_24fps", 24.0, 11), ("clip_long", 2.0, 4)],
    ids=["24fps-12-frames", "24fps-11-frames-padded", "2fps-4-frames"],
)
def test_streaming_answer_equals_stock_generate(tiny, request, clip, fps, frames):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=fps, max_frames=frames), chunk_frames=4,
                           max_new_tokens=MAX_NEW)
    stream = Stream(tiny, VideoSource(request.getfixturevalue(clip), config.sampling), config)
    stream.encode_until(stream.total_frames)
    q = "What is moving?"
    ans = stream.engine.ask(q)
    assert stream.engine.chunks_encoded == -(-frames // 4)

    processor, model = tiny.processor, tiny.model
    video = stream.source.read(0, frames)
    inputs = processor_inputs(processor, [user(q, True)], [video], fps)

    # the condition: transformers' own positions for this prompt are the reference rule's
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids, grids = inputs["input_ids"][0].tolist(), inputs["video_grid_thw"].tolist()
    reference = reference_positions(ids, grids, [2 / Fraction(fps)], video_pad=pad)
    model.model.rope_deltas = None
    theirs, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
                                           second_per_grid_ts=inputs["second_per_grid_ts"])
    assert torch.equal(theirs[:, 0], reference), "transformers' position rule parts from the reference here"

    model.set_attn_implementation("sdpa")  # stock attention, text and vision
    assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos[1],
                         return_dict_in_generate=True, output_logits=True)
    assert type(out.past_key_values) is DynamicCache
    assert all(type(layer) is DynamicLayer for layer in out.past_key_values.layers)  # not streamchat's cache
    stock = out.sequences[0, len(ids):].tolist()
    assert len(stock) >= 2
    assert ans.token_ids == stock
    # and the first step's logits agree, so a prompt change that happens not to flip tiny-random's
    # decisive argmax still fails here
    assert float((ans.first_logits - out.logits[0][0].float()).abs().max()) <= 1e-4
