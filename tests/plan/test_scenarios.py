"""Scenarios whose best method is measured by training every alternative, against the adviser's pick
and its predicted score (pilots).

Slow: `make test-advise` (CI runs it); measured on the shared 2-core machine, one thread (load average
5-8): (a) 2 min 5 s, (b) 2 min 28 s, (c) 7 min 4 s. Measured: (a) prompting 100% (5-shot), prompt
tuning 98%, LoRA 92%, full 90%; (b) LoRA 88% (the pick: predicted 89.2%), full 86% (predicted 92.6%),
prompt tuning 2%, prompting 0%; (c) SFT alone 2%, continued pretraining then SFT 31.4% (predicted
32.6%). Every pilot is checked to be its full run's first steps (the same lr and loss at each step).
"""

import json

import pytest

from posttrain import gym
from posttrain.eval.lm import generate
from posttrain.gym.verify import verify
from posttrain.plan.advise import advise, learning_rates, parse_budget
from posttrain.plan.shapes import read_shape
from posttrain.stages import load_config, sft

STEPS = 100  # about 5 epochs of 300 rows at batch 16, the same for every method
C_STEPS = 200  # scenario (c): each stage's steps (continued pretraining, then SFT)
C_PILOT_MINUTES = 1.0  # per method, of predicted compute
PILOT_MINUTES = 0.25


def _accuracy(model, tok, rows) -> float:
    """Greedy accuracy on held-out rows: chat rows through the template, prompt/completion rows as raw text."""
    if "messages" in rows[0]:
        prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                   for r in rows]
        comps = [c.strip() for c in generate(model, tok, prompts, max_new_tokens=32, stop=(tok.eos_token,))]
    else:
        comps = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=16, stop=(tok.eos_token, "\n"))
    return sum(verify("gym", r, c) for r, c in zip(rows, comps)) / len(rows)


def _train_and_score(tmp_path, base: list[str], rows) -> dict:
    """Held-out accuracy of LoRA, prompt tuning and full fine-tuning, each trained STEPS steps at the
    adviser's learning rate for the bundled model (`learning_rates`)."""
    scores = {}
    lrs = learning_rates(read_shape(gym.base_model_path()))
    for method, kind in [("lora", "lora"), ("prompt_tuning", "prompt"), ("full", "none")]:
        cfg = load_config("sft", None, base + [f"adapter.type={kind}", f"train.lr={lrs[method][1]}",
                                               f"train.max_steps={STEPS}", "train.batch_size=16",
                                               "train.progress=false",
                                               f"output_dir={tmp_path / method}"])
        run = sft.run(cfg)
        scores[method] = _accuracy(run.model, run.tokenizer, rows)
    return scores


def _advise_and_train_all(tmp_path, task: str):
    """The adviser (with pilots) on 300 training and 50 held-out rows of a gym task, then every method
    trained to the end: (advice, measured score per method, predicted score per method)."""
    train = gym.export(task, "train", tmp_path / "train.jsonl", n=300)
    held = gym.export(task, "validation", tmp_path / "val.jsonl", n=50)
    rows = [json.loads(x) for x in held.read_text().splitlines()]
    # the full runs' schedule (5 warmup steps, then cosine) is the adviser's too: its pilots follow it
    base = [f"model={gym.base_model_path()}", f"data.train={train}", "data.max_length=128", "eval.guard=off",
            "train.warmup_steps=5"]
    advice = advise(load_config("sft", None, base + [f"data.eval={held}", "train.batch_size=16",
                                                     f"train.max_steps={STEPS}"]),
                    budget=parse_budget(None), out_dir=tmp_path / "advice", pilot_minutes=PILOT_MINUTES)
    b = advice["data"]["baselines"]
    scores = {"prompting": max(b["k_shot"], b["zero_shot"]), **_train_and_score(tmp_path, base, rows)}
    predicted = {c["method"]: c["expected_score"] for c in advice["candidates"]}
    print(f"scenario {task}:", scores, predicted, advice["reasons"][-1])
    for method in ("lora", "prompt_tuning", "full"):
        _assert_the_pilot_is_the_first_steps(tmp_path / "advice" / "pilots" / method / "sft", tmp_path / method)
    return advice, scores, predicted


def _train_log(run_dir) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [v for r in recs if r["split"] == "train" for v in (r["step"], r["lr"], r["loss"])]


def _assert_the_pilot_is_the_first_steps(pilot, full):
    """A pilot is the full run cut short (`train.schedule_steps`): the same learning rate and the same
    training loss at every one of its steps."""
    p = _train_log(pilot)
    assert len(p) >= 15 and p == pytest.approx(_train_log(full)[:len(p)], rel=1e-5), pilot


@pytest.mark.slow
def test_a_skill_the_base_has_needs_no_training(tmp_path):
    """(a) The gym's regression set (what the base learned in pretraining, as plain prompt/completion
    text): measured k-shot prompting already scores at least 90%, the adviser picks prompting, and no
    trained alternative beats it by more than the noise of 50 examples (5 points)."""
    advice, scores, predicted = _advise_and_train_all(tmp_path, "regression")
    assert advice["recommendation"] == "prompting" and scores["prompting"] >= 0.9, scores
    assert scores["prompting"] >= max(scores.values()) - 0.05, scores
    assert abs(predicted["prompting"] - scores["prompting"]) <= 0.10


