"""`posttrain advise --no-pilots`: which adaptation for this model and this data, from measurements of the
data and the base model, the planner, and documented rules of thumb (docs/advise.md cites each one).

    report = advise(cfg, budget=parse_budget("1xA100-40GB,8h"), out_dir="advice")
    report["recommendation"]   # prompting | prompt_tuning | prefix_tuning | lora | qlora | full | cpt+sft

What is measured on the base model (teacher-forced, no training):
- answer loss: mean NLL per answer token of the training examples, as training renders and masks them;
- general loss: the same on general text (`--general`, default the gym's plain-text regression set);
  the domain gap is answer loss minus general loss, in nats per token;
- already predicted: the share of answer tokens that are the base model's top-1 prediction (format
  and style a model can pick up from a prompt, against knowledge it does not have).

The measurements themselves live in `plan/baselines.py`; their data and model code (torch,
transformers) is imported inside the functions that measure with a model, so `--no-pilots` from the
planner and the data alone stays light.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Optional

import yaml

from posttrain.plan.baselines import analyse_data, is_correct, prompt_answer_pairs, prompt_text
from posttrain.plan.devices import Device, cpu_device, get_device
from posttrain.plan.memory import adapter_params
from posttrain.plan.pilots import binomial_noise
from posttrain.plan.planner import plan
from posttrain.plan.shapes import PlanError

METHODS = ("prompting", "prompt_tuning", "prefix_tuning", "lora", "qlora", "full", "cpt+sft")

# rules of thumb; thresholds named here so docs/advise.md and the code say the same
ALREADY_KNOWN = 0.9  # share of answer tokens the base predicts: prompting is enough
PROMPTING_GOOD = 0.9  # measured zero/k-shot accuracy on held-out examples: prompting is enough
STYLE_ONLY = 0.6  # ... mostly format/style: a prompt or prefix is enough to learn it
LITTLE_DATA = 1_000  # examples: prompt/prefix tuning for style
LORA_DATA = 100_000  # examples: below, LoRA matches full fine-tuning and forgets less
DOMAIN_GAP = 1.5  # nats/token above general text: continued pretraining first
PROMPT_TUNING_SCALE = 1e9  # parameters: prompt tuning lags full fine-tuning below this (prefix tuning instead)

# (low, high) peak learning rates as the cited papers used them; docs/advise.md gives the sources
LEARNING_RATES = {"full": (1e-5, 2e-5), "lora": (1e-4, 2e-4), "qlora": (1e-4, 2e-4), "prompt_tuning": (3e-2, 3e-1),
                  "prefix_tuning": (5e-5, 1e-4), "cpt+sft": (1e-5, 2e-4)}
LR_REFERENCE_PARAMS = 6e9  # non-embedding parameters at and above which the table stands (Llama-2-7B: 6.5e9)
UNSCALED = ("prompt_tuning",)  # Lester et al. 2021 use 0.3 at every model size


def kaplan_lr(non_embedding_params: float) -> float:
    """The learning rate that trained best at each size in Kaplan et al. 2020 (eq. D.1):
    LR(N) = 0.003239 - 0.0001395 log N, N the non-embedding parameters."""
    return 0.003239 - 0.0001395 * math.log(non_embedding_params)


def learning_rates(shape) -> dict[str, tuple[float, float]]:
    """The table's ranges scaled by LR(N) / LR(7B) (Kaplan et al. 2020): a smaller model takes larger
    steps (the bundled model, 1.7M non-embedding parameters: x12.6); at 7B and above the table stands."""
    n = shape.linear_params + shape.norm_params
    ref = kaplan_lr(LR_REFERENCE_PARAMS)
    scale = max(1.0, kaplan_lr(n) / ref) if n < LR_REFERENCE_PARAMS else 1.0
    two = lambda x: float(f"{x:.2g}")  # noqa: E731  (a recipe's learning rate, to two digits)
    out = {m: (lo, hi) if m in UNSCALED else (two(lo * scale), two(hi * scale)) for m, (lo, hi) in LEARNING_RATES.items()}
    # continued pretraining goes on at the pretraining rate of the model's size (LR(N) itself, at
    # least full fine-tuning's): new knowledge has to be written into the weights, not nudged
    top = max(kaplan_lr(n), out["full"][1])
    out["cpt"] = (two(top / 2), two(top))
    return out


FORGETTING = {"prompting": "none", "prompt_tuning": "low", "prefix_tuning": "low", "lora": "low",
              "qlora": "low", "full": "high", "cpt+sft": "high"}
SERVING = {"prompting": "the base model as is, with the prompt",
           "prompt_tuning": "base + PEFT prompt adapter (posttrain.load, PEFT; vLLM does not serve it)",
           "prefix_tuning": "base + PEFT prefix adapter (posttrain.load, PEFT; vLLM does not serve it)",
           "lora": "base + LoRA adapter (vLLM --enable-lora) or merged (posttrain merge)",
           "qlora": "merged into a 16-bit base (posttrain merge), or base + LoRA adapter",
           "full": "a new full model", "cpt+sft": "a new full model (or merged adapters)"}
ADAPTER_OF = {"prompting": None, "prompt_tuning": "prompt", "prefix_tuning": "prefix", "lora": "lora",
              "qlora": "qlora", "full": "none", "cpt+sft": "lora"}


@dataclasses.dataclass
class Budget:
    device: Device
    gpus: int = 1
    hours: Optional[float] = None


def parse_budget(text: Optional[str]) -> Budget:
    """'1xA100-40GB,8h' -> 1 A100-40GB for 8 hours; 'cpu,30m'; 'cpu,300MiB' (a memory limit); None ->
    this machine, no time limit."""
    if not text:
        return Budget(cpu_device())
    gpus, dev, hours, memory = 1, None, None, None
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(h|m|min)", part)
        if m:
            hours = float(m.group(1)) / (60 if m.group(2) != "h" else 1)
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(MiB|GiB|MB|GB)", part)
        if m:
            memory = int(float(m.group(1)) * {"MiB": 2**20, "GiB": 2**30, "MB": 10**6, "GB": 10**9}[m.group(2)])
            continue
        if re.fullmatch(r"[\d.]+\s*[A-Za-z]*", part):  # a number that is neither a time nor a memory
            raise PlanError(f"--budget {text!r}: {part!r} is neither a time (8h, 30m) nor a memory limit "
                            "(300MiB, 2GiB, 500MB, 20GB)")
        m = re.fullmatch(r"(?:(\d+)\s*x\s*)?(.+)", part)
        gpus, name = int(m.group(1) or 1), m.group(2)
        try:
            dev = get_device(name)
        except KeyError as e:
            raise PlanError(f"--budget {text!r}: {e.args[0]}") from None
    if dev is None:
        raise PlanError(f"--budget {text!r}: name a device, e.g. '1xA100-40GB,8h' or 'cpu,30m'")
    if memory is not None:  # a memory limit below the device's (a share of a GPU, a container's limit)
        dev = dataclasses.replace(dev, memory_bytes=memory)
    return Budget(dev, gpus, hours)


# ---------------------------------------------------------------- candidates and the decision


def _candidate(cfg, method: str, budget: Budget, rows: int, loss_fraction: float, lrs: dict) -> dict:
    kind = ADAPTER_OF[method]
    out = {"method": method, "expected_score": None, "forgetting_risk": FORGETTING[method],
           "serving": SERVING[method], "learning_rate": lrs.get(method)}
    if kind is None:  # prompting: inference only; its score is measured, not predicted
        from posttrain.plan.shapes import read_shape

        s = read_shape(cfg.model)
        out.update(peak_memory_bytes=s.total_params * 2, fits=s.total_params * 2 <= 0.95 * budget.device.memory_bytes,
                   wall_time_s=0.0, tokens_per_s=None, adapter_bytes=0, trainable_params=0, change=None,
                   step_time_s=None, total_steps=0)
        return out
    ov = {"adapter": {**cfg.adapter.model_dump(), "type": kind},
          "train": {**cfg.train.model_dump(), "precision": "bf16" if budget.device.kind == "gpu" else "fp32"}}
    c = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update=ov["adapter"]),
                               "train": cfg.train.model_copy(update=ov["train"])})
    p = plan(c, budget.device, gpus=budget.gpus, rows=rows, loss_fraction=loss_fraction)
    change = None
    peak = p.memory.peak_bytes
    step = p.step_time_s
    if not p.fits and p.fix and p.fix["load_fits"] and "adapter.type" not in p.fix["change"]:
        # a method change is a different candidate, not a fix of this one
        change, peak, step = p.fix["change"], p.fix["peak_memory_bytes"], p.fix["step_time_s"]
    fits = p.fits or change is not None
    wall = None if p.total_steps is None else p.total_steps * step * (2 if method == "cpt+sft" else 1)
    out.update(peak_memory_bytes=int(peak), fits=fits, change=change, wall_time_s=wall, step_time_s=step,
               total_steps=p.total_steps,
               tokens_per_s=p.tokens_per_step / step, trainable_params=p.to_json()["params"]["trainable"],
               adapter_bytes=4 * adapter_params(p.shape, p.spec) if kind != "none" else None)
    return out


def decide(data: dict, candidates: dict[str, dict], *, params: int, domain_text: bool) -> tuple[str, list[str]]:
    """The recommendation and its reasons, from the rules of thumb in docs/advise.md (in this order)."""
    fits = {m for m, c in candidates.items() if c["fits"]}
    n, known, gap = data["examples"], data["already_predicted"], data["domain_gap_nats"]
    reasons = [f"{n} examples; the base model already predicts {known:.0%} of the answer tokens; "
               f"answer loss {data['answer_nll']:.2f} vs general text {data['general_nll']:.2f} nats/token "
               f"(gap {gap:+.2f})"]
    base = data.get("baselines") or {}
    if base.get("k_shot") is not None:
        reasons.append(f"prompting measured on {base['n']} held-out examples: zero-shot {base['zero_shot']:.0%}, "
                       f"{base['k']}-shot {base['k_shot']:.0%}")
        if max(base["k_shot"], base["zero_shot"]) >= PROMPTING_GOOD:
            return "prompting", reasons + [f"rule 1: prompting already scores >= {PROMPTING_GOOD:.0%} on held-out "
                                           "examples; nothing to train, nothing forgotten"]
    if known >= ALREADY_KNOWN:
        return "prompting", reasons + [f"rule 1: at least {ALREADY_KNOWN:.0%} of the answers is predicted already; "
                                       "a prompt (few-shot examples) is enough, and nothing is forgotten"]
    if gap >= DOMAIN_GAP and domain_text and "cpt+sft" in fits:
        return "cpt+sft", reasons + [f"rule 2: the answers are {gap:.1f} nats/token harder than general text "
                                     "(a new domain): continued pretraining on domain text first, then SFT"]
    if gap >= DOMAIN_GAP and not domain_text:
        reasons.append(f"the domain gap is large ({gap:.1f} nats/token): with domain text (--domain-text) "
                       "continued pretraining then SFT would be advised")
    if n < LITTLE_DATA and known >= STYLE_ONLY:
        pick = "prompt_tuning" if params >= PROMPT_TUNING_SCALE else "prefix_tuning"
        if pick in fits:
            return pick, reasons + [f"rule 3: little data (< {LITTLE_DATA}) and mostly format/style "
                                    f"(>= {STYLE_ONLY:.0%} already predicted): {pick.replace('_', ' ')}"
                                    + ("" if pick == "prompt_tuning" else
                                       f" (prompt tuning lags below {PROMPT_TUNING_SCALE:.0e} parameters)")]
    if n >= LORA_DATA and "full" in fits:
        return "full", reasons + [f"rule 4: {n} examples (>= {LORA_DATA}) and full fine-tuning fits: "
                                  "with this much data full fine-tuning learns more than LoRA"]
    if "lora" in fits:
        return "lora", reasons + [f"rule 5: fewer than {LORA_DATA} examples: LoRA matches full fine-tuning "
                                  "and forgets less"]
    if "qlora" in fits:
        return "qlora", reasons + ["rule 6: LoRA does not fit the budget's memory, QLoRA (NF4 base) does"]
    if "prompt_tuning" in fits:
        return "prompt_tuning", reasons + ["nothing with LoRA fits the budget; prompt tuning does"]
    return "prompting", reasons + ["no training method fits the budget: prompting only"]


PILOT_MARGIN = 0.05  # a pilot must beat the rule of thumb's pick by at least this (and the noise)


def pilot_plan(candidates: dict[str, dict], data: dict, domain_text: Optional[str]) -> list[str]:
    """Which methods get a pilot: prompt tuning and LoRA where they fit, QLoRA where LoRA does not fit
    and QLoRA does, full fine-tuning where it fits, continued pretraining then SFT when domain text is given."""
    fits = {m for m, c in candidates.items() if c["fits"]}
    wanted = ["prompt_tuning", "lora", "full"] + (["qlora"] if "lora" not in fits else [])
    wanted += ["cpt+sft"] if domain_text else []
    return [m for m in METHODS if m in wanted and m in fits]


def full_steps(candidate: dict, budget: Budget) -> int:
    """The full run's optimizer steps: the planned epochs or max_steps, cut to the time budget."""
    steps = candidate["total_steps"] or 1
    if budget.hours is not None and candidate["step_time_s"]:
        steps = min(steps, int(budget.hours * 3600 / candidate["step_time_s"] / (2 if candidate["method"] == "cpt+sft" else 1)))
    return max(1, steps)


