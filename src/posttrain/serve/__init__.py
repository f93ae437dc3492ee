"""Serving: an OpenAI-compatible HTTP server and a terminal chat over one batching engine.

    posttrain serve MODEL --adapter support=runs/support/model --adapter legal=runs/legal/model
    posttrain chat MODEL --adapter runs/support/model

Requests for different adapters (LoRA, rsLoRA, DoRA, prompt and prefix tuning) share each
forward pass of one base model (`engine.py`, `adapters.py`); `app.py` speaks OpenAI's API.
The HTTP parts need the `serve` extra (``pip install posttrain[serve]``). See docs/serve.md.
"""

from posttrain.serve.adapters import AdapterSet, ServedAdapter
from posttrain.serve.engine import Engine
from posttrain.serve.requests import Delta, Request

__all__ = ["AdapterSet", "Delta", "Engine", "Request", "ServedAdapter"]
