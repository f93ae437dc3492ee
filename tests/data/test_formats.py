"""Reading every source type and validating every row: each bad row gets an error naming file, line and field."""

import json

import pytest

from posttrain.data import DataError, read_records, to_example, to_examples
from posttrain.data.sources import Record


def ex(data, where="train.jsonl line 17"):
    return to_example(Record(data, where))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt": "What is 2 + 3?", "completion": " 5"}, {"prompt": "Reverse apple", "completion": " elppa"}]


def test_every_source_type_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "d.csv").write_text('prompt,completion\n"What is 2 + 3?", 5\nReverse apple, elppa\n')
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "e.parquet")
    sources = [jsonl, tmp_path / "b.json", tmp_path / "c.json", tmp_path / "d.csv", tmp_path / "e.parquet",
               ROWS, datasets.Dataset.from_list(ROWS)]
    for src in sources:
        recs = read_records(src)
        assert [r.data for r in recs] == ROWS, src
    assert [r.origin for r in read_records(jsonl)] == [f"{jsonl} line 1", f"{jsonl} line 2"]
    assert read_records(tmp_path / "d.csv")[1].origin.endswith("d.csv line 3")
    assert read_records(tmp_path / "e.parquet")[1].origin.endswith("e.parquet row 1")
    assert read_records(ROWS, name="mine")[0].origin == "mine row 0"


def test_csv_messages_column_holds_json(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    p = tmp_path / "chat.csv"
    p.write_text("messages\n" + '"' + json.dumps(msgs).replace('"', '""') + '"\n')
    assert to_examples(read_records(p))[0].messages == msgs


def test_missing_file_and_malformed_json(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"train.jsonl line 3: malformed JSON"):
        read_records(p)
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"train.jsonl line 2: expected a JSON object, got list"):
        read_records(p)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        read_records(tmp_path / "x.txt")


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("row, message", [
    ({"messages": [U, {"role": "bot", "content": "x"}]},
     "train.jsonl line 17: messages[1].role must be one of system/user/assistant/tool, got 'bot'"),
    ({"messages": [U, {"content": "x"}]}, "train.jsonl line 17: missing field 'messages[1].role'"),
    ({"messages": [U, {"role": "assistant"}]}, "train.jsonl line 17: missing field 'messages[1].content'"),
    ({"messages": [U, {"role": "assistant", "content": 5}]},
     "train.jsonl line 17: messages[1].content must be a string, got int"),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "train.jsonl line 17: messages[1].content is empty"),
    ({"messages": [U]}, "train.jsonl line 17: messages has no assistant turn, so there is nothing to train on"),
    ({"messages": []}, "train.jsonl line 17: messages is empty"),
    ({"messages": "hi"}, "train.jsonl line 17: messages must be a list of messages, got str"),
    ({"messages": [U, "hello"]}, "train.jsonl line 17: messages[1] must be an object with 'role' and 'content', got str"),
    ({"messages": [U, {"role": "user", "content": "x", "tool_calls": []}, A]},
     "train.jsonl line 17: messages[1].tool_calls is only allowed on assistant messages, got role 'user'"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     r"train.jsonl line 17: messages[1].tool_calls[0] needs a function name (function.name)"),
    ({"messages": [U, A], "tools": "{not json"}, "train.jsonl line 17: tools is a string but not valid JSON"),
    ({"prompt": "Hi"}, "train.jsonl line 17: missing field 'completion' (prompt-completion data)"),
    ({"prompt": "Hi", "completion": ""}, "train.jsonl line 17: completion is empty"),
    ({"prompt": 3, "completion": "x"}, "train.jsonl line 17: prompt must be a string or a list of messages, got int"),
    ({"prompt": "Hi", "completion": [A]},
     "train.jsonl line 17: completion must be a string when prompt is a string, got list"),
    ({"prompt": [U], "completion": [U]},
     "train.jsonl line 17: completion has no assistant message, so there is nothing to train on"),
    ({"text": ""}, "train.jsonl line 17: text is empty"),
    ({"text": None}, "train.jsonl line 17: text must be a string, got NoneType"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
     "train.jsonl line 17: conversations[1].from must be one of "),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
     "train.jsonl line 17: conversations[1].value is empty"),
    ({"question": "Hi"}, "train.jsonl line 17: cannot tell the format from the fields ['question']"),
])
def test_bad_rows_name_origin_and_field(row, message):
    with pytest.raises(DataError) as e:
        ex(row)
    assert str(e.value).startswith(message)


def test_sharegpt_converted_to_conversational():
    row = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "function_call", "value": "{}"}, {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "Done."}]}
    e = ex(row)
    assert e.kind == "conversational"
    assert [(m["role"], m["content"]) for m in e.messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("assistant", "{}"), ("tool", "ok"),
        ("assistant", "Done.")]


def test_formats_detected_and_normalized():
    assert ex({"text": "hello"}).kind == "text"
    pc = ex({"prompt": [U], "completion": "Hello"})  # bare answer to a conversational prompt
    assert pc.kind == "prompt_completion" and pc.completion == [A]
    call = ex({"messages": [U, {"role": "assistant", "content": None,
                                 "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}]}]})
    assert call.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    assert call.messages[1]["content"] == ""


def test_dataset_format_detected_once_and_enforced():
    recs = [Record({"text": "a"}, "f.jsonl line 1"), Record({"messages": [U, A]}, "f.jsonl line 2")]
    with pytest.raises(DataError, match=r"^f.jsonl line 2: row is conversational but the data set is text "
                                        r"\(detected from f.jsonl line 1\)"):
        to_examples(recs)