def run_pilots(cfg, candidates: dict[str, dict], data: dict, budget: Budget, *, minutes: float, out_dir: Path,
               lrs: dict, domain_text: Optional[str] = None) -> dict[str, dict]:
    """A pilot of each method `pilot_plan` names, `minutes` of predicted compute each (docs/advise.md)."""
    from posttrain.data.sources import read_records
    from posttrain.eval.drift import build_drift_reference
    from posttrain.eval.perplexity import text_reference
    from posttrain.models.loading import load
    from posttrain.plan.pilots import HeldOut, pilot_steps, run_pilot

    if not isinstance(cfg.data.eval, str):
        raise PlanError("pilots score held-out examples: set data.eval=FILE (or pass --no-pilots)")
    held = prompt_answer_pairs(read_records(cfg.data.eval, split="validation"), 50)
    if not held:
        raise PlanError(f"{cfg.data.eval}: no example with a prompt and an answer to score the pilots on")
    base, tok = load(cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code,
                     allow_pickle=cfg.allow_pickle)
    # the forgetting references are the base model's; every pilot is measured against the same ones
    references = (build_drift_reference(base, tok, n_prompts=32), text_reference(base, tok, n=32))
    del base
    scorer = HeldOut(tok, held, prompt_text, is_correct)
    out = {}
    for method in pilot_plan(candidates, data, domain_text):
        c = candidates[method]
        total = full_steps(c, budget)  # the full run's SFT steps: the pilot's schedule
        steps = pilot_steps(minutes, c["step_time_s"], total)
        lr = lrs[method][1] if method != "cpt+sft" else lrs["lora"][1]
        kw, target = {}, total
        if method == "cpt+sft":  # half the compute continues pretraining, half fine-tunes; so does the full run
            steps = max(1, steps // 2)
            target = 2 * total
            kw = {"domain_text": domain_text, "cpt_steps": steps, "cpt_lr": lrs["cpt"][1]}
        out[method] = run_pilot(cfg, method, steps=steps, full_steps=target, schedule_steps=total, lr=lr,
                                scorer=scorer, out_dir=out_dir / "pilots" / method, references=references, **kw)
    return out


def decide_with_pilots(rule_pick: str, candidates: dict[str, dict]) -> tuple[str, list[str]]:
    """The rule of thumb's pick stands unless another method's expected score beats it by more than the
    noise: the larger of both uncertainties and PILOT_MARGIN. A pick without a score (not piloted)
    gives way to the best scored method."""
    scored = {m: c for m, c in candidates.items() if c["fits"] and c.get("expected_score") is not None
              and not c.get("guard_stops")}
    stopped = [m for m, c in candidates.items() if c.get("guard_stops")]
    said = ([f"pilots: the forgetting guard would stop {', '.join(stopped)} (drift from the base projected to "
             f"the full run above eval.guard_max_drift_kl): not picked"] if stopped else [])
    if not any(m != "prompting" for m in scored):
        return rule_pick, said + ["no pilot scored: the rule of thumb decides"]
    best = max(scored, key=lambda m: scored[m]["expected_score"])
    b = scored[best]
    say = lambda m: (f"{m} {scored[m]['expected_score']:.0%} ± {scored[m]['uncertainty']:.0%}"  # noqa: E731
                     + (" (measured)" if m == "prompting" else ""))
    if rule_pick not in scored:
        return best, said + [f"pilots: {say(best)} is the best expected score"]
    if best == rule_pick:
        return best, said + [f"pilots agree: {say(best)} is the best expected score"]
    r = scored[rule_pick]
    noise = max(b["uncertainty"], r["uncertainty"], PILOT_MARGIN)
    if b["expected_score"] - r["expected_score"] > noise:
        return best, said + [f"pilots: {say(best)} beats the rule's {say(rule_pick)} by more than the noise "
                             f"({noise:.0%})"]
    return rule_pick, said + [f"pilots: no method beats {say(rule_pick)} by more than the noise ({noise:.0%}; best "
                       f"{say(best)}): the rule of thumb's pick stands"]


def write_recipe(path: Path, cfg, method: str, out_dir: Path, domain_text: Optional[str],
                 lrs: Optional[dict] = None) -> Path:
    """A `posttrain pipeline` recipe that runs the recommendation. cpt+sft continues pretraining with
    every weight trained (as Gururangan et al. 2020 do) with the SFT stage's steps (or epochs), then
    fine-tunes with LoRA; `lrs` are the model's ranges (`learning_rates`), the 7B table by default."""
    lrs = lrs or LEARNING_RATES
    data = {k: v for k, v in {"train": cfg.data.train, "eval": cfg.data.eval,
                              "max_length": cfg.data.max_length}.items() if v is not None}
    lr = lrs["lora" if method == "cpt+sft" else method][1] if method in lrs else None
    train = {"lr": lr, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
             "precision": cfg.train.precision, "gradient_checkpointing": cfg.train.gradient_checkpointing,
             # the schedule the pilots followed for their first steps (plan/pilots.py, schedule_overrides)
             "schedule": cfg.train.schedule}
    if cfg.train.warmup_steps is not None:
        train["warmup_steps"] = cfg.train.warmup_steps
    else:
        train["warmup_ratio"] = cfg.train.warmup_ratio
    if cfg.train.max_steps:
        train["max_steps"] = cfg.train.max_steps
    kind = ADAPTER_OF[method]
    if method == "prompting":
        stages = [{"name": "baseline", "stage": "eval", "model": cfg.model}]
    else:
        adapter = {"type": kind} if kind != "none" else None
        sft = {"name": "sft", "stage": "sft", "data": data, "train": train}
        if adapter:
            sft["adapter"] = adapter
        if method == "cpt+sft":
            cpt = {"name": "cpt", "stage": "cpt", "model": cfg.model,
                   "data": {"train": domain_text, "max_length": cfg.data.max_length},
                   "train": {**train, "lr": lrs["cpt"][1] if "cpt" in lrs else LEARNING_RATES["full"][1]},
                   # new domain text moves the model away from the base by design: the drift guard would
                   # roll it back; the SFT stage after it is guarded (against the CPT model)
                   "eval": {"guard": "off"}}
            stages = [cpt, sft]
        else:
            sft["model"] = cfg.model
            stages = [sft]
    recipe = {"output_dir": str(out_dir / "run"), "stages": stages}
    head = (f"# written by `posttrain advise`: {method}. Run it with: posttrain pipeline {path}\n"
            "# learning rate: the top of the cited range for this method (docs/advise.md)\n")
    path.write_text(head + yaml.safe_dump(recipe, sort_keys=False))
    return path


def advise(cfg, *, budget: Budget, out_dir: Path, general: str = "gym:regression:train",
           domain_text: Optional[str] = None, analysis: Optional[dict] = None,
           pilot_minutes: Optional[float] = None) -> dict:
    """The whole advice as one JSON-ready dict; writes out_dir/advice.yaml. Without `pilot_minutes`
    (--no-pilots) it decides from the data, the planner and the rules of thumb alone."""
    from posttrain.plan.quality import check_data
    from posttrain.plan.shapes import read_shape
    from posttrain.data.sources import read_records

    if not cfg.model:
        raise PlanError("no model given: set model=DIR")
    if not cfg.data.train:
        raise PlanError("no training data: set data.train=FILE")
    shape = read_shape(cfg.model)
    data = analysis or analyse_data(cfg, general=general)
    train_records = [r for s in (cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train])
                     for r in read_records(s, split="train")]
    held = read_records(cfg.data.eval, split="validation") if isinstance(cfg.data.eval, str) else None
    quality = check_data(train_records, held)
    lrs = learning_rates(shape)
    candidates = {m: _candidate(cfg, m, budget, data["examples"], data["loss_fraction"], lrs) for m in METHODS}
    base = data.get("baselines") or {}
    if base.get("k_shot") is not None:
        candidates["prompting"]["expected_score"] = max(base["k_shot"], base["zero_shot"])
        candidates["prompting"]["score_source"] = f"measured: {base['k']}-shot and zero-shot on {base['n']} held-out"
        candidates["prompting"]["uncertainty"] = binomial_noise(candidates["prompting"]["expected_score"], base["n"])
    if budget.hours is not None:
        for c in candidates.values():
            if c["wall_time_s"] is not None and c["wall_time_s"] > budget.hours * 3600:
                c["fits"] = False
                c["over_time_budget"] = True
    rec, reasons = decide(data, candidates, params=shape.total_params, domain_text=domain_text is not None)
    out_dir.mkdir(parents=True, exist_ok=True)
    pilots = None
    if pilot_minutes is not None:
        pilots = run_pilots(cfg, candidates, data, budget, minutes=pilot_minutes, out_dir=out_dir, lrs=lrs,
                            domain_text=domain_text)
        limit = cfg.eval.guard_max_drift_kl if cfg.eval.guard == "on" else None
        for m, p in pilots.items():
            candidates[m].update(expected_score=p["expected_score"], uncertainty=p["uncertainty"],
                                 forgetting_risk=p["forgetting_risk"], score_source="pilot", pilot=p,
                                 # continued pretraining moves the model by design; its recipe runs
                                 # that stage unguarded, and the SFT after it is guarded against the CPT model
                                 guard_stops=m != "cpt+sft" and limit is not None and p["projected_drift_kl"] > limit)
        rec, more = decide_with_pilots(rec, candidates)
        reasons += more
    recipe = write_recipe(out_dir / "advice.yaml", cfg, rec, out_dir, domain_text, lrs)
    for c in candidates.values():
        c["device_hours"] = None if c["wall_time_s"] is None else c["wall_time_s"] / 3600 * budget.gpus
    note = ("expected_score: pilots extrapolated to the full run (docs/advise.md); prompting's is measured"
            if pilots else "no pilots run (--no-pilots): no score is predicted")
    return {"recommendation": rec, "reasons": reasons, "candidates": list(candidates.values()),
            "recipe": str(recipe), "data": data, "quality": quality.counts,
            "budget": {"device": budget.device.name, "gpus": budget.gpus, "hours": budget.hours,
                       "memory_bytes": budget.device.memory_bytes},
            "pilots": pilots, "expected_score_note": note}


