"""Models spread over devices by accelerate's device_map, and the published larger architectures.

On the CPU the split that runs is accelerate's offload: a tiny-random model whose vision tower, one
decoder layer and the head live on disk and the rest in host memory, all computing on the CPU through
accelerate's hooks (the parameters of the offloaded parts read `meta`). That runs every path that
differs for a split model: hooks move activations, placement comes from the hooks and not from
`model.device`, graphs fall back to eager, each layer's KV goes where its layer computes. Layers that
really compute on two devices (cuda:0 and the CPU, or two GPUs) need a GPU: those tests skip here.
"""

from __future__ import annotations

import json

import pytest
import torch

from streamchat import hf
from streamchat.cli import main
from streamchat.compare import run_compare
from streamchat.config import SessionConfig
from streamchat.errors import UserError
from streamchat.memory import MemoryConfig
from streamchat.metrics import gpu_memory
from streamchat.models import RANDOM_ARCHS, load, parse_device_map, random_config
from streamchat.stream import Stream
from streamchat.video import Sampling, VideoSource

# every part named; "disk" parts are offloaded (weights read from a folder per forward), run on the CPU
CPU_DISK = {
    "model.visual": "disk",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def split_tiny():
    return load("tiny-random", dtype="float32", device_map=CPU_DISK)


# --- the published architectures -----------------------------------------------------------------

# "Model size" on each checkpoint's Hugging Face page (safetensors, BF16), with its precision, and the exact
# count this architecture builds (pinned so an edit shows); see docs/models.md for every field's source.
PUBLISHED = {
    "qwen2.5-vl-3b": (3.75e9, 0.005e9, 3_754_622_976),
    "qwen2.5-vl-7b": (8.29e9, 0.005e9, 8_292_166_656),
    "qwen2.5-vl-32b": (33.5e9, 0.05e9, 33_452_718_336),
    "qwen2.5-vl-72b": (73.4e9, 0.05e9, 73_410_777_344),
}
# per-token KV bytes in bf16: layers x 2 (K, V) x KV heads x head_dim 128 x 2 bytes
KV_BYTES = {"qwen2.5-vl-3b": 36 * 2 * 2 * 128 * 2, "qwen2.5-vl-7b": 28 * 2 * 4 * 128 * 2,
            "qwen2.5-vl-32b": 64 * 2 * 8 * 128 * 2, "qwen2.5-vl-72b": 80 * 2 * 8 * 128 * 2}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_random_architecture_has_the_published_parameter_count_and_kv_size(arch):
    config = random_config(f"random:{arch}")
    with torch.device("meta"):  # shapes only: the 72B costs no memory
        model = hf.build_from_config(config, dtype=torch.bfloat16, device="meta")
    n = sum(p.numel() for p in model.parameters())
    published, precision, exact = PUBLISHED[arch]
    assert abs(n - published) <= precision
    assert n == exact
    tc, vc = config.text_config, config.vision_config
    assert vc.out_hidden_size == tc.hidden_size  # the merger feeds the text model
    assert tc.hidden_size // tc.num_attention_heads == 128
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * 128 * torch.bfloat16.itemsize
    assert kv == KV_BYTES[arch]
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == (arch == "qwen2.5-vl-3b")


def test_7b_matches_the_figures_the_issue_measured():
    tc = random_config("random:qwen2.5-vl-7b").text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (3584, 28, 28, 4)
    assert (tc.intermediate_size, tc.vocab_size, tc.tie_word_embeddings) == (18944, 152064, False)
    assert set(RANDOM_ARCHS) == {"qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b"}


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(UserError, match="random:qwen2.5-vl-72b"):
        random_config("random:qwen2.5-vl-13b")


# --- a split model on the CPU -------------------------------------------------------------------


def test_split_placement_comes_from_the_hooks_not_the_weights(split_tiny):
    model = split_tiny.model
    assert split_tiny.split
    assert model.model.visual.blocks[0].mlp.gate_proj.weight.device.type == "meta"  # offloaded to disk
    assert model.model.language_model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    assert hf.vision_device(model) == torch.device("cpu")
    assert hf.layer_devices(model) == [torch.device("cpu")] * 2
    assert split_tiny.device == torch.device("cpu") and split_tiny.devices == (torch.device("cpu"),)


def test_split_model_has_no_graphs_and_plans_its_cache_on_each_layers_device(split_tiny, clip_24fps):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0, max_frames=8), chunk_frames=4, max_new_tokens=4)
    stream = Stream(split_tiny, VideoSource(clip_24fps, config.sampling), config)
    cache = stream.engine.cache
    assert cache.capacity > 0  # plan() sized the buffers
    assert [layer._k.device for layer in cache.hf.layers] == hf.layer_devices(split_tiny.model)
    assert hf.static_decoder(split_tiny.model, cache.hf, cache.graphs) is None
    assert hf.question_prefill(split_tiny.model, cache.hf, 16, cache.graphs) is None
    assert hf.vision_graph(split_tiny.model, torch.tensor([[2, 8, 8]]), (128, 1176), cache.graphs) is None
    stream.encode_until(8)
    assert cache.length > 0 and all(layer._k.device.type == "cpu" for layer in cache.hf.layers)


