"""The bad-input corpus: every broken file or row gives one error that names what is wrong and where.

Each case writes a file, reads it the way training (or evaluation, or loading) does, and checks
the whole place in the message: the file, the line or row, the field. tests/cli/test_errors.py runs
a subset through the `posttrain` command.
"""

import json
import shutil

import pytest

from posttrain.data.formats import to_examples
from posttrain.data.sources import DataError, read_records
from posttrain.eval.tasks import TaskError, load_task
from posttrain.models.loading import ModelLoadError, load

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
S = {"role": "system", "content": "Be brief."}
T = {"role": "tool", "content": "42"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1}}]}


def _jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": ["a" * 50] * 20}), f)
    return f.read_bytes()


# (file name, content, message after "<path>" (with %s for the path) ; content may be a callable of tmp_path)
FILES = [
    ("u16.jsonl", '{"text": "hi"}\n'.encode("utf-16"), "%s: the file is UTF-16-encoded; save it as UTF-8"),
    ("u16.json", '[{"text": "hi"}]'.encode("utf-16"), "%s: the file is UTF-16-encoded; save it as UTF-8"),
    ("u16.csv", "text\nhi\n".encode("utf-16"), "%s: the file is UTF-16-encoded; save it as UTF-8"),
    ("u16be.jsonl", '{"text": "hi"}\n'.encode("utf-16-be").join([b"\xfe\xff", b""]), "%s: the file is UTF-16-encoded"),
    ("u32.jsonl", '{"text": "hi"}\n'.encode("utf-32"), "%s: the file is UTF-32-encoded; save it as UTF-8"),
    ("u16nobom.jsonl", '{"text": "hi"}\n'.encode("utf-16-le"),
     "%s line 1: a NUL byte at column 2: binary data, or a UTF-16 file without a byte-order mark"),
    ("badutf8.jsonl", _jsonl({"text": "a"}, {"text": "b"}) + b'{"text": "caf\xe9"}\n',
     "%s line 3: not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8"),
    ("badutf8bom.jsonl", b'\xef\xbb\xbf{"text": "ok"}\n{"text": "\xc3"}\n',
     "%s line 2: not valid UTF-8 (byte 0xc3 at column 11)"),
    ("latin1.csv", "text\ncaf\xe9\n".encode("latin-1"), "%s line 2: not valid UTF-8 (byte 0xe9 at column 4)"),
    ("latin1.json", '[{"text": "caf\xe9"}]'.encode("latin-1"), "%s line 1: not valid UTF-8 (byte 0xe9 at column 15)"),
    ("nul.jsonl", _jsonl({"text": "a"}) + b"\x00\x01\x02garbage\n", "%s line 2: a NUL byte at column 1"),
    ("png.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "%s line 3: a NUL byte at column 1"),
    ("png2.jsonl", b"\x89PNG\r\nIHDR", "%s line 1: not valid UTF-8 (byte 0x89 at column 1)"),
    ("empty.jsonl", b"", "%s: the file holds no rows"),
    ("blank.jsonl", b"\n  \n\n", "%s: the file holds no rows"),
    ("empty.csv", b"", "%s: the file holds no rows"),
    ("header.csv", b"text\n", "%s: the file holds no rows"),
    ("empty.json", b"[]", "%s: the file holds no rows"),
    ("emptydata.json", b'{"data": []}', "%s: the file holds no rows"),
    ("garbage.parquet", b"PAR1 this is not parquet", "%s: not a readable parquet file ("),
    ("empty.parquet", b"", "%s: not a readable parquet file ("),
    ("cut.parquet", lambda tmp: _parquet_bytes(tmp)[:-30], "%s: not a readable parquet file ("),
    ("malformed.jsonl", _jsonl({"text": "a"}) + b'{"text": "b",}\n',
     "%s line 2: malformed JSON (Expecting property name enclosed in double quotes at column 14)"),
    ("cutline.jsonl", _jsonl({"text": "a"}, {"text": "b"}) + b'{"text": "unfinish',
     "%s line 3: malformed JSON (Unterminated string starting at at column 10)"),
    ("array.jsonl", b"[1, 2]\n", "%s line 1: expected a JSON object, got list"),
    ("string.jsonl", _jsonl({"text": "a"}) + b'"just text"\n', "%s line 2: expected a JSON object, got str"),
    ("malformed.json", b'[\n{"text": "a"},\n{"text": }\n]', "%s line 3: malformed JSON (Expecting value at column 10)"),
    ("object.json", b'{"rows": []}', "%s: expected a JSON list of objects"),
    ("notdict.json", b'[{"text": "a"}, 3]', "%s row 1: expected an object (dict), got int"),
    ("cells.csv", b"text\nhello,extra\n", "%s line 2: more cells than the 1 header columns"),
    ("msgs.csv", b'messages\n"[{""role"": ""user"", ]"\n', "%s line 2: column 'messages' is not valid JSON"),
    ("notes.txt", b"hello", "%s: unsupported file type '.txt'; use one of .jsonl, .json, .parquet, .csv"),
]


@pytest.mark.parametrize("name, content, message", FILES, ids=[f[0] for f in FILES])
def test_bad_file_names_file_and_line(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content(tmp_path) if callable(content) else content)
    with pytest.raises(DataError) as e:
        read_records(f)
    assert str(e.value).startswith(message % f), str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=f"^data file not found: {tmp_path / 'nope.jsonl'}$"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"^{tmp_path} is a directory; give a data file"):
        read_records(tmp_path)