def format_advice(a: dict) -> str:
    lines = [f"recommendation: {a['recommendation']}"] + [f"  - {r}" for r in a["reasons"]]
    lines += ["", f"{'method':<15}{'fits':<6}{'expected':>13}{'peak GiB':>10}{'time h':>9}{'dev-h':>7}"
              f"{'adapter MiB':>12}  {'forgetting':<11}{'lr':<16}serving"]
    for c in a["candidates"]:
        t = "-" if c["wall_time_s"] is None else f"{c['wall_time_s'] / 3600:.2f}"
        dh = "-" if c.get("device_hours") is None else f"{c['device_hours']:.2f}"
        lr = "-" if not c["learning_rate"] else f"{c['learning_rate'][0]:.0e}-{c['learning_rate'][1]:.0e}"
        score = "-" if c["expected_score"] is None else f"{c['expected_score']:.0%}" + (
            f" ± {c['uncertainty']:.0%}" if c.get("uncertainty") is not None else " (meas.)")
        size = "-" if not c.get("adapter_bytes") else f"{c['adapter_bytes'] / 2**20:.2f}"
        lines.append(f"{c['method']:<15}{'yes' if c['fits'] else 'no':<6}{score:>13}{c['peak_memory_bytes'] / 2**30:>10.2f}"
                     f"{t:>9}{dh:>7}{size:>12}  {c['forgetting_risk']:<11}{lr:<16}{c['serving']}")
    q = a["quality"]
    lines += ["", f"data: {q['exact_duplicate_examples']} exact duplicates, {q['near_duplicate_pairs']} near-duplicate "
              f"pairs, {q['contaminated_held_out']} held-out examples overlapping training (posttrain data check: "
              "details)", f"recipe: {a['recipe']}  (posttrain pipeline {a['recipe']})"]
    return "\n".join(lines)
