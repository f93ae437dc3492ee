"""Data: sources -> validated rows -> rendered + masked tokens -> packed batches (docs/data.md)."""

from posttrain.data.formats import Example, to_example, to_examples
from posttrain.data.pipeline import DatasetBundle, build_dataset
from posttrain.data.render import IGNORE_INDEX, Tokenized, tokenize_example, tokenize_examples
from posttrain.data.sources import DataError, Record, read_records

__all__ = [
    "DataError", "DatasetBundle", "Example", "IGNORE_INDEX", "Record", "Tokenized", "build_dataset",
    "read_records", "to_example", "to_examples", "tokenize_example", "tokenize_examples",
]
