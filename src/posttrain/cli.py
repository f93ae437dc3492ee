"""`posttrain <command>`: parse arguments, load the config, dispatch.

`posttrain --help` lists the commands (stage summaries come from the stage modules' docstrings);
`posttrain STAGE --help` lists every config key (posttrain.config_doc reads the schemas).

Each command imports what it runs inside its function: torch, transformers and a stage's modules
take seconds to import, and `posttrain --help` or a usage error needs none of them.

    posttrain sft --config run.yaml train.lr=1e-4
    posttrain sft model=DIR data.train=chats.jsonl output_dir=runs/a
    posttrain cpt model=DIR data.train=corpus.jsonl
    posttrain demo [--out DIR] [--stages base,sft] [--jobs N|auto] [--forgetting]
    posttrain eval --model M [--adapter A] --suite regression [--baseline BASE] [--fail-on-regression]
    posttrain gym export --task instruct --split train --out train.jsonl
    posttrain report RUN_DIR [RUN_DIR ...] [--out report.html]
    posttrain merge --model BASE --adapter A --out DIR
    posttrain export RUN_DIR/checkpoints/step-N --out DIR   # checkpoint -> HF model / PEFT adapter
    posttrain launch --nproc N sft ...                      # torchrun, one process per GPU
    posttrain adapters show A
    posttrain config STAGE [--doc]  # print the defaults of a stage's config (--doc: commented)
    posttrain pipeline recipe.yaml [STAGE.key=value ...] [--only a,b] [--jobs N|auto] [--dry-run]
    posttrain cai critique|compare --model M --prompts P --constitution C --out F
    posttrain serve MODEL [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    posttrain chat MODEL [--adapter DIR]
    posttrain studio [--runs DIR] [--host 127.0.0.1] [--port 7860] [--api-key KEY]
    posttrain plan --config run.yaml [key=value ...] [--device H100-80GB] [--gpus N] [--json]
    posttrain data check data.train=D [data.eval=E] [model=M] [--json]
    posttrain advise model=M data.train=D data.eval=E [--budget 1xA100-40GB,8h] [--pilot-minutes N | --no-pilots] [--json] [--out DIR]
    posttrain data inspect CONFIG [key=value ...] [--show N] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posttrain import cli_help
from posttrain.cli_help import UsageError, _errors, _extra
from posttrain.engine.launch import torchrun_command


def _train_stages() -> tuple[str, ...]:
    from posttrain.stages import STAGES

    return tuple(STAGES)


def _train_parser(stage: str, argv: list[str] = ()) -> argparse.ArgumentParser:
    epilog = None
    if "-h" in argv or "--help" in argv:  # the key list needs the stage's schema: built only when asked
        from posttrain.config_doc import format_help
        from posttrain.stages import schema

        epilog = "config keys (KEY=VALUE on the command line, nested in --config YAML):\n\n" + \
            format_help(schema(stage))
    p = argparse.ArgumentParser(prog=f"posttrain {stage}", description=f"Run the `{stage}` stage: "
                                f"{cli_help.stage_summary(stage)}", epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="let --resume load a checkpoint whose files could run code (docs/security.md, Checkpoints)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    return p


def cmd_train(stage: str, argv: list[str]) -> int:
    from posttrain import stages
    from posttrain.stages import load_config

    args = _train_parser(stage, argv).parse_args(argv)
    cfg = load_config(stage, args.config, args.overrides)
    if not cfg.model:
        raise UsageError(f"no model given: add model=DIR (a local Hugging Face directory, a finished run or a hub "
                         f"name), e.g. `posttrain {stage} model=$(python -c 'import posttrain.gym as g; "
                         f"print(g.base_model_path())') ...`; `posttrain {stage} --help` lists every key")
    from posttrain.engine.dist import is_main, shutdown

    try:
        # passed only when given: a stage takes it once its engine hands it to load_checkpoint
        trust = {"trust_checkpoint": True} if args.trust_checkpoint else {}
        res = stages.get(stage).run(cfg, resume=args.resume, **trust)
        main = is_main()  # asked before the process group is gone, when every rank is "rank 0"
    finally:
        shutdown()
    if main:
        reason = res.result.get("stop_reason")
        if reason and "guard" in reason:  # one line: stopped, why, whose weights were published
            print(f"posttrain: {stage} stopped at step {res.result['steps']} by the {reason}; published "
                  f"{res.model_dir}")
        else:
            print(f"posttrain: {stage} finished: {res.model_dir}")
    return 0


def cmd_launch(argv: list[str]) -> int:
    """`posttrain launch --nproc N [torchrun flags] STAGE [args]`: a thin wrapper over torchrun."""
    import subprocess

    stages = set(_train_stages())
    split = next((i for i, a in enumerate(argv) if a in stages), None)
    if split is None:
        raise UsageError("usage: posttrain launch --nproc N [--nnodes M --node-rank R --master-addr A "
                         f"--master-port P] STAGE [args]; STAGE is one of {', '.join(sorted(stages))}")
    p = argparse.ArgumentParser(prog="posttrain launch")
    p.add_argument("--nproc", type=int, required=True, help="processes per node (GPUs per node)")
    p.add_argument("--nnodes", default="1")
    p.add_argument("--node-rank", default="0")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", default="29500")
    a = p.parse_args(argv[:split])
    # one node: the rendezvous store listens on 127.0.0.1 only (torchrun's own binds every interface)
    cmd, env = torchrun_command(a.nproc, a.nnodes, a.node_rank, a.master_addr, a.master_port,
                                ["-m", "posttrain", *argv[split:]])
    return subprocess.call(cmd, env=env)


def cmd_config(argv: list[str]) -> int:
    from posttrain.config import dump_config
    from posttrain.stages import load_config

    p = argparse.ArgumentParser(prog="posttrain config", description="Print a stage's resolved config.")
    p.add_argument("stage", choices=list(_train_stages()))
    p.add_argument("--config", "-c")
    p.add_argument("--doc", action="store_true", help="as YAML with each key's type and description as a comment")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)  # --doc may come after the overrides or between them
    cfg = load_config(a.stage, a.config, a.overrides)
    if a.doc:
        from posttrain.config_doc import format_yaml_doc

        print(format_yaml_doc(cfg), end="")
        return 0
    print(dump_config(cfg), end="")
    return 0


def cmd_gym(argv: list[str]) -> int:
    from posttrain import gym

    p = argparse.ArgumentParser(prog="posttrain gym", description="Gym tasks with verifiable answers.")
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export", help="write a task split as JSONL in the standard formats")
    e.add_argument("--task", required=True, choices=list(gym.TASKS))
    e.add_argument("--split", default="train", choices=["train", "validation", "test"])
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=None, help="number of rows (default: the split's size)")
    sub.add_parser("list", help="list the tasks")
    a = p.parse_args(argv)
    if a.action == "list":
        for t in gym.TASKS:
            print(t)
        return 0
    path = gym.export(a.task, a.split, a.out, n=a.n)
    print(f"posttrain: wrote {path}")
    return 0


def cmd_report(argv: list[str]) -> int:
    from posttrain.report import build_report

    p = argparse.ArgumentParser(prog="posttrain report", description="Rebuild the HTML report of one or more runs.")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    for r in a.runs:
        if not (Path(r) / "metrics.jsonl").exists() and not (Path(r) / "summary.json").exists():
            raise UsageError(f"{r} is not a run directory (no metrics.jsonl)")
    print(f"posttrain: wrote {build_report([Path(r) for r in a.runs], a.out, title=a.title)}")
    return 0


def cmd_merge(argv: list[str]) -> int:
    from posttrain.models import adapters

    p = argparse.ArgumentParser(prog="posttrain merge", description="Merge an adapter into its base model.")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    print(f"posttrain: wrote {adapters.merge_to_dir(a.model, a.adapter, a.out)}")
    return 0


def cmd_export(argv: list[str]) -> int:
    from posttrain.engine.export import export_checkpoint

    p = argparse.ArgumentParser(prog="posttrain export",
                                description="Export a finished run or pipeline output as a merged HF model with a "
                                "model card (README.md), optionally GGUF and a Hub upload; or write a training "
                                "checkpoint as an HF model (or PEFT adapter).")
    p.add_argument("checkpoint", help="a finished run or pipeline output directory, or RUN_DIR/checkpoints/step-N")
    p.add_argument("--out", required=True)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint whose files could run code (docs/security.md, Checkpoints)")
    p.add_argument("--gguf", action="append", choices=["f16", "q8_0"], default=[],
                   help="also write model-TYPE.gguf for llama.cpp/Ollama (repeatable; llama and qwen2 models)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this Hub model repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--license", default="other", help="licence id for the model card (default: other)")
    a = p.parse_args(argv)
    if not (Path(a.checkpoint) / "weights").is_dir():  # a run or pipeline output, not a checkpoint
        from posttrain.export import ExportError, export_run

        try:
            res = export_run(a.checkpoint, a.out, gguf=tuple(a.gguf), push_to_hub=a.push_to_hub, private=a.private,
                             license=a.license)
        except ExportError as e:
            raise UsageError(str(e)) from None
        print(f"posttrain: wrote {res['out']} ({', '.join(res['files'])})" +
              (f"; uploaded: {res['url']}" if res["url"] else ""))
        return 0
    print(f"posttrain: wrote {export_checkpoint(a.checkpoint, a.out, trust_checkpoint=a.trust_checkpoint)}")
    return 0


def cmd_adapters(argv: list[str]) -> int:
    from posttrain.models import adapters

    p = argparse.ArgumentParser(prog="posttrain adapters", description="Inspect adapters.")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("show")
    s.add_argument("adapter")
    a = p.parse_args(argv)
    print(adapters.format_description(adapters.describe(a.adapter)))
    return 0


def cmd_eval(argv: list[str]) -> int:
    from posttrain.eval.cli import main as eval_main

    return eval_main(argv)


def cmd_demo(argv: list[str]) -> int:
    from posttrain.pipeline import demo

    return demo.main(argv)


def cmd_pipeline(argv: list[str]) -> int:
    from posttrain.pipeline import main as pipeline_main

    return pipeline_main(argv)


def cmd_cai(argv: list[str]) -> int:
    from posttrain.cai import main as cai_main

    return cai_main(argv)


def cmd_plan(argv: list[str]) -> int:
    from posttrain.plan.cli import main as plan_main

    return plan_main(argv)


def cmd_data_inspect(argv: list[str]) -> int:
    """`posttrain data inspect CONFIG [key=value ...]`: a rendered example with its loss tokens marked,
    the counts, and the loss-mask / template audit (exit 1 on a violation). See docs/data.md."""
    from posttrain.data.audit import inspect
    from posttrain.models.loading import load_tokenizer
    from posttrain.stages import load_config

    p = argparse.ArgumentParser(prog="posttrain data inspect", description=cmd_data_inspect.__doc__)
    p.add_argument("config", help="a run's YAML config (its data.* keys and model or tokenizer)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for a stage")
    p.add_argument("--stage", default="sft", help="the stage whose config schema reads the file (default: sft)")
    p.add_argument("--show", type=int, default=1, help="examples to print rendered (default: 1)")
    p.add_argument("--limit", type=int, help="audit only the first N rows")
    a = p.parse_intermixed_args(argv)
    cfg = load_config(a.stage, a.config, a.overrides)
    if not (cfg.tokenizer or cfg.model):
        raise UsageError("posttrain data inspect: the config names no model or tokenizer to render with")
    tok = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    return 1 if inspect(cfg.data, tok, show=a.show, limit=a.limit).violations else 0


def cmd_data(argv: list[str]) -> int:
    """`posttrain data check ...`: data quality with origins (more actions may join it)."""
    from posttrain.plan.cli import data_check_main

    actions = {"check": data_check_main, "inspect": cmd_data_inspect}
    if not argv or argv[0] not in actions:
        raise UsageError(f"usage: posttrain data {{{','.join(actions)}}} ...")
    return actions[argv[0]](argv[1:])


def cmd_serve(argv: list[str]) -> int:
    return _extra("posttrain.serve.cli", "serve").serve_main(argv)


def cmd_chat(argv: list[str]) -> int:
    return _extra("posttrain.serve.cli", "serve").chat_main(argv)


def cmd_studio(argv: list[str]) -> int:
    """A local web app: runs, live curves, compare, a launch form, a playground (docs/studio.md)."""
    return _extra("posttrain.studio.cli", "studio").studio_main(argv)


def cmd_advise(argv: list[str]) -> int:
    """Which adaptation for this model and data (prompting, prompt/prefix tuning, LoRA, QLoRA, full, CPT+SFT)."""
    from posttrain.plan.cli import advise_main

    return advise_main(argv)


COMMANDS = {
    "launch": cmd_launch,
    "config": cmd_config,
    "gym": cmd_gym,
    "report": cmd_report,
    "merge": cmd_merge,
    "export": cmd_export,
    "adapters": cmd_adapters,
    "demo": cmd_demo,
    "eval": cmd_eval,
    "pipeline": cmd_pipeline,
    "cai": cmd_cai,
    "serve": cmd_serve,
    "chat": cmd_chat,
    "studio": cmd_studio,
    "plan": cmd_plan,
    "data": cmd_data,
    "advise": cmd_advise,
}


def format_commands(width: int = 100) -> str:
    """`posttrain --help`: every command with one line (posttrain.cli_help)."""
    return cli_help.format_commands(_train_stages(), COMMANDS, width)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # a global flag: our errors then show their traceback too
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(format_commands())
        return 0
    if argv[0] in ("-V", "--version"):
        import posttrain

        print(posttrain.__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in _train_stages():
            return cmd_train(cmd, rest)
        if cmd in COMMANDS:
            return COMMANDS[cmd](rest)
        import difflib

        near = difflib.get_close_matches(cmd, list(_train_stages()) + list(COMMANDS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        print(f"posttrain: error: unknown command '{cmd}'{hint}", file=sys.stderr)
        return 2
    except _errors() as e:
        if debug:
            raise
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
