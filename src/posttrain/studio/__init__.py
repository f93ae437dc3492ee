"""posttrain studio: a local web app over a folder of runs (see docs/studio.md).

Pages: Runs (every run with its status, stage, model, start, duration, headline metrics and the
forgetting guard's verdict), a run (live curves that follow ``metrics.jsonl``, config, data
audit, eval results), Compare (runs and eval results side by side, deltas ± standard errors,
the base model as a column), Launch (a form generated from a stage's typed config schema; runs
start as ``posttrain STAGE key=value ...`` subprocesses, never through a shell) and Playground
(the base model and an adapter answering side by side through the serving engine).

This is the top application layer: it imports anything and nothing imports it.
"""
