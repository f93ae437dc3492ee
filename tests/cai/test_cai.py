"""Constitutional AI on a tiny checkpoint: the loop's provenance, and the choice-token comparison by hand."""

import json
import math
import random

import pytest
import torch

from posttrain.cai import (ConstitutionError, compare_pairs, critique_and_revise, first_preferred, load_constitution,
                           load_templates)
from posttrain.cli import main
from posttrain.models.loading import load

PROMPTS = [{"prompt": "How do I kill a python process?"}, {"messages": [{"role": "user", "content": "Say 3."},
                                                                        {"role": "assistant", "content": "3."}]},
           {"prompt": [{"role": "user", "content": "What is 2 + 2?"}]}]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    path = tiny_models("qwen2")
    model, tok = load(path, device="cpu")
    return path, model.eval(), tok


def test_constitution_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("# harmlessness\n- Do not help with violence.\n\n2. Be honest.\n* Be brief.\n")
    ps = load_constitution(txt)
    assert [(p.id, p.text) for p in ps] == [("p0", "Do not help with violence."), ("p1", "Be honest."), ("p2", "Be brief.")]
    y = tmp_path / "c.yaml"
    y.write_text("principles:\n  - Be kind.\n  - {id: honest, text: Be honest., critique: 'Was it honest? {response}'}\n")
    ps = load_constitution(y)
    assert ps[1].id == "honest" and ps[1].critique == "Was it honest? {response}"
    y.write_text("- {text: Be kind., critque: x}\n")
    with pytest.raises(ConstitutionError, match=r"principle 0: unknown key 'critque' \(did you mean 'critique'\?\)"):
        load_constitution(y)
    with pytest.raises(ConstitutionError, match="non-empty list"):
        load_constitution([])


def test_templates_are_overridable_and_checked():
    t = load_templates({"critique": "Does '{response}' break '{principle}'?", "choices": [" X", " Y"]})
    assert t["critique"].startswith("Does") and t["choices"] == [" X", " Y"] and "{a}" in t["compare"]
    with pytest.raises(ConstitutionError, match=r"unknown template 'critic' \(did you mean 'critique'\?\)"):
        load_templates({"critic": "x"})
    with pytest.raises(ConstitutionError, match=r"template 'revision' uses unknown field\(s\) \['answer'\]"):
        load_templates({"revision": "Fix {answer}"})


def test_critique_and_revision_rows_carry_provenance(tiny):
    path, model, tok = tiny
    ps = load_constitution(["Do not help with violence.", "Be honest.", "Be brief."])
    t = load_templates()
    st = {}
    rows = critique_and_revise(model, tok, PROMPTS, ps, t, model_name=str(path), seed=7, max_new_tokens=8, stats=st)
    assert st["empty_revision"] == 0, st  # a random tiny model rarely stops at once; the test needs 3 rows
    drawn = [random.Random(7).choice(ps) for _ in range(1)]  # the first draw of the seeded generator
    assert len(rows) == 3 and rows[0]["cai"]["principle"]["text"] == drawn[0].text
    for r, prompt in zip(rows, ["How do I kill a python process?", "Say 3.", "What is 2 + 2?"]):
        c = r["cai"]
        assert r["messages"][0] == {"role": "user", "content": prompt}
        assert r["messages"][-1] == {"role": "assistant", "content": c["revision"]}
        assert c["kind"] == "critique_revision" and c["model"] == str(path) and c["seed"] == 7
        assert c["principle"]["text"] in c["critique_request"] and c["principle"]["text"] in c["revision_request"]
        assert isinstance(c["critique"], str) and isinstance(c["initial_response"], str)
        assert c["revised"] == (c["revision"] != c["initial_response"])
    # greedy: the same seed gives the same rows
    assert critique_and_revise(model, tok, PROMPTS, ps, t, model_name=str(path), seed=7, max_new_tokens=8) == rows
    # the rows are ordinary SFT data (the `cai` field rides along)
    from posttrain.data import read_records
    from posttrain.data.formats import to_example

    ex = to_example(read_records(rows)[0])
    assert ex.kind == "conversational" and ex.messages[-1]["content"] == rows[0]["cai"]["revision"]


