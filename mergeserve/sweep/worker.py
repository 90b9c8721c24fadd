"""The Ray actor of a merge sweep: merges batches of variants shard by shard, and scores them.

One actor per GPU (``num_gpus=1``) or per CPU. An actor keeps its input mmaps open across tasks
of the same inputs and tokenizes the evaluation texts once. Its tasks:

- :meth:`merge_shard`: one output shard of every variant of a batch, from one read of the shard's
  source tensors, each variant's shard written to that variant's staging directory;
- :meth:`merge_score`: every shard of a batch in memory (nothing written), then each variant
  evaluated (scores-only sweeps; memory: one model per variant of the batch);
- :meth:`score_dir`: evaluate a written checkpoint;
- ``run_part`` (inherited): a part of a multi-stage recipe's shared stages, see cluster.stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergeserve.cluster.actors import MergeWorker
from mergeserve.sweep.spec import Eval


def _bytes_read(plan, shard_index: int) -> int:
    return plan.shards[shard_index].bytes_read


class SweepWorker(MergeWorker):
    """Merges and scores batches of variants (also runnable in-process, outside Ray); merges parts
    of a multi-stage recipe's shared stages too (MergeWorker.run_part)."""

    def __init__(self, device: str = "cpu"):
        super().__init__(device)
        self._texts: dict[tuple, list] = {}

    def _tokenized(self, tokenizer_dir: str, texts: dict[str, str], max_length: int, max_tokens: int | None) -> list:
        from mergeserve.eval.perplexity import load_tokenizer, tokenize_texts

        key = (tokenizer_dir, tuple(sorted((k, hash(v)) for k, v in texts.items())), max_length, max_tokens)
        if key not in self._texts:
            self._texts[key] = tokenize_texts(texts, load_tokenizer(tokenizer_dir), max_length, max_tokens)
        return self._texts[key]

    def merge_shard(self, plans: Sequence[Any], shard_index: int, out_dirs: Sequence[str]) -> tuple[list, int]:
        """Shard ``shard_index`` of each plan, written under ``out_dirs``; (ShardResults, bytes read)."""
        from mergeserve.merge.multi import run_shard_many

        res = run_shard_many(plans, shard_index, out_dirs, sources=self.sources_for(plans[0]), device=self.device, worker=self.name)
        return res, _bytes_read(plans[0], shard_index)

    def merge_score(self, plans: Sequence[Any], texts: dict[str, str], evaluation: Eval) -> tuple[list[dict], int]:
        """Every shard of each plan in memory, then each variant scored; (scores per plan, bytes read)."""
        from mergeserve.eval.perplexity import model_from_tensors, score_model
        from mergeserve.merge.multi import run_shard_many

        sources = self.sources_for(plans[0])
        tensors: list[dict] = [{} for _ in plans]
        read = 0
        for k in range(len(plans[0].shards)):
            for acc, part in zip(tensors, run_shard_many(plans, k, None, sources=sources, device=self.device)):
                acc.update(part)
            read += _bytes_read(plans[0], k)
        tok_dir = plans[0].models[plans[0].donor].path
        tokenized = self._tokenized(tok_dir, texts, evaluation.max_length, evaluation.max_tokens)
        scores = []
        for plan, ts in zip(plans, tensors):
            model = model_from_tensors(plan.out_config, ts).to(self.device)
            scores.append({k: v.as_dict() for k, v in score_model(model, tokenized).items()})
            del model
        return scores, read

    def score_dir(self, model_dir: str, texts: dict[str, str], evaluation: Eval) -> dict:
        """{"scores": {text: score}, "lm_eval": {...}?} of a written checkpoint (transformers or vLLM)."""
        tokenized = self._tokenized(model_dir, texts, evaluation.max_length, evaluation.max_tokens)
        if evaluation.backend == "vllm":
            from mergeserve.eval.vllm_backend import score_checkpoint_vllm

            got = score_checkpoint_vllm(model_dir, tokenized, device=self.device)
        else:
            from mergeserve.eval.perplexity import score_checkpoint

            got = score_checkpoint(model_dir, tokenized, device=self.device)
        out: dict = {"scores": {k: v.as_dict() for k, v in got.items()}}
        if evaluation.lm_eval_tasks:
            from mergeserve.eval.harness import run_lm_eval

            out["lm_eval"] = run_lm_eval(model_dir, evaluation.lm_eval_tasks, device=self.device)
        return out