# rows that read fine but are not usable: (rows, message after "<path> line N: ")
ROWS = [
    ([{"messages": [U, {"role": "bot", "content": "x"}]}],
     "line 1: messages[1].role must be one of system/user/assistant/tool, got 'bot'"),
    ([{"messages": [{"content": "x"}, A]}], "line 1: missing field 'messages[0].role'"),
    ([{"messages": [{"role": "user", "content": 3}, A]}], "line 1: messages[0].content must be a string, got int"),
    ([{"messages": [U, {"role": "assistant", "content": "  "}]}], "line 1: messages[1].content is empty"),
    ([{"messages": "Hi"}], "line 1: messages must be a list of messages, got str"),
    ([{"messages": []}], "line 1: messages is empty"),
    ([{"messages": [U, A]}, {"messages": [S, U]}],
     "line 2: messages has no assistant turn, so there is nothing to train on"),
    ([{"messages": [U, A, S, U, A]}],
     "line 1: messages[2] is a system message after the conversation started; a system message may only come first"),
    ([{"messages": [T, U, A]}],
     "line 1: messages[0] is a tool result with no tool call before it (a tool message must follow an assistant "
     "message with tool_calls)"),
    ([{"messages": [U, A, T, A]}], "line 1: messages[2] is a tool result with no tool call before it"),
    ([{"messages": [U, CALL, T, A, U, T, A]}], "line 1: messages[5] is a tool result with no tool call before it"),
    ([{"messages": [U, A, U]}],
     "line 1: messages ends on a user turn (messages[2]), which nothing after it is trained on: end the "
     "conversation with the assistant's answer, or drop that turn"),
    ([{"messages": [U, CALL, T]}], "line 1: messages ends on a tool turn (messages[2])"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                         {"from": "human", "value": "More?"}]}],
     "line 1: conversations ends on a user turn (conversations[2])"),
    ([{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                                                {"from": "system", "value": "Now rude."},
                                                {"from": "gpt", "value": "Ok"}]}],
     "line 1: conversations[2] is a system message after the conversation started"),
    ([{"conversations": [{"from": "observation", "value": "42"}, {"from": "gpt", "value": "Yo"}]}],
     "line 1: conversations[0] is a tool result with no tool call before it"),
    ([{"conversations": [{"from": "alien", "value": "Hi"}]}], "line 1: conversations[0].from must be one of system/"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]}],
     "line 1: missing field 'conversations[1].value'"),
    ([{"messages": [{**U, "tool_calls": []}, A]}],
     "line 1: messages[0].tool_calls is only allowed on assistant messages, got role 'user'"),
    ([{"messages": [U, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}]}],
     "line 1: messages[1].tool_calls must be a list, got dict"),
    ([{"messages": [U, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]}],
     "line 1: messages[1].tool_calls[0] needs a function name (function.name)"),
    ([{"messages": [U, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{x"}]}]}],
     "line 1: messages[1].tool_calls[0].function.arguments is not valid JSON"),
    ([{"messages": [U, A], "tools": {"name": "f"}}], "line 1: tools must be a list of JSON schemas (objects)"),
    ([{"messages": [U, A], "tools": "[{"}], "line 1: tools is a string but not valid JSON"),
    ([{"text": "ok"}, {"text": " "}], "line 2: text is empty"),
    ([{"text": 5}], "line 1: text must be a string, got int"),
    ([{"prompt": "Hi"}], "line 1: missing field 'completion' (prompt-completion data)"),
    ([{"prompt": "Hi", "completion": [A]}], "line 1: completion must be a string when prompt is a string, got list"),
    ([{"prompt": {"q": "Hi"}, "completion": "x"}], "line 1: prompt must be a string or a list of messages, got dict"),
    ([{"prompt": [U], "completion": [U]}], "line 1: completion has no assistant message, so there is nothing to train"),
    ([{"prompt": [U, S], "completion": [A]}], "line 1: prompt[1] is a system message after the conversation started"),
    ([{"prompt": [U], "completion": [T, A]}], "line 1: completion[0] is a tool result with no tool call before it"),
    ([{"foo": 1}], "line 1: cannot tell the format from the fields ['foo']; expected 'text', 'prompt' + 'completion'"),
    ([{"text": "a"}, {"messages": [U, A]}], "line 2: row is conversational but the data set is text (detected from"),
]


@pytest.mark.parametrize("rows, message", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_bad_row_names_file_line_and_field(tmp_path, rows, message):
    f = tmp_path / "train.jsonl"
    f.write_bytes(_jsonl(*rows))
    with pytest.raises(DataError) as e:
        to_examples(read_records(f))
    assert str(e.value).startswith(f"{f} {message}"), str(e.value)


def test_good_tool_conversation_is_accepted(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(_jsonl({"messages": [S, U, CALL, T, T, A]}))
    assert [m["role"] for m in to_examples(read_records(f))[0].messages] == \
        ["system", "user", "assistant", "tool", "tool", "assistant"]


# task files read by evaluation: the same reader, the same messages
TASKS = [
    ('{"prompt": "Q", "choices": ["a", "b"], "label": 0}\n'.encode("utf-16"),
     "%s: the file is UTF-16-encoded; save it as UTF-8"),
    (b'{"prompt": "Q", "choices": ["a", "b"], "label": 0}\n{"prompt": \n', "%s line 2: malformed JSON (Expecting value"),
    (b"", "%s: the file holds no rows"),
    (b'{"prompt": "Q", "choices": ["a", "b"], "label": 0}\n{"prompt": "Q", "choices": ["a"], "label": 0}\n',
     "caps.jsonl line 2: task 'caps' (multiple_choice) needs 'choices' (a list of at least 2 strings)"),
    (b'{"prompt": "Q", "choices": ["a", "b"], "label": 5}\n',
     "caps.jsonl line 1: task 'caps' (multiple_choice) needs 'label' (an index into choices, 0-1)"),
]


@pytest.mark.parametrize("content, message", TASKS, ids=[f"task{i}" for i in range(len(TASKS))])
def test_bad_task_data(tmp_path, content, message):
    (tmp_path / "caps.jsonl").write_bytes(content)
    (tmp_path / "caps.yaml").write_text("name: caps\nkind: multiple_choice\ndata: caps.jsonl\n")
    with pytest.raises(TaskError) as e:
        load_task(tmp_path / "caps.yaml")
    assert str(e.value).startswith(message.replace("%s", str(tmp_path / "caps.jsonl"))), str(e.value)


@pytest.mark.parametrize("yaml_text, message", [
    ("name: caps\nkind: [\n", "caps.yaml: not valid YAML"),
    ("name: caps\nkinds: multiple_choice\ndata: caps.jsonl\n", "caps.yaml: unknown key 'kinds' (did you mean 'kind'?)"),
    ("name: caps\nkind: multiple_choice\n", "caps.yaml: 'data' (a JSONL file, relative to the YAML file) is required"),
])
def test_bad_task_file(tmp_path, yaml_text, message):
    (tmp_path / "caps.jsonl").write_bytes(b'{"prompt": "Q", "choices": ["a", "b"], "label": 0}\n')
    (tmp_path / "caps.yaml").write_text(yaml_text)
    with pytest.raises(TaskError) as e:
        load_task(tmp_path / "caps.yaml")
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)


# damaged model directories: (damage, message with %s for the model directory)
def _cut(name, n):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:n])


MODELS = [
    (_cut("model.safetensors", 5000), "%s/model.safetensors: truncated (5000 bytes, its header describes"),
    (_cut("model.safetensors", 20), "%s/model.safetensors: not a readable safetensors file (damaged or truncated "
                                    "header, 20 bytes)"),
    (_cut("model.safetensors", 0), "%s/model.safetensors: not a readable safetensors file"),
    (_cut("config.json", 40), "%s/config.json: the model config is damaged or truncated (not valid JSON at line"),
    (lambda d: (d / "config.json").write_text("[]"), "%s/config.json: the model config must be a JSON object, got list"),
    (_cut("tokenizer.json", 40), "%s/tokenizer.json: a tokenizer file is damaged or truncated (not valid JSON"),
    (_cut("tokenizer_config.json", 30), "%s/tokenizer_config.json: a tokenizer file is damaged or truncated"),
    (lambda d: (d / "model.safetensors").unlink(), "%s has no weights (*.safetensors)"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
     "%s holds only pickle weights (.bin/.pt), which can run code when loaded"),
    (lambda d: (d / "config.json").unlink(), "%s is not a Hugging Face model directory (no config.json)"),
]


@pytest.mark.parametrize("damage, message", MODELS, ids=[f"model{i}" for i in range(len(MODELS))])
def test_damaged_model_names_the_file(tiny_models, tmp_path, damage, message):
    d = tmp_path / "m"
    shutil.copytree(tiny_models("qwen2"), d)
    damage(d)
    with pytest.raises(ModelLoadError) as e:
        load(d, device="cpu")
    assert str(e.value).startswith(message % d), str(e.value)


def test_missing_model_and_unreachable_hub_name(tmp_path):
    with pytest.raises(ModelLoadError, match=f"^model directory not found: {tmp_path / 'nope'}; give a directory"):
        load(tmp_path / "nope")
    with pytest.raises(ModelLoadError) as e:
        load("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in the tests (conftest)
    assert str(e.value).startswith("model 'no-such-org/no-such-model' is not a local directory, and the hub could "
                                   "not be reached or has no such model (offline?). Download it first")


def test_run_with_corrupt_manifest_is_not_loaded(tiny_models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_models("qwen2"), run / "model")
    (run / "manifest.json").write_text('{"status": "compl')
    with pytest.raises(ModelLoadError) as e:
        load(run)
    assert str(e.value).startswith(f"{run}/manifest.json: the run's manifest is damaged or truncated")
