"""Preference and RL stages under torchrun with 2 CPU processes (gloo).

DPO: 2 ranks x 2 pairs match 1 process x 4 pairs (LoRA, 6 steps), with the adapter-disabled
reference under DDP and the precomputed reference under FSDP2; the reward model likewise under
FSDP2 (full fine-tuning, 4 steps).
GRPO and PPO: sampling differs with the split of prompts over ranks, so they are checked for what
must hold instead: whole groups on one rank, disjoint prompts, rank 0 alone writing.
"""

import functools
import json

import pytest
import torch

from tests.engine.dist_util import losses, max_abs_diff, max_rel_diff, records, single, torchrun, weights

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 5e-5  # LoRA at lr 5e-3: AdamW's first steps amplify last-bit differences (measured 2.6e-5)
G = 4

PROBE = '''
import json, os

def reward(prompts, completions, **cols):
    """Varied rewards; records what each rank scored."""
    r = [float(len(c) % 3) for c in completions]
    with open(os.path.join(os.environ["PROBE_DIR"], "rank%s.jsonl" % os.environ.get("RANK", "0")), "a") as f:
        f.write(json.dumps({"prompts": prompts, "rewards": r}) + "\\n")
    return r
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    d = tmp_path_factory.mktemp("dist-stages")
    model = build_tiny_model("llama", d / "model", tokenizer=build_tokenizer())
    pref = d / "pref.jsonl"
    rows = []
    for i in range(32):
        a, b = i % 7, (i * 3) % 5
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"Hello {a + b + 1} {b}"}]})
    pref.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count {i} apples and {i % 5} pears:"}) + "\n"
                               for i in range(16)))
    (d / "probe").mkdir()
    (d / "probe" / "dist_probe.py").write_text(PROBE)
    return {"model": model, "pref": pref, "prompts": prompts, "probe": d / "probe"}


def _dpo_args(s, out, *extra, batch):
    return [f"model={s['model']}", f"data.train={s['pref']}", f"output_dir={out}", "train.max_steps=6",
            f"train.batch_size={batch}", "train.lr=5e-3", "train.seed=5", "train.progress=false",
            "data.max_length=64", "train.warmup_steps=0", "data.eval_fraction=0", "adapter.type=lora",
            "dpo.beta=0.5", *extra]


@pytest.fixture(scope="module")
def dpo_one_process(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-one") / "run"
    single(_dpo_args(setup, out, "dpo.reference=adapter", batch=4), stage="dpo")
    return out


@pytest.mark.parametrize("strategy,reference", [("ddp", "adapter"), ("fsdp", "precomputed")])
def test_dpo_two_ranks_match_one_process(setup, dpo_one_process, tmp_path, strategy, reference):
    """Each rank scores its own pairs under the reference (the adapter switched off through the DDP
    wrapper, or log-probs that the ranks precomputed in shares and gathered)."""
    two = tmp_path / "two"
    torchrun(_dpo_args(setup, two, f"dpo.reference={reference}", f"train.distributed={strategy}", batch=2),
             stage="dpo")
    la, lb = losses(dpo_one_process), losses(two)
    assert len(la) == len(lb) == 6
    assert la[-1] < la[0] - 0.1  # the policy moved away from the reference, so the reference matters
    rel = max_rel_diff(la, lb)
    w = max_abs_diff(weights(dpo_one_process, "adapter"), weights(two, "adapter"))
    print(f"dpo {strategy}/{reference}: max loss rel diff {rel:.2e}, max weight abs diff {w:.2e}")
    assert rel < LOSS_RTOL and w < WEIGHT_ATOL, (rel, w)
    if reference == "precomputed":
        # the gathered cache equals what one process computes over all pairs
        from safetensors.torch import load_file

        from posttrain.config import AdapterConfig
        from posttrain.data import read_records
        from posttrain.data.preference import to_preference_examples, tokenize_pairs
        from posttrain.models import adapters
        from posttrain.models.loading import load
        from posttrain.data.preference_batches import collate_pairs
        from posttrain.engine.reference import precompute_reference

        base, tok = load(setup["model"], device="cpu")
        model = adapters.apply(base, AdapterConfig(type="lora", r=8))
        items = tokenize_pairs(to_preference_examples(read_records(str(setup["pref"])), "paired"), tok,
                               max_length=64)
        ref = precompute_reference(model, {"train": items}, functools.partial(collate_pairs, pad_id=tok.pad_token_id),
                                   batch_size=3, path=tmp_path / "ref.safetensors", model_id="x")["train"]
        got = load_file(str(two / "reference_logps.safetensors"))["train"]
        assert got.shape == ref.shape == (32, 2)
        assert torch.allclose(got, ref, atol=1e-5)


def test_reward_model_two_ranks_match_one_process(setup, tmp_path):
    """The scalar head is read through the model's own forward, so FSDP2 all-gathers the body first."""
    args = [f"model={setup['model']}", f"data.train={setup['pref']}", "train.max_steps=4", "train.lr=1e-3",
            "train.seed=5", "train.progress=false", "data.max_length=64", "train.warmup_steps=0",
            "data.eval_fraction=0"]
    single([*args, f"output_dir={tmp_path / 'one'}", "train.batch_size=4"], stage="reward")
    torchrun([*args, f"output_dir={tmp_path / 'two'}", "train.batch_size=2", "train.distributed=fsdp"],
             stage="reward")
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    rel = max_rel_diff(la, lb)
    w = max_abs_diff(weights(tmp_path / "one"), weights(tmp_path / "two"))
    print(f"reward fsdp: max loss rel diff {rel:.2e}, max weight abs diff {w:.2e}")
    assert len(la) == 4 and rel < LOSS_RTOL and w < WEIGHT_ATOL, (rel, w)


def _rl_args(s, stage, out, *extra):
    return [f"model={s['model']}", f"data.train={s['prompts']}", f"output_dir={out}", "train.max_steps=2",
            "train.batch_size=2", "train.lr=1e-3", "train.seed=5", "train.progress=false", "train.warmup_steps=0",
            f"{stage}.max_new_tokens=8", f"{stage}.rewards=[dist_probe:reward]", *extra]


def _probe(setup, monkeypatch, name):
    d = setup["probe"] / name
    d.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(setup["probe"]))
    monkeypatch.setenv("PROBE_DIR", str(d))
    return d


def _scored(d, rank):
    return [json.loads(line) for line in (d / f"rank{rank}.jsonl").read_text().splitlines()]


def test_grpo_keeps_each_group_on_one_rank(setup, tmp_path, monkeypatch):
    """FSDP2, KL to the reference on: every rank samples all G completions of its own prompts, so the
    group-relative advantages are computed over whole groups; the two ranks' prompts are disjoint."""
    from posttrain.engine.sampler import BatchSampler
    from posttrain.losses.grpo import grpo_advantages

    d = _probe(setup, monkeypatch, "grpo")
    out = tmp_path / "grpo"
    r = torchrun(_rl_args(setup, "grpo", out, f"grpo.num_generations={G}", "grpo.beta=0.1",
                          "train.distributed=fsdp"), stage="grpo")
    assert r.stdout.count("finished:") == 1
    prompts = [json.loads(line)["prompt"] for line in setup["prompts"].read_text().splitlines()]
    one = BatchSampler(len(prompts), 4, seed=5)
    for step in range(2):
        seen = []
        for rank in (0, 1):
            call = _scored(d, rank)[step]
            ps = call["prompts"]
            assert len(ps) == 2 * G
            groups = [ps[i:i + G] for i in range(0, len(ps), G)]
            assert all(len(set(g)) == 1 for g in groups)  # G consecutive rows = one prompt
            adv = grpo_advantages(torch.tensor(call["rewards"]), G)
            assert torch.allclose(adv.view(-1, G).sum(1), torch.zeros(2), atol=1e-5)  # centred per group
            seen.append({g[0] for g in groups})
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == {prompts[i] for i in one.next_batch()}  # one process's global batch
    recs = records(out)
    assert [x["step"] for x in recs] == [1, 2] and all("reward" in x and "kl" in x for x in recs)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed" and m["result"]["distributed"] == {"strategy": "fsdp", "world_size": 2}


def test_ppo_runs_on_two_ranks_and_rank0_alone_writes(setup, tmp_path, monkeypatch):
    """DDP (the value head lives on the wrapped module): 2 steps, one metrics line per step, one report."""
    d = _probe(setup, monkeypatch, "ppo")
    out = tmp_path / "ppo"
    r = torchrun(_rl_args(setup, "ppo", out, "ppo.epochs=1", "train.distributed=ddp"), stage="ppo")
    assert r.stdout.count("finished:") == 1
    recs = records(out)
    assert [x["step"] for x in recs] == [1, 2]
    assert all(x["value_loss"] > 0 and "kl" in x for x in recs)
    assert (out / "report.html").exists() and (out / "model" / "model.safetensors").exists()
    assert not any(p.name.startswith("metrics") and p.name != "metrics.jsonl" for p in out.iterdir())
    # both ranks sampled, each its own prompts
    assert not {p for c in _scored(d, 0) for p in c["prompts"]} & {p for c in _scored(d, 1) for p in c["prompts"]}
    m = json.loads((out / "manifest.json").read_text())
    assert m["result"]["distributed"] == {"strategy": "ddp", "world_size": 2}