@pytest.mark.parametrize("history", ["drop", "keep"])
def test_split_streaming_matches_offline_token_for_token(split_tiny, tiny, clip_24fps, history):
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=15), chunk_frames=4,
                           max_new_tokens=12, history=history)
    split = run_compare(split_tiny, VideoSource(clip_24fps, config.sampling), config, "What is moving?")
    assert split["match"]["identical"] is True
    assert split["match"]["max_logit_diff"] <= 1e-4
    assert split["streaming"]["token_ids"] == split["offline"]["token_ids"]
    # the same weights on one device give the same tokens: the split changes where, not what
    whole = run_compare(tiny, VideoSource(clip_24fps, config.sampling), config, "What is moving?")
    assert whole["streaming"]["token_ids"] == split["streaming"]["token_ids"]


def test_split_bounded_memory_retrieves_on_the_split_model(split_tiny, tiny, clip_24fps):
    """Bounded memory scores pages with every layer's queries (computed inside each layer, whose offloaded
    weights the hooks load) and brings pages back to each layer's device: the same pages and answer as
    the model on one device."""
    memory = MemoryConfig(mode="bounded", gpu_kv_budget="4096", retrieve_tokens=1024)
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=8.0), chunk_frames=4, max_new_tokens=8, memory=memory)
    answers = []
    for loaded in (split_tiny, tiny):
        stream = Stream(loaded, VideoSource(clip_24fps, config.sampling), config)
        stream.encode_until(24)
        assert stream.engine.evict_to(40) > 0  # most pages archived: the question must bring them back
        answers.append(stream.engine.ask("What color is the square?"))
    assert answers[0].retrieved and answers[0].retrieved == answers[1].retrieved
    assert answers[0].token_ids == answers[1].token_ids
    assert (answers[0].first_logits - answers[1].first_logits).abs().max() <= 1e-4


def test_snapshot_of_one_device_restores_into_the_split_model(split_tiny, tiny, clip_24fps, tmp_path):
    """The same architecture is the same fingerprint wherever its layers sit: a snapshot saved on one
    device fills the split model's planned buffers, each layer's rows on that layer's device."""
    from streamchat import snapshots

    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=4), max_new_tokens=8).validate()
    whole = Stream(tiny, VideoSource(clip_24fps, config.sampling), config)
    whole.encode_until(whole.frames_at(1.6))
    written = snapshots.save(whole, tmp_path / "snap.safetensors", video_path=str(clip_24fps), video_sha256="x")
    split = Stream(split_tiny, VideoSource(clip_24fps, config.sampling), config)
    snapshots.load(written.path, split, expected_sha256=written.sha256)
    assert split.engine.cache_tokens == whole.engine.cache_tokens > 0
    assert [layer._k.device for layer in split.engine.cache.hf.layers] == hf.layer_devices(split_tiny.model)
    for s in (whole, split):
        s.encode_until(s.total_frames)
    a, b = whole.engine.ask("Anything blue?"), split.engine.ask("Anything blue?")
    assert a.token_ids == b.token_ids and (a.first_logits - b.first_logits).abs().max() <= 1e-4


