"""`posttrain advise --no-pilots`: the budget, each rule of thumb, and the end-to-end run on gym data."""

import contextlib
import io
import json

import pytest

from posttrain.cli import main
from posttrain.pipeline.recipe import load_recipe
from posttrain.plan.advise import decide, parse_budget
from posttrain.plan.shapes import PlanError


def test_budget_parsing():
    b = parse_budget("2xA100-40GB,8h")
    assert (b.device.name, b.gpus, b.hours) == ("A100-40GB", 2, 8.0)
    b = parse_budget("L4, 30m")
    assert (b.device.name, b.gpus, b.hours) == ("L4-24GB", 1, 0.5)
    with pytest.raises(PlanError, match="unknown device 'Z80'; known: cpu, H100-80GB"):
        parse_budget("1xZ80,1h")
    with pytest.raises(PlanError, match="name a device"):
        parse_budget("8h")
    b = parse_budget("cpu,300MiB,1h")
    assert (b.device.name, b.device.memory_bytes, b.hours) == ("cpu", 300 * 2**20, 1.0)
    assert parse_budget("1xA100-40GB,20GB").device.memory_bytes == 20 * 10**9
    with pytest.raises(PlanError, match=r"'64XB' is neither a time \(8h, 30m\) nor a memory limit \(300MiB, 2GiB"):
        parse_budget("cpu,64XB")


def _data(n=2000, known=0.5, gap=0.5):
    return {"examples": n, "already_predicted": known, "domain_gap_nats": gap, "answer_nll": 2.0 + gap,
            "general_nll": 2.0}


def _cands(*fitting):
    methods = ("prompting", "prompt_tuning", "prefix_tuning", "lora", "qlora", "full", "cpt+sft")
    return {m: {"fits": m in fitting} for m in methods}


ALL = ("prompting", "prompt_tuning", "prefix_tuning", "lora", "qlora", "full", "cpt+sft")


@pytest.mark.parametrize("data, fitting, params, domain, expected", [
    (_data(known=0.95), ALL, 5e8, False, "prompting"),                    # rule 1: already predicted
    (_data(gap=2.0), ALL, 5e8, True, "cpt+sft"),                          # rule 2: a new domain, with domain text
    (_data(gap=2.0), ALL, 5e8, False, "lora"),                            # ... without domain text: SFT only
    (_data(n=300, known=0.7), ALL, 5e8, False, "prefix_tuning"),          # rule 3: style, small model
    (_data(n=300, known=0.7), ALL, 7e9, False, "prompt_tuning"),          # rule 3: style, large model
    (_data(n=200_000), ALL, 5e8, False, "full"),                          # rule 4: much data, full fits
    (_data(n=200_000), ("prompting", "lora", "qlora"), 5e8, False, "lora"),
    (_data(), ALL, 5e8, False, "lora"),                                   # rule 5
    (_data(), ("prompting", "prompt_tuning", "qlora"), 5e8, False, "qlora"),  # rule 6: LoRA does not fit
])
def test_rules_of_thumb(data, fitting, params, domain, expected):
    rec, reasons = decide(data, _cands(*fitting), params=params, domain_text=domain)
    assert rec == expected
    assert reasons[0].startswith(f"{data['examples']} examples; the base model already predicts")


def test_advise_on_gym_data_writes_a_runnable_recipe(tmp_path):
    from posttrain import gym

    train = gym.export("instruct", "train", tmp_path / "train.jsonl", n=200)
    held = gym.export("instruct", "validation", tmp_path / "val.jsonl", n=50)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["advise", f"model={gym.base_model_path()}", f"data.train={train}", f"data.eval={held}",
                   "data.max_length=128", "--no-pilots", "--json", "--out", str(tmp_path / "adv")])
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert out["recommendation"] == "lora"  # 200 examples of a skill the base half-knows (measured: 51%)
    assert [c["method"] for c in out["candidates"]] == ["prompting", "prompt_tuning", "prefix_tuning", "lora",
                                                        "qlora", "full", "cpt+sft"]
    for c in out["candidates"]:
        assert {"expected_score", "peak_memory_bytes", "wall_time_s", "fits", "forgetting_risk"} <= set(c)
    assert out["data"]["examples"] == 200 and 0.3 < out["data"]["already_predicted"] < 0.7
    # the base model was pretrained on "Q: ... A:" text, not chat turns: prompting in the chat format fails
    assert out["data"]["baselines"]["n"] == 50 and out["data"]["baselines"]["k_shot"] < 0.2
    recipe = load_recipe(out["recipe"])
    assert [s.stage for s in recipe.stages] == ["sft"]
    # LoRA's 2e-4 (QLoRA paper, 7B) times LR(N)/LR(7B) of Kaplan et al. 2020 for 1.7M parameters (x12.6)
    assert recipe.stages[0].cfg.adapter.type == "lora" and recipe.stages[0].cfg.train.lr == 2.5e-3
    assert json.loads((tmp_path / "adv" / "advice.json").read_text())["recommendation"] == "lora"


def test_a_skill_the_base_has_is_left_to_prompting(tmp_path):
    """The gym's regression set holds what the bundled base model learned in pretraining: k-shot
    prompting already answers it (measured: zero-shot 88%, 8-shot 100% of 50), so nothing is trained."""
    from posttrain import gym

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["advise", f"model={gym.base_model_path()}", "data.train=gym:regression:train",
                   "data.eval=gym:regression:validation", "data.max_length=256", "--no-pilots", "--json",
                   "--out", str(tmp_path / "adv")])
    assert rc == 0
    out = json.loads(buf.getvalue())
    base = out["data"]["baselines"]
    assert base["n"] == 50 and base["k"] == 8 and base["k_shot"] >= 0.9
    assert out["recommendation"] == "prompting"
    assert out["candidates"][0]["expected_score"] == max(base["k_shot"], base["zero_shot"])
    assert [s.stage for s in load_recipe(out["recipe"]).stages] == ["eval"]