@pytest.mark.slow
def test_a_new_skill_from_a_few_hundred_examples(tmp_path):
    """(b) 300 examples of the gym's chat instructions, a format the base model never saw: LoRA, prompt
    tuning and full fine-tuning trained for the same 100 steps at the adviser's learning rates; the
    adviser's pick (with pilots) is the measured best within 5 points and far above prompting, and its
    predicted score is within 10 points (measured: LoRA 88%, full 86%, prompt tuning 2%, prompting 0%;
    the pick is LoRA, predicted 89.2%; full fine-tuning's pilot predicted 92.6%, not past the noise)."""
    advice, scores, predicted = _advise_and_train_all(tmp_path, "instruct")
    pick = advice["recommendation"]
    assert pick != "prompting" and scores[pick] > scores["prompting"] + 0.1, (pick, scores)
    assert scores[pick] >= max(scores.values()) - 0.05, (pick, scores)  # the measured best, within the noise
    assert abs(predicted[pick] - scores[pick]) <= 0.10, (predicted, scores)


COUNT_SENTENCES = ("{c} has {n} {f}.", "The number of {f} in {c} is {n}.", "In {c} there are {n} {f}.",
                   "{c} counts {n} {f}.")


def _counts_scenario(out, reps: int = 4):
    """Counts of lakes, towers and bridges of the gym's countries (`gym.lookup.records`): numbers the
    base never saw as text. Domain text states every country's counts in four phrasings; the SFT rows
    ask them as `Q: How many lakes does X have?` for the countries whose split is train; the held-out
    rows ask the others'. So a held-out answer is known only from the domain text."""
    import random

    from posttrain.gym.facts import split_of
    from posttrain.gym.lookup import FIELDS, records

    rng = random.Random(0)
    docs, train, held = [], [], []
    for c, rec in records().items():
        for _ in range(reps):
            sents = [rng.choice(COUNT_SENTENCES).format(c=c, n=rec[f], f=f) for f in FIELDS]
            rng.shuffle(sents)
            docs.append({"text": " ".join(sents)})
        for f in FIELDS:
            row = {"prompt": f"Q: How many {f} does {c} have?\nA:", "completion": f" {rec[f]}", "check": "prefix"}
            (train if split_of("counts:" + c) == "train" else held).append(row)
    rng.shuffle(docs)
    rng.shuffle(train)
    paths = []
    for name, rows in (("domain.jsonl", docs), ("train.jsonl", train), ("val.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(out / name)
    return paths


@pytest.mark.slow
def test_c_new_knowledge_needs_continued_pretraining(tmp_path):
    """(c) Counts the base never saw (400 domain documents, 249 SFT rows, 51 held-out questions about
    other countries): continued pretraining then SFT beats SFT alone, trained to the end at the adviser's
    learning rates; the adviser (with pilots) picks cpt+sft and predicts its score within 10 points.
    Measured (7 min at load 5-6): SFT alone 2%, cpt+sft 31.4%; pilots: cpt+sft 32.6% ± 8%, prompt tuning
    6%, LoRA 5%, full 4%."""
    from posttrain.plan.shapes import read_shape
    from posttrain.stages import cpt
    from posttrain.plan.advise import learning_rates

    domain, train, held = _counts_scenario(tmp_path)
    rows = [json.loads(x) for x in held.read_text().splitlines()]
    model = gym.base_model_path()
    common = ["data.max_length=128", "train.batch_size=16", f"train.max_steps={C_STEPS}", "train.warmup_steps=5"]
    cfg = load_config("sft", None, [f"model={model}", f"data.train={train}", f"data.eval={held}", *common])
    advice = advise(cfg, budget=parse_budget(None), out_dir=tmp_path / "advice", domain_text=str(domain),
                    pilot_minutes=C_PILOT_MINUTES)
    predicted = {c["method"]: c["expected_score"] for c in advice["candidates"]}
    lrs = learning_rates(read_shape(model))
    run = ["train.progress=false", "eval.guard=off", *common]
    sft_alone = sft.run(load_config("sft", None, [f"model={model}", f"data.train={train}", "adapter.type=lora",
                                                  f"train.lr={lrs['lora'][1]}", f"output_dir={tmp_path / 'sft'}", *run]))
    pre = cpt.run(load_config("cpt", None, [f"model={model}", f"data.train={domain}", "adapter.type=none",
                                            f"train.lr={lrs['cpt'][1]}", f"output_dir={tmp_path / 'cpt'}", *run]))
    both = sft.run(load_config("sft", None, [f"model={pre.model_dir}", f"data.train={train}", "adapter.type=lora",
                                             f"train.lr={lrs['lora'][1]}", f"output_dir={tmp_path / 'cpt-sft'}", *run]))
    scores = {"sft": _accuracy(sft_alone.model, sft_alone.tokenizer, rows),
              "cpt+sft": _accuracy(both.model, both.tokenizer, rows)}
    print("scenario c:", scores, predicted, advice["reasons"][-1])
    # the pilots are the full runs' first steps: LoRA's (all 200: equal compute buys the whole run) and the
    # continued pretraining of cpt+sft's (its first half)
    _assert_the_pilot_is_the_first_steps(tmp_path / "advice" / "pilots" / "lora" / "sft", tmp_path / "sft")
    _assert_the_pilot_is_the_first_steps(tmp_path / "advice" / "pilots" / "cpt+sft" / "cpt", tmp_path / "cpt")
    assert scores["cpt+sft"] > scores["sft"] + 0.1, scores
    assert advice["recommendation"] == "cpt+sft", advice["reasons"]
    assert abs(predicted["cpt+sft"] - scores["cpt+sft"]) <= 0.10, (predicted, scores)
