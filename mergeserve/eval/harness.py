"""lm-evaluation-harness tasks on a merged checkpoint, where the user has the tasks' datasets.

Runs ``lm_eval.simple_evaluate`` with its Hugging Face backend on the checkpoint directory and
returns ``{task: {metric: value}}``. Nothing is downloaded here (``HF_HUB_OFFLINE=1``): the
datasets must already be in the local Hugging Face cache, else the error names the task.
https://github.com/EleutherAI/lm-evaluation-harness
"""

from __future__ import annotations

from pathlib import Path

from mergeserve.errors import ConfigError, InputError


def run_lm_eval(model_dir: str | Path, tasks: list[str], device: str = "cpu", limit: int | None = None) -> dict:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("eval.lm_eval_tasks: needs the 'lm-eval' package (pip install lm-eval) and the tasks' datasets") from None
    try:
        res = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype=float32,trust_remote_code=False",
            tasks=list(tasks), device=device, limit=limit,
        )
    except Exception as e:  # noqa: BLE001 - lm-eval raises plain errors for missing tasks/datasets
        raise InputError(f"eval.lm_eval_tasks {tasks}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in (res or {}).get("results", {}).items()}
