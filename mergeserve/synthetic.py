"""Random-weight checkpoints of real architectures, for benchmarks and input-validation tests.

:func:`make_random_model` writes a Llama/Mistral/Qwen2-layout checkpoint (``config.json`` +
sharded safetensors + index) of any size tensor by tensor, so a 7B-shape model (about 14.5 GB
bf16) is produced with one tensor in memory at a time. Values are N(0, 0.02) (norms are 1 + small
noise), seeded per tensor so two calls with the same seed give identical files.

Shapes used by the benchmarks (from the issues):

- ``tinyllama``: hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 kv heads, vocab 32000
  (1,100,048,384 parameters)
- ``qwen-0.5b``: hidden 896, 24 layers, intermediate 4864, 14 / 2 heads, vocab 151936
- ``mistral-7b``: hidden 4096, 32 layers, intermediate 14336, 32 / 8 heads, vocab 32000
"""

from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergeserve.merge.reader import TORCH_TO_ST
from mergeserve.merge.writer import ShardWriter


@dataclass(frozen=True)
class Shape:
    arch: str  # llama | mistral | qwen2
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False


SHAPES = {
    "tinyllama": Shape("llama", 2048, 22, 5632, 32, 4, 32000),
    "qwen-0.5b": Shape("qwen2", 896, 24, 4864, 14, 2, 151936, tie_embeddings=True),
    "mistral-7b": Shape("mistral", 4096, 32, 14336, 32, 8, 32000),
    "tiny": Shape("mistral", 256, 4, 512, 4, 2, 4096),
}
_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
        if s.arch == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (s.hidden,)), (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.v_proj.bias", (kv,))]
    out.append(("model.norm.weight", (s.hidden,)))
    if not s.tie_embeddings:
        out.append(("lm_head.weight", (s.vocab, s.hidden)))
    return out


def hf_config(s: Shape, dtype: str = "bfloat16") -> dict:
    cls, mtype = _ARCH[s.arch]
    cfg = {
        "architectures": [cls], "model_type": mtype, "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden // s.heads, "vocab_size": s.vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": s.tie_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
    }
    if s.arch == "mistral":
        cfg["sliding_window"] = None
    return cfg


def make_random_model(
    out: str | Path, shape: Shape | str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
    shard_size: int = 2_000_000_000, noise_of: str | Path | None = None,
) -> Path:
    """Write a random checkpoint of ``shape`` to ``out``; returns ``out``.

    ``noise_of``: instead of independent weights, write ``that model + N(0, 0.002)`` (a
    "fine-tune" of it), so merges see correlated inputs as in practice.
    """
    s = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = tensor_shapes(s)
    esize = torch.finfo(dtype).bits // 8
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for n, shp in names:
        b = esize
        for d in shp:
            b *= d
        if groups[-1] and size + b > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((n, shp))
        size += b
    base = None
    if noise_of is not None:
        from mergeserve.merge.reader import ModelFiles

        base = ModelFiles(noise_of)
    weight_map = {}
    total = 0
    for k, g in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(out / fname, [(n, TORCH_TO_ST[dtype], shp) for n, shp in g])
        for n, shp in g:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
            if base is not None:
                t = base.get(n).float() + torch.randn(shp, generator=gen) * 0.002
            elif len(shp) == 1:
                t = 1.0 + 0.05 * torch.randn(shp, generator=gen) if n.endswith("norm.weight") else 0.02 * torch.randn(shp, generator=gen)
            else:
                t = torch.randn(shp, generator=gen).mul_(0.02)
            w.write(n, t.to(dtype))
            weight_map[n] = fname
        w.close()
        total += w.total_bytes
    if base is not None:
        base.close()
    (out / "config.json").write_text(json.dumps(hf_config(s, str(dtype).removeprefix("torch.")), indent=2))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write a random-weight checkpoint")
    p.add_argument("out")
    p.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-of", help="write a small perturbation of this model instead")
    a = p.parse_args(argv)
    make_random_model(a.out, a.shape, seed=a.seed, noise_of=a.noise_of)
    print(json.dumps(asdict(SHAPES[a.shape])))


if __name__ == "__main__":
    main()
