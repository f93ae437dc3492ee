"""Read training data from files, Python lists, `datasets.Dataset` objects and gym tasks.

Every row becomes a `Record` that remembers where it came from (`train.jsonl line 17`,
`data.parquet row 3`), so that a bad row can be reported by its place in the user's file.
Reading does not validate fields; `posttrain.data.formats` does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union


class DataError(ValueError):
    """Data that cannot be used. The message starts with where (file and line/row) and names the field."""


@dataclass
class Record:
    data: dict
    origin: str


GYM_PREFIX = "gym:"
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# CSV cells are strings; these columns hold JSON lists/objects when they appear in a CSV file.
_JSON_COLUMNS = ("messages", "conversations", "tools", "prompt", "completion")


def read_records(source: Any, *, name: Optional[str] = None, split: str = "train") -> list[Record]:
    """All rows of `source` as `Record`s.

    `source` is a path (.jsonl, .json, .parquet, .csv), ``gym:TASK`` / ``gym:TASK:SPLIT``,
    a list of dicts, or a `datasets.Dataset`. `name` labels in-memory sources in error
    messages (default ``row N``). `split` is the gym split used when the source names none.
    ``hf:ORG/NAME[:SPLIT][@CONFIG]``, `save_to_disk` folders, ``.arrow`` files and every
    `datasets` object are read by `posttrain.data.hub` (`split` picks a DatasetDict's split).
    """
    # imported on use: hub builds on this module (Record, DataError), and most runs read plain files
    from posttrain.data import hub

    if hub.is_hub_source(source):
        return hub.read_hub(source, split=split, name=name)
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(GYM_PREFIX):
            return _read_gym(text, split)
        return _read_file(Path(source), name or text)
    if isinstance(source, list):
        return _read_rows(source, name)
    try:
        import datasets
    except ImportError:  # datasets is optional
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        return _read_rows(source, name)
    raise DataError(
        f"cannot read data from a {type(source).__name__}; give a path ({', '.join(SUFFIXES)}), "
        "'gym:TASK', a list of dicts or a datasets.Dataset"
    )


def _read_rows(rows, name: Optional[str]) -> list[Record]:
    prefix = f"{name} " if name else ""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{prefix}row {i}: expected an object (dict), got {type(row).__name__}")
        out.append(Record(dict(row), f"{prefix}row {i}"))
    return out


def _read_file(path: Path, label: str) -> list[Record]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a data file ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    try:
        records = reader(path, label)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror})") from None
    if not records:
        raise DataError(f"{label}: the file holds no rows")
    return records


# byte-order marks of the encodings people save text in by mistake (Windows editors, PowerShell)
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
         b"\xfe\xff": "UTF-16"}


def read_text(path: Path, label: Optional[str] = None) -> str:
    """A text file's content as UTF-8 (a UTF-8 byte-order mark is dropped).

    Any other encoding is a `DataError` naming the file, and for a bad byte its line and column,
    instead of a `UnicodeDecodeError` that names neither.
    """
    label = label or str(path)
    data = Path(path).read_bytes()
    for bom, enc in _BOMS.items():
        if data.startswith(bom):
            raise DataError(f"{label}: the file is {enc}-encoded; save it as UTF-8 "
                            f"(for example: iconv -f {enc} -t UTF-8 {path} > fixed{path.suffix})")
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text data set holds one: binary data, or UTF-16 without a mark
        line, col = _line_col(data, nul)
        raise DataError(f"{label} line {line}: a NUL byte at column {col}: binary data, or a UTF-16 file without a "
                        "byte-order mark; save the file as UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = data.startswith(b"\xef\xbb\xbf") * 3 + e.start
        line, col = _line_col(data, start)
        raise DataError(f"{label} line {line}: not valid UTF-8 (byte 0x{data[start]:02x} at column {col}); save "
                        "the file as UTF-8, or remove the binary data") from None


def _line_col(data: bytes, offset: int) -> tuple[int, int]:
    return data.count(b"\n", 0, offset) + 1, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def _read_jsonl(path: Path, label: str) -> list[Record]:
    out = []
    for lineno, line in enumerate(read_text(path, label).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{label} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append(Record(row, where))
    return out


def _read_json(path: Path, label: str) -> list[Record]:
    try:
        doc = json.loads(read_text(path, label))
    except json.JSONDecodeError as e:
        raise DataError(f"{label} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    # a top-level list of rows, or {"data": [...]} as many published data sets ship
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f"{label}: expected a JSON list of objects (or {{\"data\": [...]}}), got {type(doc).__name__}")
    return _read_rows(doc, label)


def _read_csv(path: Path, label: str) -> list[Record]:
    out = []
    reader = csv.DictReader(io.StringIO(read_text(path, label), newline=""))
    try:
        for row in reader:
            where = f"{label} line {reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more cells than the {len(reader.fieldnames)} header columns")
            for col in _JSON_COLUMNS:
                cell = row.get(col)
                if not isinstance(cell, str) or cell.lstrip()[:1] not in ("[", "{"):
                    continue
                try:
                    value = json.loads(cell)
                except json.JSONDecodeError as e:
                    if col in ("prompt", "completion"):
                        continue  # plain text that happens to start with a bracket
                    raise DataError(f"{where}: column '{col}' is not valid JSON ({e.msg})") from None
                is_messages = isinstance(value, list) and all(isinstance(m, dict) for m in value)
                if col not in ("prompt", "completion") or is_messages:
                    row[col] = value
            out.append(Record(dict(row), where))
    except csv.Error as e:
        raise DataError(f"{label} line {reader.line_num}: malformed CSV ({e})") from None
    return out


def _read_parquet(path: Path, label: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise DataError(f"{label}: reading .parquet needs pyarrow (pip install 'posttrain[data]')") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except ArrowException as e:
        raise DataError(f"{label}: not a readable parquet file ({e}); re-export it, or convert it to JSONL") from None
    return _read_rows(rows, label)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def parse_gym(source: str, default_split: str = "train") -> tuple[str, str]:
    parts = source[len(GYM_PREFIX):].split(":")
    if not parts[0] or len(parts) > 2:
        raise DataError(f"'{source}': gym sources look like gym:TASK or gym:TASK:SPLIT")
    return parts[0], parts[1] if len(parts) == 2 else default_split


def _read_gym(source: str, split: str) -> list[Record]:
    task, split = parse_gym(source, split)
    # imported here: data loading must not pull in the gym (and its model code) unless asked
    try:
        from posttrain.gym import load_task_rows
    except ImportError as e:
        raise DataError(f"'{source}': the gym is not available ({e})") from None
    try:
        rows = load_task_rows(task, split)
    except ValueError as e:  # unknown task or split: the gym's message names the choices
        raise DataError(f"'{source}': {e}") from None
    return _read_rows(rows, f"gym:{task}:{split}")


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 of a data file's bytes, for the run manifest."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def records_sha256(records: list[Record]) -> str:
    """sha256 of rows as canonical JSON (for sources that are not files, such as gym tasks)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.data, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()
