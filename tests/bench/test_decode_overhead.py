"""bench/decode_overhead.py: its hand-written decode step must run transformers' ops exactly (the
speed comparison is only meaningful if both sides compute the same numbers)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decode_overhead.py"


def test_the_lean_decode_step_is_bitwise_the_models_own():
    p = subprocess.run([sys.executable, str(BENCH), "--rows", "3", "--prompt", "9", "--tokens", "6", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == 1, p.stderr[-2000:]
    assert rows[0]["same_tokens"] and rows[0]["same_logits_bitwise"], rows
    assert rows[0]["hf_s"] > 0 and rows[0]["lean_s"] > 0, rows
