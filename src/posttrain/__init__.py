"""posttrain: turn a pretrained causal language model into a product."""

import logging as _logging

from posttrain._version import __version__  # noqa: F401

# torchao (pulled in by transformers' quantizer checks) warns at import about CUDA kernels a CPU
# build cannot load, and torch's pytree warns about its enum registration; neither is actionable.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


# The two entry points import their modules when called: `import posttrain` stays light (no torch),
# which keeps `posttrain --help` and the config commands fast.


def load(*args, **kwargs):
    """Load ``(model, tokenizer)``; see :func:`posttrain.models.loading.load`."""
    from posttrain.models.loading import load as _load

    return _load(*args, **kwargs)


def evaluate(*args, **kwargs):
    """Evaluate a model on a suite; see :func:`posttrain.eval.evaluate`."""
    from posttrain.eval import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
