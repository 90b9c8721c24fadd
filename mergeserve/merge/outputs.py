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
from collections.abc import Iterable, Sequence
from pathlib import Path

from mergeserve import __version__
from mergeserve.errors import ConfigError, InputError
from mergeserve.merge.config import MergeConfig
from mergeserve.merge.digest import DIGEST, new_digest
from mergeserve.merge.executor import ShardResult
from mergeserve.merge.phases import summed
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.reader import fingerprint, read_header
from mergeserve.merge.untrusted import model_file
from mergeserve.merge.vocab import TOKENIZER_FILES, build_tokenizer, load_tokenizer

MANIFEST = "mergeserve_manifest.json"
HASH_CHUNK = 64 << 20  # bytes hashed at a time when verifying a shard (memory stays flat)

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


def resolve_chat_template(config: MergeConfig, plan: MergePlan) -> str | None:
    tpl = config.chat_template
    if not tpl:
        return None
    if tpl == "auto":
        found = [t for m in plan.models if (t := _template_of(Path(m.path)))]
        return max(found, key=found.count) if found else None  # ties: the first model's, as mergekit
    if tpl in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[tpl]
    if len(tpl) < 20 or "{" not in tpl:
        raise ConfigError(
            f"chat_template: {tpl!r} is neither 'auto', a built-in name ({', '.join(BUILTIN_TEMPLATES)}) nor Jinja text"
        )
    return tpl


def check_tokenizer(config: MergeConfig, plan: MergePlan) -> None:
    """Fail before merging if the tokenizer request cannot be honoured (the vocabulary itself was
    built and checked by the planner)."""
    resolve_chat_template(config, plan)


def write_tokenizer(out: Path, config: MergeConfig, plan: MergePlan) -> None:
    """The output tokenizer files, as mergekit writes them.

    mergekit copies the donor's files verbatim unless the recipe asks for a tokenizer or a chat
    template; then it saves a ``transformers`` tokenizer: the one built for the merged vocabulary
    (:mod:`.vocab`), or the donor's reloaded, with the chat template set.
    """
    template = resolve_chat_template(config, plan)
    donor = Path(plan.models[plan.donor].path)
    if plan.tokenizer is None and not config.chat_template:
        for name in TOKENIZER_FILES:
            if src := model_file(donor, name):
                shutil.copy(src, out / name)
        return
    if plan.tokenizer is not None:
        tok = build_tokenizer(plan.tokenizer).tokenizer
    else:
        tok = load_tokenizer(str(donor))
    if template:
        tok.chat_template = template
    tok.save_pretrained(out)


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
    if src := model_file(Path(plan.models[plan.donor].path), "generation_config.json"):
        shutil.copy(src, out / "generation_config.json")
    write_tokenizer(out, config, plan)
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


def verify_tensors(path: Path, expected: Iterable[tuple[str, Sequence[int], str]]) -> bool:
    """Whether the safetensors file ``path`` holds each ``(name, shape, digest)`` of ``expected``
    (DIGEST; a finished shard or stage checked before ``--resume`` reuses it)."""
    try:
        header = read_header(path)
        with open(path, "rb") as f:
            for name, shape, sha in expected:
                info = header.get(name)
                if info is None or list(info.shape) != list(shape):
                    return False
                f.seek(info.start)
                h = new_digest()
                left = info.nbytes
                while left:
                    chunk = f.read(min(left, HASH_CHUNK))
                    if not chunk:
                        return False
                    h.update(chunk)
                    left -= len(chunk)
                if h.hexdigest() != sha:
                    return False
    except (OSError, InputError):
        return False  # an unreadable shard is merged again
    return True


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
