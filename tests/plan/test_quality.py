"""`posttrain data check`: each finding on data built to have it, with its origins."""

import json

from posttrain.cli import main
from posttrain.data.sources import read_records
from posttrain.plan.quality import check_data, contamination, near_duplicate_pairs

STORY = ("the harbour master of Velmont counts the ships that arrive before dawn and writes their names "
         "in a ledger that nobody else is allowed to read")


def _rows():
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(40)]
    rows.append({"prompt": "Question 3: what is 3 + 3?", "completion": "It is 6."})  # exact copy of row 4
    rows.append({"prompt": "Tell me the story.", "completion": STORY})
    rows.append({"prompt": "Tell me the story.", "completion": STORY + " again"})  # near copy
    rows.append({"prompt": "Recite.", "completion": " ".join(["word"] * 400)})  # a length outlier
    return rows


def test_duplicates_near_duplicates_and_outliers_name_their_origins():
    rep = check_data(read_records(_rows(), name="rows"))
    assert rep.exact_duplicates == [["rows row 3", "rows row 40"]]
    assert [(d["a"], d["b"]) for d in rep.near_duplicates] == [("rows row 41", "rows row 42")]
    assert rep.near_duplicates[0]["jaccard"] >= 0.8
    assert [d["origin"] for d in rep.length_outliers] == ["rows row 43"]
    assert rep.counts["exact_duplicate_examples"] == 1 and rep.counts["length_unit"] == "words"


def test_held_out_contamination_is_found_and_a_clean_split_is_not():
    train = [STORY, "a completely different sentence about the weather in the mountains of the north today"]
    held = ["we found that " + STORY, "what is the capital of a country that does not exist at all in any atlas"]
    found = contamination(train, held)
    assert [(j, i) for j, i, _ in found] == [(0, 0)]
    assert found[0][2] > 0.6
    assert near_duplicate_pairs(["one two three four five six", "seven eight nine ten eleven twelve"]) == []


def test_arithmetic_that_differs_by_an_operator_is_not_a_duplicate():
    assert near_duplicate_pairs(["What is 11 + 0? 11", "What is 11 - 0? 11"]) == []


def test_tokenized_lengths_truncation_and_the_template_audit(tiny_models, tmp_path):
    import contextlib
    import io

    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi " * (3 + i)}]}
            for i in range(20)]
    rows.append({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_models("qwen2")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["data", "check", f"data.train={train}", f"model={model}", "data.max_length=50", "--json"]) == 0
    rep = json.loads(buf.getvalue())
    assert rep["counts"]["length_unit"] == "tokens"
    assert rep["counts"]["examples"] == 20
    assert rep["invalid"][0]["origin"] == f"{train} line 21" and rep["invalid"][0]["check"] == "format"
    assert "messages[1].role must be one of" in rep["invalid"][0]["message"]
    truncated = {d["origin"]: d["tokens"] for d in rep["truncated"]}
    # each extra "hi " is 3 tokens of the tiny tokenizer: rows 1-9 fit in 50 tokens, rows 10-20 do not
    assert sorted(truncated) == sorted(f"{train} line {i}" for i in range(10, 21))
    assert truncated[f"{train} line 10"] == 53 and rep["counts"]["truncated"] == 11
