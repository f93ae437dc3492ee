"""What the command line needs besides its commands: the text of `posttrain --help` (one line per
stage, from its module's docstring read without importing it, and per command), the errors a user
can cause, and the optional extras a command needs."""

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


class UsageError(Exception):
    """A command used wrongly; its message says how to use it."""


def _errors() -> tuple:
    """The errors a user can cause: one line on stderr and exit 2 (the traceback with --debug).

    Imported only when an error is being reported: most of these modules pull in torch."""
    from posttrain.cai.constitution import ConstitutionError
    from posttrain.config import ConfigError
    from posttrain.data import DataError
    from posttrain.engine.checkpoint import CheckpointError
    from posttrain.engine.run import RunDirError
    from posttrain.engine.trainer import TrainingError
    from posttrain.models.loading import ModelLoadError
    from posttrain.pipeline import PipelineError
    from posttrain.plan.shapes import PlanError

    errs = [ConfigError, RunDirError, TrainingError, ModelLoadError, CheckpointError, UsageError, FileNotFoundError,
            PipelineError, DataError, PlanError, ConstitutionError]
    try:  # the serve and studio extras (fastapi, uvicorn) may not be installed
        from posttrain.serve.cli import ServeError
        from posttrain.studio.cli import StudioError

        errs += [ServeError, StudioError]
    except ImportError:
        pass
    return tuple(errs)


def _extra(module: str, extra: str):
    """`module` of an optional extra, or a one-line error that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("fastapi", "uvicorn", "starlette"):
            raise UsageError(f"this command needs the {extra} extra: pip install 'posttrain[{extra}]' "
                             f"(missing: {e.name})") from None
        raise