@pytest.mark.parametrize("method, stages, adapter", [
    ("prompting", ["eval"], None), ("prompt_tuning", ["sft"], "prompt"), ("prefix_tuning", ["sft"], "prefix"),
    ("lora", ["sft"], "lora"), ("qlora", ["sft"], "qlora"), ("full", ["sft"], "none"), ("cpt+sft", ["cpt", "sft"], "lora"),
])
def test_every_recipe_the_adviser_writes_is_a_valid_pipeline(tmp_path, method, stages, adapter):
    from posttrain.plan.advise import LEARNING_RATES, write_recipe
    from posttrain.stages import load_config

    cfg = load_config("sft", None, ["model=some/model", "data.train=train.jsonl", "data.eval=val.jsonl"])
    path = write_recipe(tmp_path / "advice.yaml", cfg, method, tmp_path, "domain.jsonl")
    recipe = load_recipe(path)
    assert [s.stage for s in recipe.stages] == stages
    if adapter is not None:
        last = recipe.stages[-1].cfg
        assert last.adapter.type == adapter and last.train.lr == LEARNING_RATES[method][1]
    if method == "cpt+sft":  # continued pretraining trains every weight, unguarded; the SFT after it is guarded
        first = recipe.stages[0].cfg
        assert first.adapter.type == "none" and first.train.lr == LEARNING_RATES["full"][1]
        assert first.eval.guard == "off" and recipe.stages[1].cfg.eval.guard == "on"


def test_learning_rates_scale_with_model_size(tmp_path):
    """Kaplan et al. 2020, eq. D.1: the table (7B) stands at 7B; the bundled 1.7M-parameter model gets
    x12.6; continued pretraining runs at LR(N)."""
    from transformers import LlamaConfig

    from posttrain import gym
    from posttrain.plan.advise import LEARNING_RATES, kaplan_lr, learning_rates
    from posttrain.plan.shapes import read_shape

    LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008).save_pretrained(tmp_path)
    big = learning_rates(read_shape(tmp_path))
    assert {m: r for m, r in big.items() if m != "cpt"} == LEARNING_RATES
    assert big["cpt"] == (4.4e-5, 8.7e-5)  # continued pretraining at LR(6.5e9) itself
    small = learning_rates(read_shape(gym.base_model_path()))
    assert small["cpt"] == (6.2e-4, 1.2e-3)
    assert kaplan_lr(1_723_328) / kaplan_lr(6e9) == pytest.approx(12.59, abs=0.01)
    assert small["lora"] == (1.3e-3, 2.5e-3) and small["full"] == (1.3e-4, 2.5e-4)
    assert small["prompt_tuning"] == LEARNING_RATES["prompt_tuning"]  # Lester et al. use 0.3 at every size


def test_a_time_budget_rules_out_training(tmp_path):
    """With one second of CPU time no training method fits the budget: the adviser says prompting."""
    from posttrain import gym
    from posttrain.plan.advise import advise
    from posttrain.stages import load_config

    train = gym.export("instruct", "train", tmp_path / "train.jsonl", n=100)
    cfg = load_config("sft", None, [f"model={gym.base_model_path()}", f"data.train={train}", "data.max_length=128"])
    analysis = {**_data(n=100), "loss_fraction": 0.3, "baselines": None}
    out = advise(cfg, budget=parse_budget("cpu,0.0003h"), out_dir=tmp_path / "adv", analysis=analysis)
    assert out["recommendation"] == "prompting"
    assert out["reasons"][-1] == "no training method fits the budget: prompting only"
    trained = [c for c in out["candidates"] if c["method"] != "prompting"]
    assert all(c["over_time_budget"] and not c["fits"] for c in trained)
    assert all(c["wall_time_s"] > 1.08 for c in trained)


def test_d_a_memory_budget_too_small_for_lora_picks_qlora(tmp_path):
    """(d) Llama-2-7B (its config.json alone) on one 24 GB L4: LoRA in bf16 autocast keeps the 27 GB of
    fp32 base weights and does not fit; QLoRA (NF4 base, quantized on the CPU before it moves, so
    loading fits too) does. Planner-level: no GPU was lent to measure the run itself (docs/advise.md)."""
    from transformers import LlamaConfig

    from posttrain.plan.advise import advise
    from posttrain.stages import load_config

    model = tmp_path / "llama-2-7b"
    LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008).save_pretrained(model)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(2000)))
    cfg = load_config("sft", None, [f"model={model}", f"data.train={train}", "data.max_length=512",
                                    "train.batch_size=4"])
    out = advise(cfg, budget=parse_budget("1xL4-24GB,8h"), out_dir=tmp_path / "adv",
                 analysis={**_data(n=2000), "loss_fraction": 0.3, "baselines": None})
    c = {x["method"]: x for x in out["candidates"]}
    assert out["recommendation"] == "qlora"
    assert out["reasons"][-1] == "rule 6: LoRA does not fit the budget's memory, QLoRA (NF4 base) does"
    assert not c["lora"]["fits"] and not c["full"]["fits"] and c["qlora"]["fits"]
    assert c["qlora"]["peak_memory_bytes"] <= 0.95 * 24 * 10**9 < c["lora"]["peak_memory_bytes"]
    assert c["lora"]["change"] is None and c["qlora"]["change"] is None  # not even checkpointing rescues LoRA
    assert round(c["qlora"]["peak_memory_bytes"] / 2**30, 2) == 17.63 and round(c["lora"]["peak_memory_bytes"] / 2**30, 2) == 50.67
