"""Data from where users keep it: the Hugging Face Hub, `datasets` folders and objects, and column names.

Sources (anywhere a data path is accepted: `data.train`, `data.eval`, `data.mix.data`):

- ``hf:ORG/NAME[:SPLIT][@CONFIG]``: `datasets.load_dataset(ORG/NAME, CONFIG, split=SPLIT)`, e.g.
  ``hf:HuggingFaceH4/ultrachat_200k:train_sft``. A local folder works too (``hf:./my_set``, a
  folder of parquet/JSON files or one `save_to_disk` wrote), and so does anything already in the
  `datasets` cache when offline (``HF_DATASETS_OFFLINE=1``).
- a folder `Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote, and a single ``.arrow`` file;
- a `datasets.Dataset`, `DatasetDict` or `IterableDataset` passed from Python.

A `DatasetDict` without a chosen split uses the split the caller asks for (``train`` for
training data, ``validation`` for held-out data) when it exists, or its only split; otherwise
it is an error that lists the splits and says how to pick one. With ``streaming=True`` rows are
read one by one and reading stops after ``limit`` rows, so a large set is never downloaded whole.

Columns: `ColumnMap` (the `data.columns` setting) renames a data set's columns to the fields
posttrain reads (see `posttrain.data.formats` and `posttrain.data.preference`). Presets cover
the common schemas; without a mapping, rows that hold none of posttrain's own fields are
recognised as Alpaca (``instruction``/``input``/``output``) or question/answer rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, model_validator

from posttrain.data.sources import DataError, Record, file_sha256, read_records, records_sha256

HF_PREFIX = "hf:"
DEFAULT_SPLITS = {"train": "train", "validation": "validation"}


# ---------------------------------------------------------------- columns


class ColumnMap(BaseModel):
    """`data.columns`: for each field posttrain reads, the data set's column that holds it.

    A string picks a preset: `alpaca`, `qa`, `sharegpt`. Unset fields keep their
    own name, so `{completion: output}` renames one column and leaves the rest as they are.
    """

    model_config = ConfigDict(extra="forbid")

    text: Optional[str] = Field(None, description="Column with raw text (continued pretraining).")
    prompt: Optional[str] = Field(None, description="Column with the prompt (a string or a list of messages).")
    input: Optional[str] = Field(None, description="Column appended to the prompt after a blank line when not empty "
                                 "(Alpaca's `input`).")
    completion: Optional[str] = Field(None, description="Column with the completion to train on.")
    messages: Optional[str] = Field(None, description="Column with the conversation (a list of turns).")
    role: Optional[str] = Field(None, description="Key of a turn's speaker inside `messages` (ShareGPT: `from`).")
    content: Optional[str] = Field(None, description="Key of a turn's text inside `messages` (ShareGPT: `value`).")
    chosen: Optional[str] = Field(None, description="Column with the preferred answer (a string or messages).")
    rejected: Optional[str] = Field(None, description="Column with the dispreferred answer (a string or messages).")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in PRESETS:
                raise ValueError(f"unknown columns preset '{v}'; choose one of {', '.join(PRESETS)} or give a mapping "
                                 "such as {prompt: question, completion: answer}")
            return dict(PRESETS[v])
        return v

    def mapping(self) -> dict[str, str]:
        """{our field: their column} for the fields that are set."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


PRESETS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "input": "input", "completion": "output"},
    "qa": {"prompt": "question", "completion": "answer"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
}
# rows with none of these are matched against the presets' columns (`columns` left unset)
OWN_FIELDS = ("text", "prompt", "completion", "messages", "conversations", "chosen", "rejected")
_AUTO = ("alpaca", "qa")


def detect_columns(data: dict) -> Optional[ColumnMap]:
    """The preset a row's columns fit when it has none of posttrain's own fields (Alpaca or Q/A)."""
    if any(k in data for k in OWN_FIELDS):
        return None
    for name in _AUTO:
        need = [c for k, c in PRESETS[name].items() if k != "input"]
        if all(c in data for c in need):
            return ColumnMap.model_validate(name)
    return None


def map_columns(records: list[Record], columns: Optional[ColumnMap] = None) -> list[Record]:
    """Rename each record's columns to posttrain's fields; without a mapping, auto-detect Alpaca and Q/A rows."""
    columns = columns if columns is not None else ColumnMap()
    fixed = columns.mapping()
    out = []
    for rec in records:
        cmap = fixed or (detect_columns(rec.data) or ColumnMap()).mapping()
        out.append(Record(_map_row(rec.data, dict(cmap), rec.origin), rec.origin) if cmap else rec)
    return out


