"""Stage `sft`: supervised fine-tuning on prompt-completion or conversational data.

Loss: next-token NLL on completion / assistant tokens only, normalized over every
loss token of the optimizer step (see `posttrain.losses.sft.token_nll`).
"""

from __future__ import annotations

from posttrain.config import RunConfig
from posttrain.data.collate import model_attention_mask
from posttrain.engine.trainer import TrainData
from posttrain.losses.sft import IGNORE_INDEX, next_token_targets, token_nll
from posttrain.models.head import position_nll, takes_logits_to_keep
from posttrain.stages.common import RunResult, run_training
from posttrain.data import build_dataset
from posttrain.data.audit import audit_dataset

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class LMStage:
    """Causal-LM loss on labelled tokens; shared by `cpt` and `sft`."""

    def __init__(self, name: str):
        self.name = name

    def loss(self, model, batch):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if inputs.get("attention_mask") is not None and inputs["attention_mask"].dim() == 4:
            # packed rows: eager attention would add a bool mask as 1.0 instead of masking
            inputs["attention_mask"] = model_attention_mask(inputs["attention_mask"], model)
        if not takes_logits_to_keep(model):
            out = model(**inputs, use_cache=False)
            return token_nll(out.logits, batch["labels"])[0], {}
        # the output head runs only where a loss falls (not on prompt or padding tokens), a chunk of
        # positions at a time: no [tokens, vocab] logits are held (posttrain.models.head)
        positions, targets = next_token_targets(batch["labels"])
        return position_nll(model, inputs, positions, targets)[0], {}

    def num_loss_units(self, batch) -> int:
        # token_nll predicts labels[:, 1:]
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _item_tokens(item) -> int:
    if hasattr(item, "input_ids"):
        return len(item.input_ids)
    return sum(len(x.input_ids) for x in item)  # a packed row: a list of examples


def lm_data(cfg: RunConfig, tokenizer) -> TrainData:
    if cfg.data.audit != "off":  # the loss-mask and template audit (data.audit: error | warn | off)
        audit_dataset(cfg.data, tokenizer, strict=cfg.data.audit == "error")
    bundle = build_dataset(cfg.data, tokenizer, stage=cfg.stage, seed=cfg.train.seed)

    def collate(items):
        batch = bundle.collate(items)
        batch["num_real_tokens"] = sum(_item_tokens(x) for x in items)
        return batch

    return TrainData(train=bundle.train, eval=bundle.eval, collate=collate, stats=dict(bundle.stats),
                     hashes=dict(bundle.hashes))


def run(cfg: RunConfig, *, resume: bool = False, **kw) -> RunResult:
    return run_training(cfg, lambda tok: LMStage(cfg.stage), lm_data, resume=resume, **kw)
