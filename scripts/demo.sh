#!/usr/bin/env bash
# The main job, end to end on local defaults, on a fresh clone:
#   1. set up .venv (scripts/setup.sh);
#   2. build the tiny model family (tokenizer, Mistral/Llama/Qwen2 base + code/prose fine-tunes);
#   3. merge the two Mistral fine-tunes with the Marcoro14 slerp recipe on an embedded Ray, to FP8;
#   4. show what the merge did (held-out perplexity of the inputs and the merge, in bf16);
#   5. serve the FP8 merge (Ray Serve with HAProxy + vLLM, FP8 weights on any x86 CPU), ask it a question
#      with the openai client, stop.
# Step 5 runs when the serve command is available (mergeserve serve --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MS=.venv/bin/mergeserve
TINY=.cache/tiny-family
OUT=.cache/demo

$MS tiny-models "$TINY"
echo
echo "== merge (Ray, bf16): configs/tiny/marcoro14-slerp.yaml"
$MS merge configs/tiny/marcoro14-slerp.yaml "$OUT/marcoro14-tiny" --models-dir "$TINY" --overwrite
echo
echo "== merge (Ray, FP8 weights): the same recipe"
$MS merge configs/tiny/marcoro14-slerp.yaml "$OUT/marcoro14-tiny-fp8" --models-dir "$TINY" --out-dtype fp8 --overwrite
echo
echo "== held-out perplexity (lower is better): the merge sits between its parents"
.venv/bin/python - "$TINY" "$OUT/marcoro14-tiny" <<'PY'
import sys
from mergeserve.tiny_models import heldout_texts, perplexity
tiny, merged = sys.argv[1], sys.argv[2]
held = {d: t[:12] for d, t in heldout_texts(tiny).items()}
print(f"{'model':28s} {'code':>8s} {'prose':>8s}")
for name, path in (("mistral-code", f"{tiny}/mistral-code"), ("mistral-prose", f"{tiny}/mistral-prose"), ("marcoro14-tiny (merge)", merged)):
    print(f"{name:28s} {perplexity(path, held['code']):8.1f} {perplexity(path, held['prose']):8.1f}")
PY
if $MS serve --help >/dev/null 2>&1; then
  echo
  echo "== serve the FP8 merge (Ray Serve + vLLM on CPU) and query it"
  .venv/bin/python scripts/serve_demo.py "$OUT/marcoro14-tiny-fp8" "$OUT/marcoro14-tiny"
fi