def _hand_logprob(model, tok, prompt: str, choice: str) -> float:
    """log p(choice | prompt): one unpadded forward pass, log-softmax, sum over the choice's tokens."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
    lsm = torch.log_softmax(logits, -1)
    return sum(float(lsm[len(p) - 1 + j, t]) for j, t in enumerate(c))


def test_comparison_is_read_from_choice_token_logprobs(tiny):
    path, model, tok = tiny
    ps = load_constitution(["Be honest."])
    t = load_templates()
    stats = {}
    rows = compare_pairs(model, tok, PROMPTS, ps, t, model_name=str(path), seed=3, max_new_tokens=8, stats=stats)
    assert stats["prompts"] == 3 and stats["pairs"] == len(rows) == 3 - stats["identical"] - stats["empty"] - stats["low_confidence"]
    assert rows, stats
    for r in rows:
        c = r["cai"]
        a1, a2 = c["answers"]
        # order 1 shows answer 1 as (A); its comparison prompt ends with the prefix the choices follow
        assert c["compare_prompt"].endswith(t["compare_prefix"]) and f"(A) {a1}\n(B) {a2}" in c["compare_prompt"]
        l1 = [_hand_logprob(model, tok, c["compare_prompt"], ch) for ch in t["choices"]]
        assert c["choice_logprobs"]["order_1"] == pytest.approx(l1, abs=1e-4)
        # order 2: the same with the answers swapped
        p2 = c["compare_prompt"].replace(f"(A) {a1}\n(B) {a2}", f"(A) {a2}\n(B) {a1}")
        l2 = [_hand_logprob(model, tok, p2, ch) for ch in t["choices"]]
        assert c["choice_logprobs"]["order_2"] == pytest.approx(l2, abs=1e-4)
        p_first = (math.exp(l1[0]) / (math.exp(l1[0]) + math.exp(l1[1]))
                   + math.exp(l2[1]) / (math.exp(l2[0]) + math.exp(l2[1]))) / 2
        assert c["p_first_better"] == pytest.approx(p_first, abs=1e-4)
        assert r["chosen"][0]["content"] == (a1 if p_first >= 0.5 else a2)
        assert r["rejected"][0]["content"] == (a2 if p_first >= 0.5 else a1)
    # the rows are ordinary preference data
    from posttrain.data import read_records
    from posttrain.data.preference import to_preference_examples

    assert len(to_preference_examples(read_records(rows), "paired")) == len(rows)


def test_first_preferred_formula():
    lp1 = torch.log(torch.tensor([[0.6, 0.2]]))
    lp2 = torch.log(torch.tensor([[0.1, 0.3]]))
    assert float(first_preferred(lp1, lp2)) == pytest.approx((0.75 + 0.75) / 2)


def test_cli(tiny, tmp_path, capsys):
    path = tiny[0]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    cons = tmp_path / "c.txt"
    cons.write_text("Be honest.\nBe brief.\n")
    out = tmp_path / "rev.jsonl"
    assert main(["cai", "critique", "--model", str(path), "--prompts", str(prompts), "--constitution", str(cons),
                 "--out", str(out), "--max-new-tokens", "4", "--limit", "2"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and {r["cai"]["principle"]["text"] for r in rows} <= {"Be honest.", "Be brief."}
    assert "wrote 2 revised rows" in capsys.readouterr().out
    bad = tmp_path / "t.yaml"
    bad.write_text("compare: 'Pick {x}'\n")
    assert main(["cai", "compare", "--model", str(path), "--prompts", str(prompts), "--constitution", str(cons),
                 "--out", str(tmp_path / "p.jsonl"), "--templates", str(bad)]) == 2
    assert "template 'compare' uses unknown field(s) ['x']" in capsys.readouterr().err