def _map_row(data: dict, cmap: dict[str, str], where: str) -> dict:
    role, content = cmap.pop("role", None), cmap.pop("content", None)
    sources = set(cmap.values())
    row = {k: v for k, v in data.items() if k not in sources}
    for field, column in cmap.items():
        if column not in data:
            if field == "input":
                continue  # Alpaca rows often drop an empty input
            raise DataError(f"{where}: data.columns maps '{field}' to column '{column}', which this row does not have "
                            f"(columns: {sorted(data)})")
        row[field] = data[column]
    extra = row.pop("input", None)
    if extra not in (None, ""):
        if not isinstance(row.get("prompt"), str) or not isinstance(extra, str):
            raise DataError(f"{where}: data.columns 'input' ({cmap['input']}) is added to a string prompt; got "
                            f"{type(row.get('prompt')).__name__} and {type(extra).__name__}")
        row["prompt"] = f"{row['prompt']}\n\n{extra}"
    if (role, content) == ("from", "value") and "messages" in row:
        row["conversations"] = row.pop("messages")  # ShareGPT: formats.py converts speakers and turns
    elif (role or content) and "messages" in row:
        row["messages"] = _map_turns(row["messages"], role or "role", content or "content", where)
    return row


def _map_turns(turns: Any, role: str, content: str, where: str) -> Any:
    if not isinstance(turns, list):
        return turns  # formats.py reports the wrong type with the row's origin
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or role not in t or content not in t:
            raise DataError(f"{where}: messages[{i}] lacks the keys data.columns names ('{role}', '{content}')")
        rest = {k: v for k, v in t.items() if k not in (role, content)}
        out.append({"role": t[role], "content": t[content], **rest})
    return out


# ---------------------------------------------------------------- sources


def is_hub_source(source: Any) -> bool:
    """True for what this module reads: `hf:` names, `save_to_disk` folders, `.arrow` files, `datasets` objects."""
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(HF_PREFIX):
            return True
        p = Path(text)
        return p.suffix == ".arrow" or (p.is_dir() and _saved_dataset(p))
    return type(source).__module__.startswith("datasets")


def _saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def parse_hf(source: str) -> tuple[str, Optional[str], Optional[str]]:
    """``hf:ORG/NAME[:SPLIT][@CONFIG]`` -> (name, split, config)."""
    body = source[len(HF_PREFIX):]
    body, _, config = body.partition("@")
    name, _, split = body.partition(":")
    if not name or (config == "" and source.endswith("@")) or (split == "" and body.endswith(":")):
        raise DataError(f"'{source}': Hub sources look like hf:ORG/NAME, hf:ORG/NAME:SPLIT or hf:ORG/NAME:SPLIT@CONFIG")
    return name, split or None, config or None


