"""The planner and the adviser: what a run will cost before it starts, and which adaptation to use.

- `shapes`: a decoder's shape from config.json; `devices`: the device table with sources;
- `memory`: peak memory term by term; `speed`: FLOPs and step time;
- `planner`: `posttrain plan` (fits or not, and the cheapest change that makes it fit);
- `quality`: `posttrain data check`; `advise`: `posttrain advise`.
"""

from posttrain.plan.shapes import ModelShape, PlanError, read_shape

__all__ = ["ModelShape", "PlanError", "read_shape"]
