"""The model card (README.md) of an exported model, from what the runs wrote.

Read, never recomputed: a pipeline's `lineage.json` (stages in order, the base model's and each
stage's measurements) or a single run's `manifest.json`, and each run's `config.yaml` and
`manifest.json` (data hashes, versions, the forgetting guard's evaluations and stop reason).

    lineage = read_lineage("runs/support-bot")    # or a single run directory
    text = model_card(lineage, name="support-bot", license="apache-2.0")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from posttrain.report.runs import drift_verdict


class CardError(ValueError):
    """A directory that is neither a finished run nor a pipeline output."""


@dataclass
class StageInfo:
    name: str
    stage: str
    run_dir: Path
    config: dict
    manifest: dict
    measures: dict = field(default_factory=dict)


@dataclass
class Lineage:
    base_model: str
    stages: list[StageInfo]
    base_measures: dict
    final_model: str          # what to load: a model directory or a run directory
    final_adapter: Optional[str]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: cannot read it ({e})") from None


def _stage_info(name: str, run_dir: Path, measures: Optional[dict] = None) -> StageInfo:
    manifest = _json(run_dir / "manifest.json")
    if manifest.get("status") != "completed":
        raise CardError(f"{run_dir}: the run did not complete (status: {manifest.get('status')}); export a finished run")
    cfg_path = run_dir / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    return StageInfo(name, manifest.get("stage", name), run_dir, config or {}, manifest, dict(measures or {}))


def read_lineage(path) -> Lineage:
    """The stages that made the model in `path`: a pipeline output (lineage.json) or one finished run."""
    d = Path(path)
    if (d / "lineage.json").exists():
        lin = _json(d / "lineage.json")
        done = [(n, e) for n, e in lin.get("stages", {}).items()
                if e.get("status") == "completed" and e.get("stage") != "eval"]
        if not done:
            raise CardError(f"{d}/lineage.json: no completed training stage to export")
        stages = [_stage_info(n, Path(e["output"]["run_dir"]), e.get("measures")) for n, e in done]
        policy = done[-1][1].get("policy") or {}
        return Lineage(lin.get("base_model", {}).get("model") or "", stages,
                       dict((lin.get("base") or {}).get("metrics") or {}),
                       policy.get("model") or str(stages[-1].run_dir), policy.get("adapter"))
    if (d / "manifest.json").exists():
        info = _stage_info(d.name, d)
        base_measures, last = {}, _last_eval(info.manifest)
        if "regression_score" in last and "regression_drop" in last:
            # the guard's reference is the starting model's score: score + drop
            base_measures["regression_score"] = last["regression_score"] + last["regression_drop"]
            info.measures["regression_score"] = last["regression_score"]
        return Lineage(info.manifest.get("base_model") or "", [info], base_measures, str(d), None)
    raise CardError(f"{d} is neither a finished run (manifest.json) nor a pipeline output (lineage.json)")


def _last_eval(manifest: dict) -> dict:
    hist = (manifest.get("result") or {}).get("eval_history") or []
    return hist[-1] if hist else {}


def guard_verdict(info: StageInfo) -> str:
    """One line: what the forgetting guard saw in this run."""
    result = info.manifest.get("result") or {}
    reason = result.get("stop_reason")
    if reason:
        return f"stopped: {reason}"
    limit = ((info.config.get("eval") or {}).get("regression_max_drop"))
    drops = [h["regression_drop"] for h in result.get("eval_history") or [] if "regression_drop" in h]
    drift = result.get("guard")
    if not drops and isinstance(drift, dict) and "drift_kl" in drift:
        return drift_verdict(drift)
    if not drops:
        return "not run (the run's guard was off, eval.guard: off)"
    worst = max(drops)
    within = f"within the limit {limit}" if limit is not None else "no limit set"
    return f"passed: {len(drops)} check(s), largest drop of the regression score {worst:+.3f} ({within})"


def _hub_id(name: str) -> Optional[str]:
    """`name` when it reads like a Hub model id (ORG/NAME) and is not a local path."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name or "") and not Path(name).exists():
        return name
    return None


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(lin: Lineage, *, name: str, license: str = "other", gguf_files: tuple = ()) -> str:
    """README.md: front matter for the Hub, then base, stages and configs, data, evaluation, guard, versions."""
    meta = {"license": license, "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["posttrain", *dict.fromkeys(s.stage for s in lin.stages)]}
    hub_base = _hub_id(lin.base_model)
    if hub_base:
        meta["base_model"] = hub_base
    chain = " → ".join(f"`{s.name}`" + (f" ({s.stage})" if s.stage != s.name else "") for s in lin.stages)
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
           f"Post-trained with posttrain from `{lin.base_model}`: {chain}.", ""]

    out += ["## Training", "", "| # | stage | method | adapter | steps | train time | stop reason |",
            "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(lin.stages, 1):
        res = s.manifest.get("result") or {}
        t = res.get("train_time_s")
        out.append(f"| {i} | {s.name} | {s.stage} | {s.manifest.get('adapter_type', '-')} | {res.get('steps', '-')} | "
                   f"{f'{t:.0f} s' if isinstance(t, (int, float)) else '-'} | {res.get('stop_reason') or '-'} |")
    for s in lin.stages:
        out += ["", f"<details><summary>{s.name}: the resolved config</summary>", "", "```yaml",
                yaml.safe_dump(s.config, sort_keys=False).strip(), "```", "", "</details>"]

    out += ["", "## Data", "", "| stage | source | sha256 |", "|---|---|---|"]
    for s in lin.stages:
        for src, digest in (s.manifest.get("data") or {}).items():
            out.append(f"| {s.name} | `{src}` | `{digest}` |")

    out += ["", "## Evaluation", ""]
    keys = list(dict.fromkeys([*lin.base_measures, *(k for s in lin.stages for k in s.measures)]))
    keys = [k for k in keys if any(isinstance(m.get(k), (int, float)) for m in [lin.base_measures,
                                                                                *(s.measures for s in lin.stages)])]
    if keys:
        final = {}
        for s in lin.stages:
            final.update(s.measures)
        out += ["| measure | base | this model | delta |", "|---|---|---|---|"]
        for k in keys:
            b, f = lin.base_measures.get(k), final.get(k)
            delta = f"{f - b:+.4g}" if isinstance(b, (int, float)) and isinstance(f, (int, float)) else "-"
            out.append(f"| {k} | {_num(b) if b is not None else '-'} | {_num(f) if f is not None else '-'} | {delta} |")
        out += ["", "Base: the starting model measured with the same settings; this model: after the last stage "
                "that measured it."]
    else:
        out.append("No evaluation was recorded (run a pipeline with `eval.measures`, or `eval.regression_every`).")

    out += ["", "## Forgetting guard", ""]
    out += [f"- {s.name}: {guard_verdict(s)}" for s in lin.stages]

    versions = (lin.stages[-1].manifest.get("versions") or {})
    out += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"]
    commit = lin.stages[-1].manifest.get("git_commit")
    if commit:
        out.append(f"(posttrain git commit `{commit}`)")

    out += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```"]
    if gguf_files:
        out += ["", "GGUF (llama.cpp, Ollama): " + ", ".join(f"`{g}`" for g in gguf_files) + "."]
    out += ["", "## Licence", "", f"`{license}`" + (" (set it with `posttrain export --license ID`; the base model's "
                                                    "licence applies to derived weights)" if license == "other" else ""),
            ""]
    return "\n".join(out)
