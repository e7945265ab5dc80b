"""Stage `topup@{lang}`: the post's targeted SFT top-up, SFT continued on a small math-dense set of one language
(`topup.dataset`, worked solutions in the language's normalized step template), feeding GRPO-from-SFT.

A language in `topup.languages` is topped up: the SFT model of `sft@{lang}` is trained further on the set with
`sft.fine_tune` and the `topup.*` hyper-parameters (an SFT adapter is continued, so the result is an adapter on the
same parent; a whole SFT model gets a LoRA, or a full fine-tune with `use_lora: false`), and `grpo@sft-{lang}` starts
from `data/models/topup/{lang}/` instead of the SFT model.

Any other language (all of them by default: the recipe as measured) is switched off: the stage writes only
`outputs.SWITCHED_OFF` into that folder, a file that never changes, and GRPO-from-SFT starts from the SFT model as in
the recipe. DVC stages always exist, so this stage runs once per language in a plain run; because its output stays the
same bytes while it is off, no stage below it reruns and every model below it is the recipe's, byte for byte.

Output: `data/models/topup/{lang}/` (the model, or the marker) and `reports/train/topup@{lang}.json`.
"""

from __future__ import annotations

from typing import Any

from budget_alignment import loading, paths
from budget_alignment.io import write_json
from budget_alignment.params import Params
from budget_alignment.tracking import StageRun
from budget_alignment.train import outputs, sft
from budget_alignment.train import trainer_setup as setup

# The param that sets the top-up's global batch.
BATCH_KEY = "topup.batch_size"


def stage_name(lang: str) -> str:
    return f"topup@{lang}"


def topped_up(params: Params, lang: str) -> bool:
    return lang in params.topup.languages


def full_finetune(params: Params, lang: str) -> bool:
    """Whether the top-up fine-tunes a whole SFT model (no LoRA): a sharded launch on GPUs."""
    return not params.topup.use_lora and not loading.is_adapter(paths.model_dir(f"sft-{lang}"))


def switch_off(lang: str) -> dict[str, Any]:
    """The stage of a language without a top-up: the marker in place of a model, constant metrics."""
    outputs.publish_switched_off(paths.model_dir(f"topup-{lang}"))
    metrics = {"topped_up": False}
    write_json(paths.training_metrics_file(stage_name(lang)), {"stage": stage_name(lang), **metrics})
    return metrics


def train_topup(params: Params, lang: str, run: StageRun | None = None) -> dict[str, Any]:
    """The `topup@{lang}` stage of a topped-up language: continue the SFT model on the top-up set."""
    start = setup.require_model(paths.model_dir(f"sft-{lang}"), f"sft@{lang} model")
    return sft.train_from(
        params,
        stage_name(lang),
        params.topup,
        lang,
        start=start,
        out=paths.model_dir(f"topup-{lang}"),
        run=run,
        batch_key=BATCH_KEY,
        recorded={"topped_up": True, "start": start.as_posix()},
    )
