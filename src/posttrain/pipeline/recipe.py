"""A pipeline recipe: stages in order, each section validated by that stage's own config schema.

    output_dir: runs/support-bot
    jobs: auto                    # independent stages at once (default 1; pipeline/schedule.py)
    eval: {regression: gym, n: 200, measures: [{measure: task_accuracy, task: instruct}]}
    stages:
      - name: sft                 # free name: the stage's folder and its key in lineage.json
        stage: sft                # any registered training stage, or `eval`
        model: Qwen/Qwen2.5-0.5B  # first stage only (`gym:base` is the bundled model)
        data: {train: data/chats.jsonl}
        adapter: {type: lora, r: 16}
      - name: dpo
        stage: dpo
        start_from: merged        # merged (default) | adapter: how it starts from the previous output
        data: {train: data/prefs.jsonl}

Every key other than the pipeline's own (`name stage model from start_from measures`) belongs to
the stage's config and is validated by its schema, so an error names the stage and the key.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.config import ConfigError, RunConfig, apply_override, parse_value
from posttrain.stages import load_config
from posttrain import stages as registry

# keys a stage entry takes besides its stage's config
PIPELINE_KEYS = ("name", "stage", "model", "from", "start_from", "measures")
# stages that measure or train a side model: they never become the next stage's starting policy
EVAL_STAGE = "eval"
SIDE_STAGES = {"reward"}
BASE = "base"  # `from: base`: start from the recipe's model (a second chain beside the first)
STAGE_REF = re.compile(r"\$\{stages\.([A-Za-z0-9_.-]+)\}")


class RecipeError(ConfigError):
    """A recipe that cannot run; the message names the recipe, the stage and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MeasureSpec(_Strict):
    measure: str = Field(description="A registered measurement (posttrain.pipeline.measures.MEASURES).")
    name: Optional[str] = Field(None, description="Column name in lineage and the report (default: the measure's own).")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the measurement.")


class PipelineEval(_Strict):
    """What is measured on the starting model and after every stage."""

    regression: Optional[str] = Field(
        "gym", description="gym: the bundled plain-text regression set (gym.regression_score); a suite name or YAML "
                           "path: that suite's score (posttrain.eval); null: no regression measurement.")
    n: int = Field(200, gt=0, description="Rows of the regression measurement (the suite's per-task limit).")
    measures: list[MeasureSpec] = Field(default_factory=list, description="Extra measurements after every stage.")
    base: bool = Field(True, description="Measure the starting model too (the reference of every regression delta).")


class EvalStep(_Strict):
    """`stage: eval`: measure the current model on a suite, no training."""

    suite: str = Field("regression", description="Suite name or YAML path.")
    limit: Optional[int] = Field(None, gt=0, description="Rows per task.")


@dataclass
class StageSpec:
    index: int
    name: str
    stage: str
    section: dict  # the stage's own keys, as written (stage references unresolved)
    model: Optional[str] = None
    start_from: Literal["merged", "adapter"] = "merged"
    source: Optional[str] = None  # `from:` an earlier stage's name instead of the previous one
    measures: list[MeasureSpec] = field(default_factory=list)
    cfg: Any = None  # the validated config (RunConfig subclass) or EvalStep

    @property
    def where(self) -> str:
        return f"stage '{self.name}' (stages[{self.index}], stage: {self.stage})"


@dataclass
class Recipe:
    path: str
    output_dir: Path
    eval: PipelineEval
    stages: list[StageSpec]
    raw: dict
    jobs: Union[int, str] = 1  # independent stages at once: a number, or "auto" (pipeline/schedule.py)


def load_recipe(path_or_dict: Union[str, Path, dict], overrides: Optional[list[str]] = None) -> Recipe:
    """Read and validate a recipe; `overrides` look like `output_dir=DIR` or `NAME.train.lr=1e-4`."""
    if isinstance(path_or_dict, dict):
        raw, src = copy.deepcopy(path_or_dict), "recipe"
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise RecipeError(f"recipe not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML: {e}") from None
        src = str(p)
    if not isinstance(raw, dict):
        raise RecipeError(f"{src}: the top level must be a mapping with output_dir and stages")
    unknown = set(raw) - set(TOP_KEYS)
    for k in sorted(unknown):
        raise RecipeError(f"{src}: unknown top-level key '{k}'{_near(k, list(TOP_KEYS))}")
    _apply_overrides(raw, overrides or [], src)
    jobs = parse_jobs(raw.get("jobs", 1), f"{src}: jobs")
    if not raw.get("output_dir"):
        raise RecipeError(f"{src}: output_dir is required (where every stage's folder and lineage.json go)")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{src}: stages must be a non-empty list of stage sections")
    try:
        ev = PipelineEval.model_validate(raw.get("eval") or {})
    except ValidationError as e:
        raise RecipeError(f"{src}: eval: {_first_error(e)}") from None
    specs = [_stage_spec(i, s, src) for i, s in enumerate(stages_raw)]
    _check_graph(specs, src)
    for s in specs:
        _validate_section(s, src)
    return Recipe(path=src, output_dir=Path(raw["output_dir"]), eval=ev, stages=specs, raw=raw, jobs=jobs)


