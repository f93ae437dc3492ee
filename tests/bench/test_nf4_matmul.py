"""bench/nf4_matmul.py measured for real: the chunked NF4 matmul's temporaries against torchao's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "nf4_matmul.py"


def test_chunked_nf4_matmul_holds_a_fraction_of_torchaos_temporaries():
    """One forward and backward through a 2048 x 2048 NF4 weight (4.2M weights) on 128 tokens, each side in
    its own process with every freed block leaving the RSS: torchao dequantizes the whole weight (about
    14 bytes per weight, 57 MiB measured), posttrain one chunk of 2^18 weights into a reused workspace (4.6 MiB
    measured, the workspace included)."""
    p = subprocess.run([sys.executable, str(BENCH), "--shapes", "2048x2048", "--rounds", "1", "--runs", "1"],
                       capture_output=True, text=True, timeout=300)
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert rows and rows[0]["shape"] == "2048x2048", p.stderr[-2000:]
    ours, theirs = rows[0]["posttrain"]["temporaries_mib"], rows[0]["torchao"]["temporaries_mib"]
    assert theirs >= 40, rows  # 16 MiB of bf16 weight alone, plus its int64 codes and the fp32 cast
    assert ours <= 0.25 * theirs, rows
