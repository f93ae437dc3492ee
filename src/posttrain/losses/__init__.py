"""Pure loss functions over tensors: the public ``posttrain.losses`` API."""

from posttrain.losses.sft import IGNORE_INDEX, sequence_logps, token_nll

__all__ = ["IGNORE_INDEX", "token_nll", "sequence_logps"]
