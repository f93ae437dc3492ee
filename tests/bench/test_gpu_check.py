"""bench/gpu_check.py --tiny: the GPU check's rows run on CPU and report consistent numbers."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_check  # noqa: E402


def test_tiny_rows_report_tokens_and_mfu(capsys):
    res = gpu_check.main(["--tiny", "--rows", "sft_lora,grpo_generation", "--sides", "posttrain"])
    sh = gpu_check.Shapes(tiny=True)
    sft, gen = res["rows"]
    assert (sft["row"], sft["side"], sft["tokens"]) == ("sft_lora", "posttrain", sh.sft_batch * sh.sft_len)
    # no early stop: every sample generates its max_new_tokens
    assert gen["tokens"] == sh.prompts * sh.group * sh.gen_new
    for r in (sft, gen):
        assert r["time_s"] > 0 and r["peak_mem_gib"] is None  # no CUDA memory on CPU
        # time_s is printed rounded to 0.1 ms and tokens_per_s to 0.1: on a fast CPU row that is several percent
        assert r["tokens"] / (r["time_s"] + 5e-5) - 0.05 <= r["tokens_per_s"] <= r["tokens"] / max(r["time_s"] - 5e-5, 1e-9) + 0.05
    cfg, n = gpu_check.TINY, res["params"]
    per_tok = 4 * n + 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * sh.sft_len
    assert sft["mfu"] == pytest.approx(per_tok * sft["tokens_per_s"] / (res["bf16_matmul_peak_tflops"] * 1e12),
                                       rel=0.02, abs=1e-4)
    assert res["speedup_vs_trl"] == {}


def test_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--rows", "sft"])
    assert "--rows: unknown sft; choose from sft_full, sft_lora, dpo_lora, grpo_generation, grpo_update" in \
        capsys.readouterr().err
