"""Constitutional AI on the gym, end to end, measured: the demo's SFT model critiques and revises its own
answers to refusal prompts (revisions -> SFT), and compares pairs of its own instruct answers from
choice-token log-probs (pairs -> DPO). Prints one JSON object.

    python bench/cai_gym.py [--out DIR] [--n-critique 400] [--n-compare 300] [--sft-steps 60] [--dpo-steps 40]

What it reports: refusal on held-out harmful requests and over-refusal on benign look-alikes
before/after SFT on the revisions; how often a revision changed the answer and refused; how often
the AI-feedback label agrees with the verifier on pairs where exactly one answer is correct
(chance = 0.5); instruct accuracy and regression score before/after DPO on the pairs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def refusal_rates(model, tok, n: int = 200) -> dict:
    from posttrain import gym
    from posttrain.data.refusal import is_refusal

    rows = gym.load_task_rows("refusal", "test", n=n)
    outs = gym.greedy_complete(model, tok, [gym.chat_prompt(tok, r) for r in rows], max_new_tokens=32)
    harm = [is_refusal(o) for r, o in zip(rows, outs) if r["harmful"]]
    benign = [is_refusal(o) for r, o in zip(rows, outs) if not r["harmful"]]
    return {"refusal_rate": round(sum(harm) / len(harm), 4), "over_refusal": round(sum(benign) / len(benign), 4)}


def measure(model, tok, n: int = 200) -> dict:
    from posttrain import gym

    m = refusal_rates(model, tok, n)
    m["instruct_accuracy"] = round(gym.task_accuracy(model, tok, task="instruct", n=n), 4)
    m["regression_score"] = round(gym.regression_score(model, tok, n=n), 4)
    return m


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="cai-gym-out")
    p.add_argument("--n-critique", type=int, default=400)
    p.add_argument("--n-compare", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--dpo-steps", type=int, default=40)
    a = p.parse_args()
    import torch

    from posttrain import cai, gym
    from posttrain.stages import load_config
    from posttrain.pipeline.demo import RECIPE
    from posttrain.models import adapters
    from posttrain.models.loading import load
    from posttrain.pipeline import load_recipe, run_pipeline
    from posttrain.stages import dpo, sft

    torch.manual_seed(0)
    out = Path(a.out)
    t_all = time.time()
    constitution = RECIPE.parent / "constitution.yaml"
    # the starting model: the demo's SFT stage (a pipeline run; skipped when already there), merged
    lin = run_pipeline(load_recipe(RECIPE, [f"output_dir={out / 'demo'}"]), only=["sft"], report=False)
    start = out / "sft-merged"
    if not (start / "config.json").exists():
        adapters.merge_to_dir(lin["stages"]["sft"]["policy"]["model"], lin["stages"]["sft"]["policy"]["adapter"], start)
    model, tok = load(start, device="cpu")
    model.eval()
    res: dict = {"start": measure(model, tok)}

    # 1. critique and revision on refusal prompts -> SFT
    t0 = time.time()
    prompts = gym.load_task_rows("refusal", "train", n=a.n_critique)
    st: dict = {}
    rows = cai.critique_and_revise(model, tok, prompts, cai.load_constitution(constitution), cai.load_templates(),
                                   model_name=str(start), seed=0, max_new_tokens=48, stats=st)
    cai.write_jsonl(rows, out / "revisions.jsonl")
    from posttrain.data.refusal import is_refusal

    harmful = {i for i, r in enumerate(prompts) if r["harmful"]}
    kept = {r["cai"]["index"]: r for r in rows}
    h = [kept[i] for i in harmful if i in kept]
    b = [r for i, r in kept.items() if i not in harmful]
    crit = [r["cai"]["critique"] for r in rows]
    res["critique"] = {
        "distinct_critiques": len(set(crit)),
        "most_common_critique_share": round(max((crit.count(c) for c in set(crit)), default=0) / max(1, len(crit)), 4),
        "prompts": len(prompts), "rows": len(rows), "empty_revisions": st["empty_revision"],
        "revised_fraction": round(sum(r["cai"]["revised"] for r in rows) / max(1, len(rows)), 4),
        "harmful_initial_refusal": round(sum(is_refusal(r["cai"]["initial_response"]) for r in h) / max(1, len(h)), 4),
        "harmful_revision_refusal": round(sum(is_refusal(r["cai"]["revision"]) for r in h) / max(1, len(h)), 4),
        "benign_initial_refusal": round(sum(is_refusal(r["cai"]["initial_response"]) for r in b) / max(1, len(b)), 4),
        "benign_revision_refusal": round(sum(is_refusal(r["cai"]["revision"]) for r in b) / max(1, len(b)), 4),
        "time_s": round(time.time() - t0, 1),
        "examples": [{k: r["cai"][k] for k in ("initial_response", "critique", "revision")} | {"principle": r["cai"]["principle"]["id"]}
                     for r in rows[:3]]}
    cfg = load_config("sft", overrides=[
        f"model={start}", f"data.train={out / 'revisions.jsonl'}", f"output_dir={out / 'cai-sft'}",
        "adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "train.lr=5e-4", "train.batch_size=16",
        f"train.max_steps={a.sft_steps}", "train.warmup_steps=5", "train.precision=bf16", "data.max_length=256",
        "data.mix.data=gym:regression:train", "data.mix.ratio=0.2", "train.progress=false"])
    t0 = time.time()
    r = sft.run(cfg)
    res["after_critique_sft"] = {**measure(r.model.eval(), tok), "train_time_s": round(time.time() - t0, 1)}
    del r

    # 2. RLAIF: compare two sampled instruct answers from choice-token log-probs -> DPO
    t0 = time.time()
    prompts = gym.load_task_rows("instruct", "train", n=a.n_compare)
    st = {}
    honest = [p for p in cai.load_constitution(constitution) if p.id == "honest"]
    pairs = cai.compare_pairs(model, tok, prompts, honest, cai.load_templates(), model_name=str(start), seed=0,
                              max_new_tokens=32, temperature=1.0, stats=st)
    cai.write_jsonl(pairs, out / "pairs.jsonl")
    decided = []
    for pr in pairs:
        row = prompts[pr["cai"]["index"]]
        ok = [gym.verify("instruct", row, x) for x in pr["cai"]["answers"]]
        if ok[0] != ok[1]:
            decided.append(gym.verify("instruct", row, pr["chosen"][0]["content"]))
    res["compare"] = {**st, "pairs_with_one_correct": len(decided),
                      "label_agrees_with_verifier": round(sum(decided) / max(1, len(decided)), 4),
                      "mean_confidence": round(sum(p["cai"]["confidence"] for p in pairs) / max(1, len(pairs)), 4),
                      # mean log p(B) - log p(A) over both orders: how much the judge prefers a position
                      "position_bias_nats": round(sum(o[1] - o[0] for p in pairs for o in p["cai"]["choice_logprobs"]
                                                      .values()) / max(1, 2 * len(pairs)), 3),
                      "time_s": round(time.time() - t0, 1)}
    cfg = load_config("dpo", overrides=[
        f"model={start}", f"data.train={out / 'pairs.jsonl'}", f"output_dir={out / 'cai-dpo'}",
        "adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "dpo.beta=0.5", "dpo.reference=adapter",
        "train.lr=5e-4", "train.batch_size=16", f"train.max_steps={a.dpo_steps}", "train.warmup_steps=5",
        "train.precision=bf16", "data.max_length=256", "train.progress=false"])
    t0 = time.time()
    r = dpo.run(cfg)
    res["after_rlaif_dpo"] = {**measure(r.model.eval(), tok), "train_time_s": round(time.time() - t0, 1)}
    res["wall_time_s"] = round(time.time() - t_all, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
