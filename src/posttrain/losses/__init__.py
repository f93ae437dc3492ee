"""Pure loss functions over tensors: the public ``posttrain.losses`` API.

- ``sft``: next-token NLL and per-sequence log-probs.
- ``dpo``: DPO (sigmoid, ipo, hinge, robust) and RPO's chosen NLL.
- ``preference``: KTO, ORPO, SimPO, the reward model.
- ``rl``: masked statistics, KL estimators, GAE, PPO's policy/value losses and advantages.
- ``grpo``: group advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++) and GRPO's clipped surrogate.
- ``policy``: GSPO, CISPO and the policy losses by name (`policy_loss`).
- ``distill``: per-token reverse KL, forward KL and generalised JSD between student and teacher.
- ``chunked``: log-probs, NLL and entropy of the output head a chunk of rows at a time.
"""

from posttrain.losses.chunked import chunked_logps, chunked_nll

from posttrain.losses.distill import DIVERGENCES, distill_loss, token_divergence
from posttrain.losses.dpo import DPO_LOSS_TYPES, chosen_nll, dpo_loss
from posttrain.losses.preference import (
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    mismatched_indices,
    orpo_loss,
    reward_model_loss,
    simpo_loss,
)
from posttrain.losses.grpo import (
    ADVANTAGE_ESTIMATORS,
    GRPO_ADVANTAGE_SCALES,
    GRPO_AGGREGATIONS,
    grpo_advantages,
    group_advantages,
    grpo_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from posttrain.losses.policy import POLICY_LOSSES, cispo_loss, gspo_loss, policy_loss
from posttrain.losses.rl import (
    KL_ESTIMATORS,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_advantages,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
)
from posttrain.losses.sft import IGNORE_INDEX, next_token_targets, sequence_logps, target_nll, token_nll

__all__ = [
    "IGNORE_INDEX",
    "token_nll",
    "target_nll",
    "next_token_targets",
    "sequence_logps",
    # preference
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "chosen_nll",
    "kto_loss",
    "kto_kl_estimate",
    "mismatched_indices",
    "orpo_loss",
    "log1mexp",
    "simpo_loss",
    "reward_model_loss",
    # rl
    "KL_ESTIMATORS",
    "GRPO_ADVANTAGE_SCALES",
    "GRPO_AGGREGATIONS",
    "masked_mean",
    "masked_var",
    "whiten",
    "entropy_from_logits",
    "kl_penalty",
    "token_rewards",
    "gae",
    "explained_variance",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ppo_advantages",
    # grpo
    "grpo_advantages",
    "zero_variance_groups",
    "grpo_loss",
    "ADVANTAGE_ESTIMATORS",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "group_advantages",
    "POLICY_LOSSES",
    "gspo_loss",
    "cispo_loss",
    "policy_loss",
    # distillation
    "DIVERGENCES",
    "token_divergence",
    "distill_loss",
    # the output head in chunks
    "chunked_logps",
    "chunked_nll",
]
