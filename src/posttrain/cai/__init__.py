"""`posttrain cai`: constitutional AI data: critique-and-revision SFT rows and AI-feedback preference pairs.

    posttrain cai critique --model M --prompts gym:refusal:train --constitution c.yaml --out revisions.jsonl
    posttrain cai compare  --model M --prompts prompts.jsonl --constitution c.txt --out prefs.jsonl

The outputs are ordinary JSONL for `posttrain sft` and `posttrain dpo` / `reward`; every row keeps
its provenance under `cai`. See docs/cai.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from posttrain.cai.constitution import (DEFAULT_TEMPLATES, ConstitutionError, Principle, load_constitution,
                                        load_templates)
from posttrain.cai.loop import choice_logprobs, compare_pairs, critique_and_revise, first_preferred, prompt_messages
from posttrain.data.sources import read_records
from posttrain.models.loading import load

__all__ = ["DEFAULT_TEMPLATES", "ConstitutionError", "Principle", "choice_logprobs", "compare_pairs", "critique",
           "compare", "critique_and_revise", "first_preferred", "load_constitution", "load_templates",
           "prompt_messages", "read_prompts", "write_jsonl"]


def read_prompts(source: Union[str, Path, list], limit: Optional[int] = None) -> list[dict]:
    """Prompt rows from a file, `gym:TASK[:SPLIT]`, or a list of dicts (the data loader's sources)."""
    rows = [r.data for r in read_records(source)]
    return rows[:limit] if limit else rows


def write_jsonl(rows: list[dict], out: Union[str, Path]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.rename(out)
    return out


def _load_model(model):
    if isinstance(model, (str, Path)):

        m, tok = load(model, device="auto")
        return m.eval(), tok, str(model)
    raise TypeError("pass a model path (or call critique_and_revise / compare_pairs with a loaded model)")


def critique(model: Union[str, Path], prompts, constitution, out, *, templates=None, limit: Optional[int] = None,
             **kw) -> list[dict]:
    """Critique-and-revision rows for `prompts`, written to `out` (JSONL); returns the rows."""
    m, tok, name = _load_model(model)
    rows = critique_and_revise(m, tok, read_prompts(prompts, limit), load_constitution(constitution),
                               load_templates(templates), model_name=name, **kw)
    write_jsonl(rows, out)
    return rows


def compare(model: Union[str, Path], prompts, constitution, out, *, templates=None, limit: Optional[int] = None,
            **kw) -> tuple[list[dict], dict]:
    """AI-feedback preference pairs for `prompts`, written to `out`; returns (rows, stats)."""
    m, tok, name = _load_model(model)
    stats: dict = {}
    rows = compare_pairs(m, tok, read_prompts(prompts, limit), load_constitution(constitution),
                         load_templates(templates), model_name=name, stats=stats, **kw)
    write_jsonl(rows, out)
    return rows, stats


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="posttrain cai", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    for name, what in (("critique", "critique-and-revision SFT rows"), ("compare", "AI-feedback preference pairs")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--model", required=True, help="HF directory, finished run, or hub name")
        s.add_argument("--prompts", required=True, help="JSONL/JSON/CSV/parquet rows with prompt or messages, or gym:TASK")
        s.add_argument("--constitution", required=True, help="YAML list or text file of principles")
        s.add_argument("--out", required=True, help="output JSONL")
        s.add_argument("--templates", default=None, help=f"YAML overriding any of: {', '.join(DEFAULT_TEMPLATES)}")
        s.add_argument("--limit", type=int, default=None, help="use the first N prompts")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--max-new-tokens", type=int, default=64)
        s.add_argument("--temperature", type=float, default=0.0 if name == "critique" else 1.0)
        if name == "compare":
            s.add_argument("--min-confidence", type=float, default=0.0,
                           help="drop pairs with |2 P(first better) - 1| below this")
    a = p.parse_args(argv)
    kw = dict(templates=a.templates, limit=a.limit, seed=a.seed, max_new_tokens=a.max_new_tokens,
              temperature=a.temperature)
    if a.action == "critique":
        rows = critique(a.model, a.prompts, a.constitution, a.out, **kw)
        changed = sum(r["cai"]["revised"] for r in rows)
        print(f"posttrain: wrote {len(rows)} revised rows ({changed} differ from the first answer) to {a.out}")
    else:
        rows, st = compare(a.model, a.prompts, a.constitution, a.out, min_confidence=a.min_confidence, **kw)
        print(f"posttrain: wrote {len(rows)} preference pairs to {a.out} ({st['identical']} identical and "
              f"{st['empty']} with an empty answer and {st['low_confidence']} low-confidence pairs dropped of {st['prompts']} prompts)")
    return 0