TOP_KEYS = ("output_dir", "jobs", "eval", "stages")


def parse_jobs(value: Any, where: str) -> Union[int, str]:
    """`jobs`: a whole number >= 1 or "auto"; anything else is a RecipeError naming `where`."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{where} must be a whole number >= 1 or auto, got {value!r}")
    return value


def _apply_overrides(raw: dict, overrides: list[str], src: str) -> None:
    names = {s.get("name"): s for s in raw.get("stages") or [] if isinstance(s, dict)}
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"override '{ov}' must look like output_dir=DIR or STAGE_NAME.key=value")
        k, v = (x.strip() for x in ov.split("=", 1))
        if k in ("output_dir", "jobs") or k.startswith("eval."):
            apply_override(raw, k, parse_value(v))
            continue
        name, _, rest = k.partition(".")
        if name not in names or not rest:
            raise RecipeError(f"{src}: override '{k}' names no stage{_near(name, list(names))}; stages: "
                              f"{', '.join(map(str, names))}")
        apply_override(names[name], rest, parse_value(v))


def _stage_spec(i: int, s: Any, src: str) -> StageSpec:
    if not isinstance(s, dict):
        raise RecipeError(f"{src}: stages[{i}] must be a mapping with at least `name` and `stage`")
    for k in ("name", "stage"):
        if not s.get(k):
            raise RecipeError(f"{src}: stages[{i}] has no `{k}`")
    name, stage = str(s["name"]), str(s["stage"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RecipeError(f"{src}: stages[{i}] name '{name}' must use letters, digits, '_', '-' or '.' (it is a folder)")

    known = sorted(set(registry.STAGES) | {EVAL_STAGE})
    if stage not in known:
        raise RecipeError(f"{src}: stages[{i}] (name '{name}'): unknown stage '{stage}'{_near(stage, known)}; "
                          f"known stages: {', '.join(known)}")
    section = {k: v for k, v in s.items() if k not in PIPELINE_KEYS}
    try:
        measures = [MeasureSpec.model_validate(m if isinstance(m, dict) else {"measure": m})
                    for m in s.get("measures") or []]
    except ValidationError as e:
        raise RecipeError(f"{src}: stage '{name}' (stages[{i}]): measures: {_first_error(e)}") from None
    start_from = s.get("start_from", "merged")
    if start_from not in ("merged", "adapter"):
        raise RecipeError(f"{src}: stage '{name}' (stages[{i}]): start_from must be merged or adapter, got {start_from!r}")
    return StageSpec(index=i, name=name, stage=stage, section=section, model=s.get("model"), start_from=start_from,
                     source=s.get("from"), measures=measures)


def _check_graph(specs: list[StageSpec], src: str) -> None:
    seen: dict[str, StageSpec] = {}
    for s in specs:
        if s.name in seen:
            raise RecipeError(f"{src}: two stages are named '{s.name}' (stages[{seen[s.name].index}] and "
                              f"stages[{s.index}]); names must be unique (they are folders)")
        if s.index == 0:
            if not s.model:
                raise RecipeError(f"{src}: {s.where}: the first stage needs `model` (a local HF directory, a hub "
                                  "name, or gym:base)")
            if s.source:
                raise RecipeError(f"{src}: {s.where}: the first stage has nothing to start `from`")
        elif s.model:
            raise RecipeError(f"{src}: {s.where}: only the first stage names a model; this one starts from the "
                              f"previous stage's output (use `from: NAME` to start from another earlier stage)")
        if s.name == BASE:
            raise RecipeError(f"{src}: {s.where}: '{BASE}' is reserved for the recipe's starting model; rename "
                              "the stage")
        if s.source is not None and s.source != BASE:
            if s.source not in seen:
                raise RecipeError(f"{src}: {s.where}: from '{s.source}' names no earlier stage"
                                  f"{_near(s.source, list(seen))}")
            if seen[s.source].stage in SIDE_STAGES | {EVAL_STAGE}:
                raise RecipeError(f"{src}: {s.where}: from '{s.source}': a {seen[s.source].stage} stage's output is "
                                  "not a policy to train further")
        for ref in stage_refs(s.section):
            if ref not in seen:
                raise RecipeError(f"{src}: {s.where}: ${{stages.{ref}}} names no earlier stage{_near(ref, list(seen))}")
        seen[s.name] = s


def stage_refs(tree: Any) -> list[str]:
    """Names in `${stages.NAME}` references (another stage's published model directory)."""
    if isinstance(tree, dict):
        return [r for v in tree.values() for r in stage_refs(v)]
    if isinstance(tree, list):
        return [r for v in tree for r in stage_refs(v)]
    return STAGE_REF.findall(tree) if isinstance(tree, str) else []


def substitute(tree: Any, values: dict[str, str]) -> Any:
    if isinstance(tree, dict):
        return {k: substitute(v, values) for k, v in tree.items()}
    if isinstance(tree, list):
        return [substitute(v, values) for v in tree]
    if isinstance(tree, str):
        return STAGE_REF.sub(lambda m: values[m.group(1)], tree)
    return tree


def _validate_section(s: StageSpec, src: str) -> None:
    """Validate with placeholders for what the pipeline fills in (model, output_dir, stage references)."""
    if s.stage == EVAL_STAGE:
        try:
            s.cfg = EvalStep.model_validate(s.section)
        except ValidationError as e:
            raise RecipeError(f"{src}: {s.where}: {_first_error(e)}") from None
        return
    if "output_dir" in s.section:
        raise RecipeError(f"{src}: {s.where}: output_dir is set by the pipeline (<output_dir>/{s.name}); remove it")
    tree = substitute(s.section, {r: f"<output of {r}>" for r in stage_refs(s.section)})
    tree.update(model=s.model or "<previous stage's output>", output_dir=f"<pipeline>/{s.name}")
    s.cfg = build_stage_config(s, tree, src)


def build_stage_config(s: StageSpec, tree: dict, src: str) -> RunConfig:
    try:
        return load_config(s.stage, base=tree)
    except ConfigError as e:
        msg = str(e).replace("invalid configuration (defaults):", "").strip()
        raise RecipeError(f"{src}: {s.where}: {msg}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"unknown key '{loc}'" if err["type"] == "extra_forbidden" else f"{loc}: {err['msg']}"


def _near(word: str, choices: list) -> str:
    best = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{best[0]}'?)" if best else ""


# ---------------------------------------------------------------- stage order

# the known-good order: continued pretraining, SFT, preference / RL, safety last
ORDER_RANK = {"cpt": 0, "sft": 1, "dpo": 2, "kto": 2, "orpo": 2, "simpo": 2, "ppo": 2, "grpo": 2, "safety": 3}
PREFERENCE = {"dpo", "kto", "orpo", "simpo", "ppo", "grpo"}
UNDOES = {
    ("cpt", "sft"): "continued pretraining on raw text erodes the chat format and instruction following that SFT taught",
    ("cpt", "preference"): "continued pretraining on raw text erodes the preferences learnt after SFT",
    ("sft", "preference"): "SFT pulls the model back toward its demonstrations and erases the preference margins",
    ("any", "safety"): "training after safety fine-tuning can undo refusals (fine-tuning removes safety alignment, "
                       "Qi et al. 2023)",
}


def order_warnings(recipe: Recipe) -> list[str]:
    """Stage-order problems against the known-good order cpt -> sft -> preference/RL -> safety."""
    out: list[str] = []
    chain: dict[str, list[StageSpec]] = {}  # each stage's ancestry along `from` / previous-stage links
    prev_policy: Optional[str] = None
    for s in recipe.stages:
        if s.stage == EVAL_STAGE or s.stage in SIDE_STAGES:
            chain[s.name] = chain.get(prev_policy, []) if prev_policy else []
            continue
        parent = None if s.source == BASE else (s.source or prev_policy)
        before = chain.get(parent, []) if parent else []
        if s.stage in PREFERENCE and not any(a.stage == "sft" for a in before):
            out.append(f"stage '{s.name}' ({s.stage}) runs before any SFT stage: preference optimization and RL expect "
                       "a model that already follows the chat format (known-good order: cpt -> sft -> "
                       "preference -> safety)")
        for a in before:
            ra, rs = ORDER_RANK.get(a.stage), ORDER_RANK.get(s.stage)
            if ra is None or rs is None or rs >= ra:
                continue
            what = "preference" if a.stage in PREFERENCE else a.stage
            reason = UNDOES.get((s.stage, what)) or UNDOES.get(("any", what)) or "it comes later in the known-good order"
            out.append(f"stage '{s.name}' ({s.stage}) runs after '{a.name}' ({a.stage}) and would undo it: {reason}")
        chain[s.name] = before + [s]
        prev_policy = s.name
    return out
