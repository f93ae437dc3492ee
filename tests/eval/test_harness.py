"""lm-evaluation-harness interop: the real `lm_eval` CLI, a local task file, offline, via the import hook."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from posttrain.eval.kinds import run_task  # noqa: E402
from posttrain.eval.tasks import make_task  # noqa: E402
from tests.eval.conftest import LM_EVAL_MC as MC, LM_EVAL_TEXTS as TEXTS, write_lm_eval_task  # noqa: E402

GEN = [{"prompt": "Hello", "target": "x"}, {"prompt": "What is 2 + 3?", "target": "y"}]


BOOT = ("import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'lm_eval'; "
        "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _hooked_site(tmp_path):
    """A private site dir holding the hook, as `python -m posttrain.eval.harness install` writes it."""
    from posttrain.eval.lm_eval_hook import write_pth

    site = tmp_path / "site"
    site.mkdir()
    pth = write_pth(site)
    assert pth.read_text().startswith("import posttrain.eval.lm_eval_hook")
    return site


def _lm_eval(tmp_path, out, *args) -> dict:
    """The `lm_eval` CLI with the hook installed, batch 4, offline: the results of its results_*.json in `out`."""
    proc = subprocess.run([sys.executable, "-c", BOOT, str(_hooked_site(tmp_path)), *args, "--output_path", str(out),
                           "--batch_size", "4"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


def _assert_mc_matches_ours(results: dict, model, tok) -> None:
    ours = run_task(make_task({"name": "mc", "kind": "multiple_choice"}, [dict(r) for r in MC]), model, tok)
    assert results["pt_mc"]["acc,none"] == pytest.approx(ours["metrics"]["acc"]["value"])
    assert results["pt_mc"]["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"]["value"])


def test_builtin_lm_eval_models_still_work_with_the_hook_installed(tiny, tmp_path):
    """The hook must not shadow lm-eval's own models: `--model hf` runs and scores like posttrain."""
    d, model, tok = tiny
    write_lm_eval_task(tmp_path / "tasks", "mc", MC, "multiple_choice")
    out = tmp_path / "out"
    results = _lm_eval(tmp_path, out, "--model", "hf", "--model_args", f"pretrained={d},dtype=float32", "--device",
                       "cpu", "--tasks", "pt_mc", "--include_path", str(tmp_path / "tasks"))
    _assert_mc_matches_ours(results, model, tok)


def test_harness_import_keeps_builtin_models_and_registers_posttrain_lazily():
    """Importing the adapter (what `python -m posttrain.eval.harness run` does) leaves every built-in name."""
    code = ("import posttrain.eval.harness; from lm_eval.api.registry import get_model, model_registry; "
            "print(get_model('hf').__name__, get_model('posttrain').__module__, len(model_registry))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, module, n = proc.stdout.split()
    from lm_eval.models import MODEL_MAPPING

    assert (hf, module, int(n)) == ("HFLM", "posttrain.eval.harness", len(MODEL_MAPPING) + 1)


def test_lm_eval_cli_runs_posttrain_models_and_matches_posttrain_eval(tiny, tmp_path):
    d, model, tok = tiny
    tasks = tmp_path / "tasks"
    for name, rows, output_type in (("mc", MC, "multiple_choice"), ("ppl", TEXTS, "loglikelihood_rolling"),
                                    ("gen", GEN, "generate_until")):
        write_lm_eval_task(tasks, name, rows, output_type)
    out = tmp_path / "out"
    results = _lm_eval(tmp_path, out, "--model", "posttrain", "--model_args", f"model={d}", "--tasks", "pt_mc", "pt_ppl",
                       "pt_gen", "--include_path", str(tasks), "--log_samples")
    _assert_mc_matches_ours(results, model, tok)
    ours_ppl = run_task(make_task({"name": "ppl", "kind": "perplexity"}, [dict(r) for r in TEXTS]), model, tok)
    assert results["pt_ppl"]["bits_per_byte,none"] == pytest.approx(ours_ppl["metrics"]["bits_per_byte"]["value"],
                                                                     rel=1e-5)
    samples = [json.loads(x) for p in out.rglob("samples_pt_gen_*.jsonl") for x in p.read_text().splitlines()]
    from posttrain.eval import lm

    want = lm.generate(model, tok, [r["prompt"] for r in GEN], max_new_tokens=5, stop=("\n",))
    assert sorted(s["resps"][0][0] for s in samples) == sorted(want)
