"""The text of `posttrain --help`: one line per stage (from its module's docstring, read without
importing it) and per command."""

from __future__ import annotations

import ast
import importlib.util
import re
import textwrap
from pathlib import Path

from posttrain.stages import STAGES

# one line each for `posttrain --help` (else the command function's docstring); the stages' lines
# come from their module docstrings
SUMMARIES = {
    "pipeline": "run a recipe: stages in order with lineage, skip/resume and one report",
    "eval": "evaluate a model on a suite, optionally against a baseline (a CI regression gate)",
    "demo": "post-train the bundled base model offline and print a before/after table",
    "config": "print a stage's resolved config (--doc: with each key's type and description)",
    "merge": "merge an adapter into its base model",
    "export": "a run as a merged HF model + model card (GGUF, --push-to-hub); a checkpoint as HF",
    "adapters": "inspect an adapter (adapters show DIR)",
    "report": "rebuild the HTML report of one or more runs",
    "gym": "export gym tasks (verifiable data in the standard formats)",
    "launch": "run a stage under torchrun, one process per GPU",
    "cai": "constitutional AI data: critique-and-revision rows, RLAIF pairs",
    "plan": "estimate a run before it starts",
    "serve": "an OpenAI-compatible HTTP server over a model and its adapters",
    "chat": "a terminal chat with a model (and an adapter)",
    "data": "check data: quality with origins, rendered examples with their loss tokens, the mask audit",
}


def stage_summary(stage: str) -> str:
    """The first sentence of the stage module's docstring, read without importing the module (no torch)."""
    spec = importlib.util.find_spec(STAGES[stage])
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    para = " ".join(doc.split("\n\n")[0].split())
    para = para.split(": ", 1)[1] if para.startswith("Stage `") and ": " in para else para
    return re.split(r"(?<!\bal)\.\s+(?=[A-Z])", para)[0].rstrip(".")  # the first sentence; "et al. 2024" is not an end


def format_commands(stages, commands: dict, width: int = 100) -> str:
    """`posttrain --help`: every stage and command with one line (a command's summary, else its docstring)."""
    def block(names, line):
        return [f"  {n:<10}" + textwrap.shorten(line(n), width - 12, placeholder=" ...") for n in names]

    head = ["posttrain: post-training for causal language models", "",
            "usage: posttrain COMMAND [ARGS]    (posttrain COMMAND --help: its options; a stage's: every key)",
            "", "training stages (posttrain STAGE [--config FILE] [--resume] [KEY=VALUE ...]):"]
    return "\n".join(head + block(stages, stage_summary) + ["", "other commands:"] +
                     block(commands, lambda n: SUMMARIES.get(n) or (commands[n].__doc__ or "-").strip()) +
                     ["", "docs: README.md and docs/*.md; -V/--version prints the version"])
