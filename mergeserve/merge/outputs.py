"""Everything in a checkpoint besides the tensors: index, config, tokenizer, recipe, card, manifest.

:func:`check_tokenizer` runs before any tensor is merged (a bad ``tokenizer_source`` or
``chat_template`` fails early); :func:`write_metadata` runs after the shards are written and
before the staging directory is committed. Files are taken from the input models only when
they resolve inside them (:func:`~mergeserve.merge.untrusted.model_file`): a ``tokenizer.json``
linking to a private key is refused, not copied into the checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from mergeserve import __version__
from mergeserve.errors import ConfigError, InputError, UnsupportedError
from mergeserve.merge.config import MergeConfig, ModelRef
from mergeserve.merge.digest import DIGEST
from mergeserve.merge.executor import ShardResult
from mergeserve.merge.phases import summed
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.reader import fingerprint
from mergeserve.merge.untrusted import model_file

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MANIFEST = "mergeserve_manifest.json"

# Built-in chat templates, selectable by name as in mergekit (`chat_template: chatml`).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def _template_of(model_dir: Path) -> str | None:
    jinja = model_file(model_dir, "chat_template.jinja")
    if jinja:
        try:
            return jinja.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError(f"{model_dir / 'chat_template.jinja'}: not valid UTF-8") from None
    tc = model_file(model_dir, "tokenizer_config.json")
    try:
        tpl = json.loads(tc.read_bytes()).get("chat_template") if tc else None
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    if isinstance(tpl, list):  # named templates
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    return tpl.strip() if isinstance(tpl, str) else None


def _tokenizer_donor(config: MergeConfig, plan: MergePlan) -> tuple[int, str]:
    """Index of the model whose tokenizer is written, and the source setting."""
    src = config.tokenizer.source if config.tokenizer else config.tokenizer_source
    if isinstance(src, ModelRef):
        refs = [m.ref for m in plan.models]
        if str(src) not in refs:
            raise ConfigError(f"tokenizer_source: {src} is not one of the recipe's models ({', '.join(refs)})")
        return refs.index(str(src)), "model"
    return plan.donor, src or "copy"


def resolve_chat_template(config: MergeConfig, plan: MergePlan) -> str | None:
    tpl = config.chat_template
    if not tpl:
        return None
    if tpl == "auto":
        found = [t for m in plan.models if (t := _template_of(Path(m.path)))]
        return max(set(found), key=found.count) if found else None
    if tpl in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[tpl]
    if len(tpl) < 20 or "{" not in tpl:
        raise ConfigError(
            f"chat_template: {tpl!r} is neither 'auto', a built-in name ({', '.join(BUILTIN_TEMPLATES)}) nor Jinja text"
        )
    return tpl


def check_tokenizer(config: MergeConfig, plan: MergePlan) -> None:
    """Fail before merging if the tokenizer request cannot be honoured."""
    donor, how = _tokenizer_donor(config, plan)
    if how == "union":
        vocabs = set()
        for m in plan.models:
            p = model_file(Path(m.path), "tokenizer.json")
            vocabs.add(p.read_bytes() if p else b"")
        if len(vocabs) > 1:
            raise UnsupportedError(
                "tokenizer_source: union of differing vocabularies is not supported yet; "
                "use 'base' or name one model (embedding permutation is not implemented)"
            )
    resolve_chat_template(config, plan)


def write_metadata(
    out: Path,
    config: MergeConfig,
    recipe_text: str,
    plan: MergePlan,
    results: Sequence[ShardResult],
    *,
    seconds: float,
) -> None:
    """Write index, config, generation config, tokenizer, recipe, model card and manifest."""
    weight_map = {r.name: s.filename for s in sorted(results, key=lambda s: s.index) for r in s.tensors}
    total = sum(s.bytes_written for s in results)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (out / "config.json").write_text(plan.out_config)
    tok_idx, _ = _tokenizer_donor(config, plan)
    copies = [(plan.models[plan.donor].path, "generation_config.json")] + [(plan.models[tok_idx].path, n) for n in TOKENIZER_FILES]
    for model_dir, name in copies:
        if src := model_file(Path(model_dir), name):
            shutil.copy(src, out / name)
    template = resolve_chat_template(config, plan)
    if template:
        tc_path = out / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
        tc["chat_template"] = template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(template)
    (out / "mergekit_config.yml").write_text(recipe_text)
    (out / "README.md").write_text(model_card(config, recipe_text, plan, out.name))
    manifest = {
        "mergeserve_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": plan.method,
        "plan_fingerprint": plan.fingerprint,
        "seed": plan.seed,
        "seconds": round(seconds, 3),
        "cpu_seconds": summed(s.cpu for s in results),  # by phase, over every shard (one reused by --resume: its first run)
        "inputs": {m.ref: {"path": m.path, "fingerprint": fingerprint(m.path)} for m in plan.models},
        "digest": DIGEST,
        "shards": {
            s.filename: {n.name: {"shape": list(n.shape), "dtype": n.dtype, DIGEST: n.digest} for n in s.tensors}
            for s in sorted(results, key=lambda s: s.index)
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def model_card(config: MergeConfig, recipe_text: str, plan: MergePlan, name: str) -> str:
    bases = "\n".join(f"- {m.ref}" for m in plan.models)
    quant = " (FP8 e4m3 block-quantized linear weights)" if plan.out_dtype == "fp8" else ""
    return (
        "---\nbase_model:\n" + bases + "\nlibrary_name: transformers\ntags:\n- mergekit\n- mergeserve\n- merge\n---\n"
        f"# {name}\n\nThis model was merged with mergeserve {__version__} using the "
        f"**{plan.method}** method, {plan.num_layers} layers, output dtype {plan.out_dtype}{quant}.\n\n"
        f"## Models merged\n\n{bases}\n\n## Configuration\n\nThe recipe (mergekit format):\n\n```yaml\n"
        f"{recipe_text.rstrip()}\n```\n"
    )
