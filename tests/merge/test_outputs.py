"""The written checkpoint: shards, index, config, metadata, manifest, FP8, atomicity, lazy reads."""

from __future__ import annotations

import json

import pytest
import torch
import xxhash
from safetensors import safe_open

from mergeserve.merge.api import merge, plan_merge
from mergeserve.merge.quantize import dequantize_fp8_block, quantize_fp8_block, quantize_fp8_block_reference
from tests.oracle import load_tensors

LINEAR = {
    "merge_method": "linear", "dtype": "bfloat16",
    "models": [{"model": "ft-a", "parameters": {"weight": 0.5}}, {"model": "ft-b", "parameters": {"weight": 0.5}}],
}
FRANKEN = {
    "merge_method": "passthrough", "dtype": "bfloat16", "out_dtype": "float16",
    "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 4]}]}, {"sources": [{"model": "ft-b", "layer_range": [2, 4]}]}],
}


@pytest.fixture(scope="module")
def sharded(random_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "linear"
    return merge(LINEAR, out, models_dir=random_models["root"], out_shard_size="2M", progress=False)


def test_shards_index_and_manifest_agree(sharded):
    out = sharded.out_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(out / f, "pt") as h:
            for k in h.keys():
                assert index["weight_map"][k] == f
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    manifest = json.loads((out / "mergeserve_manifest.json").read_text())
    assert sorted(manifest["shards"]) == files and manifest["digest"] == "xxh3_128"
    for f in files:
        with safe_open(out / f, "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                rec = manifest["shards"][f][k]
                assert rec["shape"] == list(t.shape)
                assert rec["xxh3_128"] == xxhash.xxh3_128(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    assert set(manifest["inputs"]) and all(v.get("fingerprint") for v in manifest["inputs"].values())
    assert set(manifest["cpu_seconds"]) == {"read", "merge", "quantize", "hash", "write"} and manifest["cpu_seconds"]["merge"] > 0


def test_each_shard_holds_whole_layers(sharded):
    index = json.loads((sharded.out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    by_layer: dict[str, set[str]] = {}
    for name, f in index.items():
        if ".layers." in name:
            by_layer.setdefault(name.split(".layers.")[1].split(".")[0], set()).add(f)
    assert by_layer and all(len(files) == 1 for files in by_layer.values())


def test_metadata_files(sharded, random_models):
    out = sharded.out_dir
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((random_models["a"] / "config.json").read_text())
    assert cfg["architectures"] == src["architectures"] and cfg["num_hidden_layers"] == 4
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    assert "merge_method: linear" in (out / "mergekit_config.yml").read_text()
    card = (out / "README.md").read_text()
    assert "linear" in card and "ft-a" in card
    assert not list(out.parent.glob(".linear*")), "staging directory left behind"


def test_layer_count_and_out_dtype_follow_the_slices(random_models, tmp_path):
    res = merge(FRANKEN, tmp_path / "franken", models_dir=random_models["root"], progress=False)
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    got = load_tensors(res.out_dir)
    b = load_tensors(random_models["b"])
    assert got["model.layers.5.mlp.up_proj.weight"].dtype == torch.float16
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"].half())
    assert torch.equal(got["model.layers.4.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"].half())


def test_fp8_output(random_models, tmp_path):
    res = merge(LINEAR, tmp_path / "fp8", models_dir=random_models["root"], out_dtype="fp8", progress=False)
    cfg = json.loads((res.out_dir / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128] and q["activation_scheme"] == "dynamic"
    got = load_tensors(res.out_dir)
    ref = load_tensors(merge(LINEAR, tmp_path / "bf16", models_dir=random_models["root"], progress=False).out_dir)
    w = got["model.layers.0.mlp.up_proj.weight"]
    s = got["model.layers.0.mlp.up_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and tuple(s.shape) == (512 // 128, 256 // 128)
    rq, rs = quantize_fp8_block_reference(ref["model.layers.0.mlp.up_proj.weight"])  # the whole-tensor form, as before
    assert torch.equal(w.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    deq = dequantize_fp8_block(w, s)
    r = ref["model.layers.0.mlp.up_proj.weight"].float()
    assert float((deq - r).abs().max() / r.abs().max()) < 0.07  # e4m3 has 3 mantissa bits
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], ref[name])


@pytest.mark.parametrize("shape", [(512, 256), (300, 200), (129, 4100), (1, 1), (128, 128), (4096, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_tiles_equal_the_whole_tensor_form(shape, dtype):
    """The tiled quantizer against the whole-tensor one, bit for bit: padded edges, zero blocks,
    values at the clamp, tiles narrower than a row."""
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w[: min(128, shape[0]), : min(128, shape[1])] = 0  # an all-zero block: scale 1
    w.view(-1)[-1] = 3.0  # one large value: its block's elements mostly flush to zero
    q, s = quantize_fp8_block(w)
    rq, rs = quantize_fp8_block_reference(w)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


def test_plan_is_data_and_prints(random_models):
    plan = plan_merge(LINEAR, models_dir=random_models["root"], out_shard_size="2M")[2]
    import pickle

    assert pickle.loads(pickle.dumps(plan)) == plan
    text = plan.describe()
    assert "linear" in text and "shard" in text.lower()


def test_inputs_are_read_lazily(random_models):
    """Reading one tensor touches only that tensor's bytes: the source is a view of an mmap."""
    from mergeserve.merge.reader import ModelFiles

    f = ModelFiles(random_models["a"])
    t = f.get("model.layers.0.mlp.up_proj.weight")
    assert not t.is_contiguous() or t.untyped_storage().nbytes() < 4 * 2**20  # not the whole 9 MB file
    f.close()
