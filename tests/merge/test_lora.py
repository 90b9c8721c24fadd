"""LoRA inputs (``model: base+adapter``) against mergekit 0.1.5, and the adapters refused.

The adapters are made with peft on random checkpoints (A and B random, so every targeted tensor
changes) and cover: per-module rank and alpha patterns with rsLoRA, a bf16 adapter, layer
selection, a regex and ``all-linear`` target list, ``fan_in_fan_out`` on linear layers (which
peft ignores), embedding LoRA with ``modules_to_save``, ``lora_bias`` on a model with biases, and a
pickle adapter. mergekit merges each adapter into its model with peft; the checkpoints must be
equal bit for bit.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mergeserve.cli import main
from mergeserve.merge.api import merge
from mergeserve.synthetic import Shape, make_random_model
from tests.oracle import absolutize, compare, load_tensors, run_mergekit

QWEN = Shape("qwen2", 256, 2, 512, 4, 2, 1024, tie_embeddings=True)  # q/k/v biases, tied embeddings


def _adapter(model_dir, out, *, seed: int, dtype=torch.float32, pickle: bool = False, **lora):
    """A peft LoRA adapter for ``model_dir`` with random A and B (B is zero at peft's init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(out, safe_serialization=not pickle)
    return out


@pytest.fixture(scope="module")
def lora_root(random_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-models")
    for k in ("base", "a", "b"):
        (root / ("base" if k == "base" else f"ft-{k}")).symlink_to(random_models[k])
    make_random_model(root / "qbase", QWEN, seed=5)
    make_random_model(root / "qft", QWEN, seed=6, noise_of=root / "qbase")
    make_random_model(root / "small", Shape("mistral", 128, 4, 256, 2, 1, 512), seed=7)
    base = root / "base"
    _adapter(base, root / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _adapter(base, root / "rs", seed=2, dtype=torch.bfloat16, r=8, lora_alpha=16, use_rslora=True,
             target_modules=["o_proj", "up_proj"], rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 5},
             layers_to_transform=[1, 3])
    _adapter(base, root / "emb", seed=3, r=4, lora_alpha=4, target_modules=["embed_tokens", "gate_proj"], modules_to_save=["lm_head"])
    _adapter(base, root / "regex", seed=4, r=4, lora_alpha=16, target_modules=r".*\.(k_proj|gate_proj)", fan_in_fan_out=True)
    _adapter(base, root / "alllinear", seed=5, r=2, lora_alpha=2, target_modules="all-linear")
    _adapter(root / "qbase", root / "bias", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_bias=True)
    _adapter(base, root / "pickled", seed=7, r=4, lora_alpha=8, target_modules=["v_proj"], pickle=True)
    _adapter(root / "small", root / "small-ad", seed=8, r=4, lora_alpha=8, target_modules=["q_proj"])
    return root


def _weighted(method: str, weights: dict, base=None, **params) -> dict:
    r = {"merge_method": method, "dtype": "bfloat16", "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()]}
    if base:
        r["base_model"] = base
    if params:
        r["parameters"] = params
    return r


RECIPES = {
    "linear-qv": _weighted("linear", {"base+qv": 0.6, "ft-a": 0.4}),
    "task-arithmetic-rslora-bf16-adapter": _weighted("task_arithmetic", {"ft-a+rs": 0.5, "ft-b": 0.5}, base="base"),
    "slerp-embedding-lora-modules-to-save": {
        "merge_method": "slerp", "base_model": "ft-a", "parameters": {"t": 0.4},
        "models": [{"model": "base+emb"}, {"model": "ft-a"}],
    },
    "linear-two-adapters-one-base": _weighted("linear", {"base+regex": 0.5, "base+alllinear": 0.5}),
    "linear-lora-bias-tied": _weighted("linear", {"qbase+bias": 0.5, "qft": 0.5}),
    "linear-pickle-adapter": _weighted("linear", {"base+pickled": 0.5, "ft-b": 0.5}),
}


@pytest.fixture(scope="module")
def mergekit_outputs(lora_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("oracle-lora")
    run_mergekit([(absolutize(r, lora_root), work / f"mk-{k}") for k, r in RECIPES.items()], work)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_lora_input_matches_mergekit(name, lora_root, mergekit_outputs):
    ours = merge(RECIPES[name], mergekit_outputs / f"ours-{name}", models_dir=lora_root, allow_pickle=True, progress=False)
    got, want = load_tensors(ours.out_dir), load_tensors(mergekit_outputs / f"mk-{name}")
    stats = compare(got, want)
    assert stats["bitwise_tensors"] == stats["tensors"], stats
    # not vacuous: the same recipe without the adapters gives a different checkpoint
    plain = json.loads(json.dumps(RECIPES[name]).replace("+qv", "").replace("+rs", "").replace("+emb", "")
                       .replace("+regex", "").replace("+alllinear", "").replace("+bias", "").replace("+pickled", ""))
    if name == "linear-two-adapters-one-base":
        plain["models"] = plain["models"][:1]
    without = load_tensors(merge(plain, mergekit_outputs / f"plain-{name}", models_dir=lora_root, progress=False).out_dir)
    assert any(not got[k].equal(without[k]) for k in got)


def test_every_targeted_tensor_is_patched_and_only_those(lora_root):
    from mergeserve.merge.api import plan_merge

    plan = plan_merge(_weighted("linear", {"base+rs": 1.0}), models_dir=lora_root)[2]
    patched = sorted(t.name for s in plan.shards for t in s.tensors if t.transform is not None)
    assert patched == [f"model.layers.{i}.{m}.weight" for i in (1, 3) for m in ("mlp.up_proj", "self_attn.o_proj")]


def _run(tmp_path, root, recipe, capsys, *extra):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code = main(["merge", str(p), str(out), "--local", "--models-dir", str(root), "-q", *extra])
    err = capsys.readouterr().err
    return code, err, out


def _edited(root, name: str, new: str, **changes):
    """A copy of adapter ``name`` with adapter_config.json fields changed."""
    d = root / new
    if not d.exists():
        shutil.copytree(root / name, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return new


@pytest.mark.parametrize(
    "adapter, expect",
    [
        ("small-ad", ["adapter_model.safetensors", "q_proj", "do not fit"]),
        (("qv", "qv-rank", {"r": 8}), ["rank 4", "r=8"]),
        (("qv", "qv-targets", {"target_modules": ["c_attn"]}), ["target_modules", "match no module", "do not target"]),
        (("qv", "qv-dora", {"use_dora": True}), ["use_dora", "not plain LoRA"]),
        ("pickled", ["adapter_model.bin", "--allow-pickle"]),
        ("nowhere", ["LoRA adapter", "nowhere"]),
    ],
    ids=["base-shapes", "rank", "target-modules", "dora", "pickle-refused", "missing"],
)
def test_bad_adapter_is_refused_before_any_work(adapter, expect, lora_root, tmp_path, capsys):
    name = _edited(lora_root, adapter[0], adapter[1], **adapter[2]) if isinstance(adapter, tuple) else adapter
    code, err, out = _run(tmp_path, lora_root, _weighted("linear", {f"base+{name}": 0.5, "ft-a": 0.5}), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert all(e in err for e in expect), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
