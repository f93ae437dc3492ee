"""The safety stage's data recipe (pure): refusals and helpful answers as sft conversations or dpo pairs.

- sft: conversational rows as they are, preference rows as `prompt + chosen`; helpful general
  chats (`retain`) mixed in at `retain_ratio` so that refusal does not spread to every request
  (over-refusal, Röttger et al. 2024, XSTest).
- dpo: preference rows as they are; a conversation labelled `harmful: true/false` becomes a pair
  around its last assistant turn: harmful: (that turn, `compliance`); benign: (that turn, `refusal`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.data.sources import DataError, read_records

DEFAULT_REFUSAL = "I can't help with that."
DEFAULT_COMPLIANCE = "Sure, here is how to do that."


def _msgs(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def to_conversation(row: dict, origin: str) -> dict:
    """An sft row: conversational rows as they are, preference rows as `prompt + chosen`."""
    if "messages" in row:
        return row
    if "chosen" in row:
        prompt = _msgs(row["prompt"], "user") if row.get("prompt") is not None else []
        out = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        return {**out, "messages": prompt + _msgs(row["chosen"], "assistant")}
    raise DataError(f"{origin}: a safety row needs 'messages' (a conversation) or 'prompt'/'chosen'/'rejected' "
                    f"(a preference pair); keys: {sorted(row)}")


def to_pair(row: dict, origin: str, *, refusal: str, compliance: str) -> dict:
    """A dpo row: preference rows as they are; labelled conversations around their last assistant turn."""
    if "chosen" in row and "rejected" in row:
        return row
    if "messages" not in row:
        raise DataError(f"{origin}: a safety row needs 'messages' or 'prompt'/'chosen'/'rejected'; keys: {sorted(row)}")
    if not isinstance(row.get("harmful"), bool):
        raise DataError(f"{origin}: safety.method=dpo builds pairs from conversations labelled 'harmful' "
                        "(true/false); label the row or give prompt/chosen/rejected")
    msgs = row["messages"]
    if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
        raise DataError(f"{origin}: messages must end with the assistant's answer to pair it")
    rejected = compliance if row["harmful"] else refusal
    if msgs[-1].get("content", "").strip() == rejected.strip():
        raise DataError(f"{origin}: the answer equals the {'compliance' if row['harmful'] else 'refusal'} text it "
                        f"would be preferred to; is 'harmful' right?")
    out = {k: v for k, v in row.items() if k != "messages"}
    return {**out, "prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [{"role": "assistant", "content": rejected}]}


def read_rows(sources) -> list[tuple[dict, str]]:
    """(row, origin) of every record of one source or a list of them."""
    srcs = sources if isinstance(sources, list) else [sources]
    return [(r.data, r.origin) for s in srcs for r in read_records(s, split="train")]


def build_rows(s, sources, *, retain: bool, seed: int) -> list[dict]:
    """The recipe's rows for `sources` (plus `s.retain` rows when `retain`), in a seeded order.

    `s` is the `safety:` section (method, retain, retain_ratio, refusal, compliance)."""
    if s.method == "sft":
        rows = [to_conversation(r, o) for r, o in read_rows(sources)]
    else:
        rows = [to_pair(r, o, refusal=s.refusal, compliance=s.compliance) for r, o in read_rows(sources)]
    rng = random.Random(seed)
    if retain and s.retain is not None:
        pool = [r for r, _ in read_rows(s.retain)]
        if not pool:
            raise DataError(f"safety.retain {s.retain!r} has no rows")
        want = round(len(rows) * s.retain_ratio / (1 - s.retain_ratio))
        picked = []
        while len(picked) < want:  # whole shuffled passes, so every retain row is used before any repeats
            order = rng.sample(pool, len(pool))
            picked += order[:want - len(picked)]
        rows += picked
    rng.shuffle(rows)
    return rows


def write_rows(rows: list[dict], path: Path) -> int:
    """Write rows as JSONL (a temporary file renamed into place); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(rows)