def test_random_architecture_builds_part_by_part_on_a_map():
    """random:<arch> on a map: each part is created on its device (never whole in host memory first), with
    transformers' init, rotary buffers included."""
    config = random_config("random:qwen2.5-vl-3b")
    config.text_config.num_hidden_layers, config.vision_config.depth = 2, 2  # small enough for the CPU
    config.vision_config.fullatt_block_indexes = [1]
    dmap = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
            "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
            "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    import tempfile

    with tempfile.TemporaryDirectory() as offload:
        torch.manual_seed(0)
        model = hf.build_on_map(config, dtype=torch.float32, device_map=dmap, offload_dir=offload)
        w = model.model.language_model.layers[0].mlp.up_proj.weight
        assert w.device.type == "cpu" and 0.015 < float(w.detach().std()) < 0.025  # initializer_range 0.02, not garbage
        rotary = model.model.language_model.rotary_emb
        expected = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
        assert torch.allclose(rotary.inv_freq, expected)
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # the 3B ties them
        assert hf.layer_devices(model) == [torch.device("cpu")] * 2


# --- maps given by the user -----------------------------------------------------------------------


def test_a_map_onto_one_device_is_not_split_and_keeps_the_fast_paths():
    one = load("tiny-random", dtype="float32", device_map={"": "cpu"})
    assert not one.split and one.devices == (torch.device("cpu"),)
    assert getattr(one.model, "_hf_hook", None) is None  # accelerate adds no hooks for one device


def test_device_map_file_forms(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(CPU_DISK))
    assert parse_device_map(str(flat)) == (CPU_DISK, None)
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"device_map": CPU_DISK, "main_device": "cpu"}))
    assert parse_device_map(str(nested)) == (CPU_DISK, "cpu")
    assert parse_device_map("auto") == ("auto", None)
    assert parse_device_map(None) == (None, None)


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must map module names to devices"),
    ('{"model.visual": ["cpu"]}', "must map module names to devices"),
])
def test_bad_device_map_file_is_one_line(tmp_path, content, needle):
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(UserError, match=needle):
        parse_device_map(str(path))


@pytest.mark.parametrize("dmap,needle", [
    ({**CPU_DISK, "model.vision": "cpu"}, "'model.vision' is not a module of this model"),
    ({k: v for k, v in CPU_DISK.items() if k != "lm_head"}, "lm_head"),  # a weight with no device
    ({**CPU_DISK, "lm_head": "tpu"}, "not a device"),
    ({**CPU_DISK, "lm_head": "cuda:7"}, "CUDA"),
])
def test_bad_device_map_is_refused_before_any_work(dmap, needle):
    with pytest.raises(UserError, match=needle):
        load("tiny-random", dtype="float32", device_map=dmap)


