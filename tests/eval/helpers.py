"""Importable functions that task files in the tests name by dotted path."""


def starts_with_sure(response: str) -> bool:
    return response.strip().startswith("Sure")


def is_long(row: dict, completion: str) -> float:
    return float(len(completion) > row["min_chars"])


def always_refuses(response: str) -> bool:
    return True
