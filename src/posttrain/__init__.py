"""posttrain: turn a pretrained causal language model into a product."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load ``(model, tokenizer)``; see :func:`posttrain.models.loading.load`."""
    from posttrain.models.loading import load as _load

    return _load(*args, **kwargs)