def read_hub(source: Any, *, split: str = "train", name: Optional[str] = None, streaming: bool = False,
             limit: Optional[int] = None) -> list[Record]:
    """Every row (or the first `limit`) of a Hub name, `datasets` folder/file or object as `Record`s.

    `split` is the split used when the source names none and holds several (``train`` or
    ``validation``). Origins read like ``hf:ORG/NAME:train row 17``.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"{_label(source)}: reading it needs the datasets package (pip install 'posttrain[data]')") \
            from None
    ds, label = _open(source, split, streaming, datasets)
    label = name or label
    rows = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        rows.append(Record(dict(row), f"{label} row {i}" if label else f"row {i}"))
    if not rows:
        raise DataError(f"{label}: the data set holds no rows")
    return rows


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"a {type(source).__name__}"


def _open(source: Any, split: str, streaming: bool, datasets) -> tuple[Any, str]:
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source, ""
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        key = _pick_split(source, None, split, "the DatasetDict", "pass dataset['SPLIT']")
        return source[key], f"[{key}]"
    text = str(source)
    if text.startswith(HF_PREFIX):
        name, want, config = parse_hf(text)
        ds = _load_hub(text, name, config, want, streaming, datasets)
    elif text.endswith(".arrow"):
        if not Path(text).is_file():
            raise DataError(f"data file not found: {text}")
        return datasets.Dataset.from_file(text), text
    else:
        want = None
        ds = _load_from_disk(text, datasets)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        hint = f"add the split: {text}:SPLIT" if text.startswith(HF_PREFIX) else f"use hf:{text}:SPLIT"
        key = _pick_split(ds, want, split, text, hint)
        return ds[key], (f"{text}:{key}" if text.startswith(HF_PREFIX) and want is None else text)
    return ds, text


def _load_hub(source: str, name: str, config: Optional[str], split: Optional[str], streaming: bool, datasets):
    p = Path(name)
    if p.is_dir() and _saved_dataset(p):  # hf:./folder that save_to_disk wrote
        ds = _load_from_disk(name, datasets)
        return ds[split] if split and isinstance(ds, datasets.DatasetDict) and split in ds else ds
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except (FileNotFoundError, ConnectionError) as e:
        raise DataError(f"'{source}': no data set '{name}' found locally or on the Hub ({_first_line(e)}); check the "
                        "name, or download it first while online (it is then read from the cache)") from None
    except ValueError as e:  # unknown split or config: datasets names the choices
        raise DataError(f"'{source}': {_first_line(e)}") from None
    except Exception as e:  # datasets raises its own errors for missing configs, gated sets, ...
        if type(e).__module__.split(".")[0] not in ("datasets", "huggingface_hub", "requests"):
            raise
        raise DataError(f"'{source}': {type(e).__name__}: {_first_line(e)}") from None


def _load_from_disk(path: str, datasets):
    try:
        return datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a folder that Dataset.save_to_disk wrote ({_first_line(e)})") from None


def _pick_split(dd, want: Optional[str], default: str, label: str, hint: str) -> str:
    splits = list(dd.keys())
    if want is not None:
        if want not in splits:
            raise DataError(f"{label}: no split '{want}'; it has {splits}")
        return want
    if len(splits) == 1:
        return splits[0]
    if default in splits:
        return default
    raise DataError(f"{label} has the splits {splits} and none is '{default}'; choose one ({hint})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- for the data pipeline


def is_dataset_object(value: Any) -> bool:
    """A `datasets` Dataset, DatasetDict, IterableDataset or IterableDatasetDict (checked without importing datasets)."""
    return type(value).__module__.split(".")[0] == "datasets" and hasattr(type(value), "__iter__")


def describe(value: Any) -> str:
    """How a data source is written into config.yaml and the manifest: itself, or a summary of a `datasets` object."""
    if not is_dataset_object(value):
        return value
    n = getattr(value, "num_rows", None)
    fp = getattr(value, "_fingerprint", None)
    return f"<{type(value).__name__}" + (f" {n} rows" if isinstance(n, int) else "") + \
        (f" fingerprint {fp}" if fp else "") + ">"


def _dataset_object(value: Any) -> Any:
    if not is_dataset_object(value):
        raise ValueError(f"expected a path, 'gym:TASK', 'hf:ORG/NAME' or a datasets object, got {type(value).__name__}")
    return value


# For `DataConfig.train`/`eval`: `Union[str, list[str], DatasetObject]` takes a `datasets` object
# from Python and writes a one-line summary of it into config.yaml.
DatasetObject = Annotated[Any, AfterValidator(_dataset_object), PlainSerializer(describe, return_type=str)]


def as_list(sources: Any) -> list:
    """`data.train` as a list of sources: one path / name / `datasets` object, or a list of them."""
    if sources is None:
        return []
    if isinstance(sources, (str, Path)) or is_dataset_object(sources):
        return [sources]
    return list(sources)


def load_records(source: Any, *, split: str = "train", columns: Any = None, streaming: bool = False,
                 limit: Optional[int] = None) -> tuple[list[Record], str]:
    """(records with `columns` applied, content hash) of one source of any kind.

    `streaming` and `limit` apply to Hub sources (read row by row, stopping after `limit`).
    The hash is the file's sha256 for a local file, else the sha256 of the rows read.
    """
    if is_hub_source(source):
        records = read_hub(source, split=split, streaming=streaming, limit=limit)
    else:
        records = read_records(source, split=split)
    cmap = columns if isinstance(columns, ColumnMap) or columns is None else ColumnMap.model_validate(columns)
    records = map_columns(records, cmap)
    local = isinstance(source, (str, Path)) and Path(source).is_file()
    return records, (file_sha256(source) if local else records_sha256(records))
