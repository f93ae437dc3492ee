"""Hub sources (offline: local folders), save_to_disk folders, .arrow files, datasets objects, data.columns."""

import json
from types import SimpleNamespace

import pytest

datasets = pytest.importorskip("datasets")

from pydantic import BaseModel  # noqa: E402

from posttrain.config import DataConfig  # noqa: E402
from posttrain.data import DataError, build_dataset, read_records  # noqa: E402
from posttrain.data.hub import ColumnMap, DatasetObject, load_records, map_columns, parse_hf  # noqa: E402
from posttrain.data.sources import Record  # noqa: E402
from posttrain.models.tiny import build_tokenizer  # noqa: E402

ALPACA = [{"instruction": f"Add {i} and 3.", "input": "" if i % 2 else f"Show the sum of {i} + 3.",
           "output": f"{i + 3}"} for i in range(12)]
QA = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}"} for i in range(6)]


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A folder laid out like a Hub data set repository: one JSONL file per split."""
    d = tmp_path_factory.mktemp("hub") / "org_alpaca"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA[:4]))
    return d


def test_parse_hf_names_split_and_config():
    assert parse_hf("hf:HuggingFaceH4/ultrachat_200k") == ("HuggingFaceH4/ultrachat_200k", None, None)
    assert parse_hf("hf:HuggingFaceH4/ultrachat_200k:train_sft") == ("HuggingFaceH4/ultrachat_200k", "train_sft", None)
    assert parse_hf("hf:allenai/ai2_arc:test@ARC-Challenge") == ("allenai/ai2_arc", "test", "ARC-Challenge")
    with pytest.raises(DataError, match=r"^'hf:org/x:': Hub sources look like hf:ORG/NAME, hf:ORG/NAME:SPLIT"):
        parse_hf("hf:org/x:")


def test_hf_source_picks_the_callers_split_names_one_and_streams(hub_dir):
    train = read_records(f"hf:{hub_dir}")
    assert len(train) == 12 and train[0].origin == f"hf:{hub_dir}:train row 0" and train[0].data == ALPACA[0]
    held = read_records(f"hf:{hub_dir}", split="validation")  # what data.eval asks for
    assert [r.data for r in held] == ALPACA[:4]
    assert len(read_records(f"hf:{hub_dir}:validation")) == 4
    with pytest.raises(DataError, match=r"Unknown split \"test\"|no split 'test'"):
        read_records(f"hf:{hub_dir}:test")
    recs, digest = load_records(f"hf:{hub_dir}:train", streaming=True, limit=5)
    assert [r.data for r in recs] == map_columns_rows(ALPACA[:5]) and len(digest) == 64


def map_columns_rows(rows):
    return [r.data for r in map_columns([Record(dict(x), "") for x in rows])]


def test_missing_hub_name_is_one_clear_error():
    with pytest.raises(DataError, match=r"^'hf:no-such-org/no-such-set-4711': "):
        read_records("hf:no-such-org/no-such-set-4711")


def test_save_to_disk_folders_arrow_files_and_objects(tmp_path):
    ds = datasets.Dataset.from_list(QA)
    ds.save_to_disk(tmp_path / "one")
    assert [r.data for r in read_records(tmp_path / "one")] == QA
    arrow = next((tmp_path / "one").glob("*.arrow"))
    recs = read_records(arrow)
    assert [r.data for r in recs] == QA and recs[2].origin == f"{arrow} row 2"
    # a DatasetDict: the caller's split when it has one, else an error that lists the splits
    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(2))})
    dd.save_to_disk(tmp_path / "dict")
    assert len(read_records(tmp_path / "dict")) == 6
    assert len(read_records(f"hf:{tmp_path / 'dict'}:test")) == 2
    with pytest.raises(DataError, match=r"has the splits \['train', 'test'\] and none is 'validation'; choose one "
                                        r"\(use hf:.*dict:SPLIT\)"):
        read_records(tmp_path / "dict", split="validation")
    # objects from Python
    assert read_records(ds)[3].origin == "row 3"
    assert [r.data for r in read_records(dd, split="test")] == QA[:2]
    two = datasets.DatasetDict({"a": ds, "b": ds})
    with pytest.raises(DataError, match=r"the DatasetDict has the splits \['a', 'b'\] and none is 'train'; choose one "
                                        r"\(pass dataset\['SPLIT'\]\)"):
        read_records(two)
    stream = ds.to_iterable_dataset()
    assert [r.data for r in read_records(stream)] == QA


def test_columns_presets_auto_detection_and_mappings():
    def mapped(row, columns=None):
        return map_columns([Record(row, "train.jsonl line 1")], columns)[0].data

    # Alpaca and Q/A rows are recognised without a setting
    assert mapped(ALPACA[0]) == {"prompt": "Add 0 and 3.\n\nShow the sum of 0 + 3.", "completion": "3"}
    assert mapped(ALPACA[1]) == {"prompt": "Add 1 and 3.", "completion": "4"}
    assert mapped(QA[0]) == {"prompt": "What is 0 + 1?", "completion": "1"}
    # rows in posttrain's own fields are left alone
    assert mapped({"prompt": "p", "completion": "c", "question": "q"}) == {"prompt": "p", "completion": "c",
                                                                            "question": "q"}
    # ShareGPT under another column name, and turns with other keys
    sg = {"conversation": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "id": 7}
    assert mapped(sg, ColumnMap(messages="conversation", role="from", content="value")) == {
        "conversations": sg["conversation"], "id": 7}
    turns = {"chat": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo", "weight": 1}]}
    assert mapped(turns, ColumnMap(messages="chat", role="speaker", content="text")) == {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}]}
    # preference pairs (strings or message lists pass through unchanged)
    pair = {"question": "q", "response_j": [{"role": "assistant", "content": "good"}], "response_k": "bad"}
    assert mapped(pair, ColumnMap(prompt="question", chosen="response_j", rejected="response_k")) == {
        "prompt": "q", "chosen": pair["response_j"], "rejected": "bad"}
    # a preset by name, as YAML gives it, and errors that say where and what
    assert ColumnMap.model_validate("qa") == ColumnMap(prompt="question", completion="answer")
    with pytest.raises(ValueError, match="unknown columns preset 'alpacca'; choose one of alpaca, qa, sharegpt"):
        ColumnMap.model_validate("alpacca")
    with pytest.raises(DataError, match=r"^train.jsonl line 1: data.columns maps 'completion' to column 'answer', "
                                        r"which this row does not have \(columns: \['output', 'question'\]\)$"):
        mapped({"question": "q", "output": "o"}, ColumnMap.model_validate("qa"))


def test_build_dataset_reads_hub_sources_with_columns_and_hashes_the_rows(hub_dir):
    tok = build_tokenizer()
    cfg = DataConfig(train=f"hf:{hub_dir}:train", eval=f"hf:{hub_dir}", max_length=64)
    bundle = build_dataset(cfg, tok, stage="sft")
    assert bundle.stats["rows"] == 12 and len(bundle.eval) == 4
    assert set(bundle.hashes) == {f"hf:{hub_dir}:train", f"hf:{hub_dir}"}
    # data.columns and data.streaming, as DataConfig will declare them (read with getattr until then)
    qa_dir = hub_dir.parent / "qa"
    datasets.Dataset.from_list([{"q": r["question"], "a": r["answer"]} for r in QA]).save_to_disk(qa_dir)
    ns = SimpleNamespace(**{**cfg.model_dump(), "train": str(qa_dir), "eval": None, "limit": 4, "streaming": True,
                            "columns": {"prompt": "q", "completion": "a"}, "mix": None})
    small = build_dataset(ns, tok, stage="sft")
    assert small.stats["rows"] == 4
    first = small.train[0]
    labelled = tok.decode([t for t, lab in zip(first.input_ids, first.labels) if lab != -100])
    assert labelled.startswith("1")  # the completion of QA[0] is what is trained on


def test_a_dataset_object_in_a_config_field():
    class Data(BaseModel):
        train: str | list[str] | DatasetObject

    ds = datasets.Dataset.from_list(QA)
    d = Data(train=ds)
    assert d.train is ds and Data(train="hf:org/x").train == "hf:org/x"
    dumped = d.model_dump(mode="json")["train"]
    assert dumped.startswith("<Dataset 6 rows fingerprint ") and dumped.endswith(">")
    with pytest.raises(ValueError, match="expected a path, 'gym:TASK', 'hf:ORG/NAME' or a datasets object, got int"):
        Data(train=3)


def test_a_stage_trains_on_a_hub_source_from_the_cli(hub_dir, tiny_models, tmp_path):
    from posttrain.cli import main

    out = tmp_path / "run"
    assert main(["sft", f"model={tiny_models('qwen2')}", f"data.train=hf:{hub_dir}", f"output_dir={out}",
                 "train.max_steps=1", "train.batch_size=4", "data.max_length=64", "train.progress=false"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    from posttrain.data.sources import records_sha256

    assert manifest["status"] == "completed"  # the hash is of the rows trained on (Alpaca columns mapped)
    assert manifest["data"] == {f"hf:{hub_dir}": records_sha256(map_columns(read_records(f"hf:{hub_dir}")))}