def test_cli_device_map_runs_and_reports_devices(tmp_path, clip_24fps, capsys):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(CPU_DISK))
    rc = main(["ask", str(clip_24fps), "What is moving?", "--model", "tiny-random", "--device-map", str(path),
               "--max-frames", "8", "--max-new-tokens", "4", "--json", "--no-log"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert len(doc["token_ids"]) >= 1
    assert doc["devices"] == ["cpu"] and doc["device_memory"] is None  # per-GPU figures only with several GPUs
    assert out.err == ""


def test_cli_device_and_device_map_together_is_exit_2(tmp_path, clip_24fps, capsys):
    rc = main(["ask", str(clip_24fps), "What?", "--model", "tiny-random", "--device", "cpu", "--device-map", "auto", "--no-log"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--device-map" in err


# --- memory figures over several devices ------------------------------------------------------------


def test_gpu_memory_on_the_cpu_is_zero_and_has_no_breakdown():
    assert gpu_memory((torch.device("cpu"), torch.device("cpu"))) == {"allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0}


def test_bench_per_device_memory_takes_weights_first_and_peaks_over_all():
    from streamchat.bench import per_device_memory

    def m(a, p):
        return {"allocated_bytes": a, "reserved_bytes": a, "peak_bytes": p}

    samples = [{"devices": {"cuda:0": m(10, 10), "cuda:1": m(20, 20)}},
               {"devices": {"cuda:0": m(15, 40), "cuda:1": m(25, 30)}},
               {"devices": {"cuda:0": m(16, 18), "cuda:1": m(26, 90)}}]
    assert per_device_memory(samples) == {"cuda:0": {"weights_bytes": 10, "steady_bytes": 16, "peak_bytes": 40},
                                          "cuda:1": {"weights_bytes": 20, "steady_bytes": 26, "peak_bytes": 90}}
    assert per_device_memory([{"allocated_bytes": 0}]) is None


# --- GPU: layers that really compute on two devices ------------------------------------------------

GPU_TOL = 1e-3  # float32 on a GPU: different kernels (flash/efficient SDPA, cuBLAS) on the two sides
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "layers computing on two devices need a GPU: cuda:0 + cpu (one GPU) or cuda:0 + cuda:1; the CPU "
    "runs the split through accelerate's offload only (all parts compute on the CPU)"))


def _gpu_cpu_map() -> dict:
    return {"model.visual": "cuda:0", "model.language_model.embed_tokens": "cuda:0",
            "model.language_model.layers.0": "cuda:0", "model.language_model.layers.1": "cpu",
            "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cuda:0", "lm_head": "cuda:0"}


@pytest.mark.gpu
@needs_gpu
def test_gpu_cpu_split_keeps_each_layers_kv_on_its_device_and_matches_offline(clip_24fps):
    split = load("tiny-random", dtype="float32", device_map=_gpu_cpu_map(), main_device="cpu")
    assert hf.layer_devices(split.model) == [torch.device("cuda:0"), torch.device("cpu")]
    assert set(split.devices) == {torch.device("cuda:0"), torch.device("cpu")}
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=15), chunk_frames=4, max_new_tokens=12)
    stream = Stream(split, VideoSource(clip_24fps, config.sampling), config)
    assert [layer._k.device for layer in stream.engine.cache.hf.layers] == hf.layer_devices(split.model)
    report = run_compare(split, VideoSource(clip_24fps, config.sampling), config, "What is moving?")
    assert report["match"]["identical"] is True and report["match"]["max_logit_diff"] <= GPU_TOL


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two GPUs needed: layers on cuda:0 and cuda:1")
def test_two_gpu_split_reports_memory_per_device_and_matches_offline(clip_24fps):
    dmap = {k: ("cuda:1" if k.endswith(("layers.1", "norm", "lm_head")) else "cuda:0") for k in CPU_DISK}
    split = load("tiny-random", dtype="float32", device_map=dmap)
    assert split.devices == (torch.device("cuda:0"), torch.device("cuda:1"))
    config = SessionConfig(model="tiny-random", sampling=Sampling(fps=24.0, max_frames=15), chunk_frames=4, max_new_tokens=12)
    report = run_compare(split, VideoSource(clip_24fps, config.sampling), config, "What is moving?")
    assert report["match"]["identical"] is True and report["match"]["max_logit_diff"] <= GPU_TOL
    mem = gpu_memory(split.devices)
    assert set(mem["devices"]) == {"cuda:0", "cuda:1"} and all(m["allocated_bytes"] > 0 for m in mem["devices"].values())
