"""The vLLM backend (prompt logprobs) agrees with the transformers backend on a tiny checkpoint.

vLLM runs in a child process (its engine spawns processes of its own, reaped with it), on the
real CPU engine; the same code path serves GPU clusters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mergeserve.eval.perplexity import load_tokenizer, score_checkpoint, tokenize_texts

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mergeserve.eval.perplexity import load_tokenizer, tokenize_texts
    from mergeserve.eval.vllm_backend import score_checkpoint_vllm
    if __name__ == "__main__":
        d, text = sys.argv[1], open(sys.argv[2]).read()
        texts = tokenize_texts({"code": text}, load_tokenizer(d), 128, 600)
        print("RESULT " + json.dumps({k: v.as_dict() for k, v in score_checkpoint_vllm(d, texts).items()}))
    """
)


def test_vllm_prompt_logprobs_match_transformers(tiny_family, tmp_path):
    d = tiny_family["mistral"]["code"]
    heldout = d.parent / "heldout" / "code.txt"
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(d), str(heldout)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])["code"]
    ref = score_checkpoint(d, tokenize_texts({"code": heldout.read_text()}, load_tokenizer(d), 128, 600))["code"]
    assert got["tokens"] == ref.tokens == 600 and got["bytes"] == ref.bytes
    # bf16 engine against float32 transformers: the same quantity, to about 1%
    assert got["ppl_token"] == pytest.approx(ref.ppl_token, rel=0.02)
