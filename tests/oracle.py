"""mergekit 0.1.5 as a test oracle, and the comparison rule the issue sets.

:func:`run_mergekit` runs many recipes in ONE subprocess (mergekit's imports cost seconds), each
recipe with its model references rewritten to absolute paths; a job whose recipe is a list of
documents runs as mergekit-multi would (intermediates in ``OUT-stages/NAME``), and LoRA
references (``model+adapter``) are merged by mergekit into a cache in the work directory.
:func:`compare` applies the rule:
tensors are equal bit for bit, or no element differs by more than one bf16 ulp and at most
0.01% of elements differ at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, yaml
    # One intra-op thread, as mergeserve uses: reductions are then split the same way (see
    # mergeserve.merge.execute.deterministic_threads), so equal arithmetic gives equal bits.
    torch.set_num_threads(1)
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.merge import MergeOptions, run_merge
    from mergekit.scripts import multimerge
    jobs, lora_cache = json.loads(sys.argv[1]), sys.argv[2]
    opts = MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False, lora_merge_cache=lora_cache)
    for kind, cfg_path, out in jobs:
        text = open(cfg_path).read()
        if kind == "multi":  # what mergekit-multi's main does, with these options
            configs, deps = multimerge.load_config(text, out + "-stages")
            tasks = multimerge.make_tasks(configs, deps, opts, out + "-stages", out, lazy=False)
            Executor(tasks, math_device="cpu", storage_device="cpu").execute()
            continue
        cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(cfg, out, opts, config_source=text)
    """
)


def absolutize(recipe: dict, models_dir: Path, keep: tuple[str, ...] = ()) -> dict:
    """Copy of ``recipe`` with every model id (and LoRA adapter id) replaced by its path under
    ``models_dir``; names in ``keep`` (stages of a multi-stage recipe) stay as they are."""

    def one(part: str) -> str:
        path, at, rev = part.partition("@")
        return part if path in keep or Path(path).is_absolute() else str(models_dir / path) + at + rev

    def fix(ref):
        return "+".join(one(p) for p in str(ref).split("+"))

    r = json.loads(json.dumps(recipe))
    if r.get("base_model"):
        r["base_model"] = fix(r["base_model"])
    for m in r.get("models") or []:
        m["model"] = fix(m["model"])
    for s in r.get("slices") or []:
        if s.get("base_model"):
            s["base_model"] = fix(s["base_model"])
        for src in s["sources"]:
            src["model"] = fix(src["model"])
    if isinstance(r.get("tokenizer_source"), str) and r["tokenizer_source"] not in ("base", "union"):
        r["tokenizer_source"] = fix(r["tokenizer_source"])
    tk = r.get("tokenizer") or {}
    if isinstance(tk.get("source"), str) and tk["source"] not in ("base", "union"):
        tk["source"] = fix(tk["source"])
    for emb in (tk.get("tokens") or {}).values():
        src = emb.get("source")
        if isinstance(src, str):
            emb["source"] = fix(src)
        elif isinstance(src, dict) and "model" in src:
            src["model"] = fix(src["model"])
    return r


def run_mergekit(jobs: list[tuple[dict | list[dict], Path]], workdir: Path) -> None:
    """Merge each (recipe with absolute model paths, out_dir) with mergekit 0.1.5; a list of
    documents is a multi-stage recipe (mergekit-multi)."""
    triples = []
    for k, (recipe, out) in enumerate(jobs):
        p = workdir / f"mergekit-recipe-{k}.yaml"
        multi = isinstance(recipe, list)
        p.write_text(yaml.safe_dump_all(recipe, sort_keys=False) if multi else yaml.safe_dump(recipe))
        triples.append(("multi" if multi else "one", str(p), str(out)))
    cache = workdir / "mergekit-lora-cache"
    subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(triples), str(cache)], check=True, timeout=900)


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each |x| (the spacing of bf16 numbers there)."""
    a = x.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(a)) - 7)


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Compare two checkpoints; returns stats; raises AssertionError outside the issue's rule."""
    assert sorted(ours) == sorted(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}"
    differing = total = bitwise_tensors = 0
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, f"{name}: shape {list(a.shape)} vs {list(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
        total += a.numel()
        if torch.equal(a, b):
            bitwise_tensors += 1
            continue
        diff = (a.float() - b.float()).abs()
        ulp = torch.maximum(bf16_ulp(a), bf16_ulp(b))
        worst = (diff / ulp).max().item()
        assert worst <= 1.0, f"{name}: an element differs by {worst:.2f} bf16 ulp"
        differing += int((diff > 0).sum())
    frac = differing / max(total, 1)
    assert frac <= 1e-4, f"{differing} of {total} elements differ ({frac:.4%} > 0.01%)"
    return {"tensors": len(ours), "bitwise_tensors": bitwise_tensors, "differing_elements": differing, "fraction": frac}
