"""lm-evaluation-harness tasks as a regression suite (`lm_eval:TASK[@N],...`): offline, on local task
files, checked against lm-eval's own `simple_evaluate` with its own `hf` model on the same checkpoint."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from posttrain.eval.cli import main as eval_main  # noqa: E402
from posttrain.eval.guard import regression_guard  # noqa: E402
from posttrain.eval.runner import run_suite  # noqa: E402
from posttrain.eval.suites import LmEvalTask, Suite, load_suite  # noqa: E402
from posttrain.eval.tasks import TaskError  # noqa: E402
from tests.eval.conftest import LM_EVAL_MC, LM_EVAL_TEXTS, write_lm_eval_task  # noqa: E402


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two lm-eval task YAMLs (multiple choice; rolling perplexity) over local JSONL files."""
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    write_lm_eval_task(d, "mc", LM_EVAL_MC, "multiple_choice")
    write_lm_eval_task(d, "ppl", LM_EVAL_TEXTS, "loglikelihood_rolling")
    (d / "pt_group.yaml").write_text("group: pt_group\ntask: [pt_mc, pt_ppl]\n")
    return d


@pytest.fixture(scope="module")
def offline(monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_spec_parsing_and_errors(task_dir):
    s = load_suite(f"lm_eval:{task_dir / 'pt_mc.yaml'}@4,{task_dir / 'pt_ppl.yaml'}", limit=2)
    assert [(t.name, t.kind, t.limit, t.include_path) for t in s.tasks] == [
        ("pt_mc", "lm_eval", 2, str(task_dir)), ("pt_ppl", "lm_eval", 2, str(task_dir))]
    assert isinstance(s.tasks[0], LmEvalTask)
    named = load_suite("lm_eval:arc_easy@50, hellaswag").tasks
    assert [(t.lm_eval_task, t.limit, t.include_path) for t in named] == [("arc_easy", 50, None),
                                                                          ("hellaswag", None, None)]
    for spec, msg in (("lm_eval:", "suite 'lm_eval:': name at least one lm-eval task: lm_eval:TASK[@N][,TASK[@N]...]"),
                      ("lm_eval:arc_easy@0", "suite 'lm_eval:arc_easy@0': 'arc_easy@0': the limit after '@' must be "
                                             "a whole number >= 1, got '0'"),
                      ("lm_eval:arc_easy@ten", "the limit after '@' must be a whole number >= 1, got 'ten'"),
                      ("lm_eval:nowhere/t.yaml", "suite 'lm_eval:nowhere/t.yaml': lm-eval task file not found: "
                                                 "nowhere/t.yaml")):
        with pytest.raises(TaskError) as e:
            load_suite(spec)
        assert msg in str(e.value)


def test_without_lm_eval_installed_the_suite_says_what_to_install(monkeypatch, capsys):
    from posttrain.eval import suites

    monkeypatch.setattr(suites, "find_spec", lambda name: None)  # as on a machine without the package
    with pytest.raises(TaskError, match=r"^suite 'lm_eval:arc_easy': lm-evaluation-harness is not installed: "
                                        r"pip install lm-eval$"):
        load_suite("lm_eval:arc_easy")
    assert eval_main(["--model", "nowhere", "--suite", "lm_eval:arc_easy"]) == 2
    assert capsys.readouterr().err == ("posttrain eval: error: suite 'lm_eval:arc_easy': lm-evaluation-harness is "
                                       "not installed: pip install lm-eval\n")


def test_unknown_task_is_a_clear_error(tiny, task_dir, offline):
    d, model, tok = tiny
    typo = Suite("typo", [LmEvalTask("pt_mcc", "lm_eval", [], lm_eval_task="pt_mcc", include_path=str(task_dir))])
    with pytest.raises(TaskError, match=f"lm-eval has no task 'pt_mcc' in {task_dir} \\(did you mean 'pt_mc'\\?\\)"):
        run_suite(model, tok, typo)
    group = Suite("group", [LmEvalTask("pt_group", "lm_eval", [], lm_eval_task="pt_group", limit=1,
                                       include_path=str(task_dir))])
    with pytest.raises(TaskError, match="lm-eval's 'pt_group' is a group or tag of tasks; list the tasks themselves: "
                                        "lm_eval:pt_mc,pt_ppl"):
        run_suite(model, tok, group)


def test_equals_lm_evals_own_simple_evaluate(tiny, task_dir, offline):
    """The real-client check: our suite's numbers are those of lm-eval's `simple_evaluate` with its own
    `hf` model on the same checkpoint (a different code path: lm-eval's HFLM, not posttrain's scoring)."""
    d, model, tok = tiny
    ours = run_suite(model, tok, f"lm_eval:{task_dir / 'pt_mc.yaml'}@5,{task_dir / 'pt_ppl.yaml'}")
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={d},dtype=float32", device="cpu",
                                     tasks=["pt_mc", "pt_ppl"], limit=None, batch_size=4, verbosity="ERROR",
                                     task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    theirs_mc = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={d},dtype=float32", device="cpu",
                                        tasks=["pt_mc"], limit=5, batch_size=4, verbosity="ERROR",
                                        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    mc, ppl = ours["tasks"]["pt_mc"], ours["tasks"]["pt_ppl"]
    ref_mc, ref_ppl = theirs_mc["results"]["pt_mc"], theirs["results"]["pt_ppl"]
    assert mc["n"] == 5 and ppl["n"] == 3
    for m in ("acc", "acc_norm"):
        assert mc["metrics"][m]["value"] == pytest.approx(ref_mc[f"{m},none"], abs=1e-12)
        assert mc["metrics"][m]["stderr"] == pytest.approx(ref_mc[f"{m}_stderr,none"], abs=1e-12)
        assert len(mc["items"][m]) == 5 and sum(mc["items"][m]) / 5 == pytest.approx(ref_mc[f"{m},none"])
    for m in ("word_perplexity", "bits_per_byte"):
        assert ppl["metrics"][m]["value"] == pytest.approx(ref_ppl[f"{m},none"], rel=1e-5)
    # the suite score averages acc_norm (the primary); a perplexity is lower-better, so not in the score
    assert (mc["primary"], mc["in_score"], ppl["in_score"]) == ("acc_norm", True, False)
    assert ours["score"]["value"] == pytest.approx(ref_mc["acc_norm,none"])
    assert mc["samples"][0]["origin"] == "pt_mc doc 0" and len(mc["samples"]) == 5


def test_posttrain_eval_and_the_guard_take_the_suite(tiny, other_tiny, task_dir, tmp_path, offline, capsys):
    d, model, tok = tiny
    spec = f"lm_eval:{task_dir / 'pt_mc.yaml'}@4"
    rc = eval_main(["--model", str(other_tiny), "--baseline", str(d), "--suite", spec, "--out", str(tmp_path / "o")])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in doc["comparison"]["rows"]}
    assert set(rows) == {("suite", "score"), ("pt_mc", "acc"), ("pt_mc", "acc_norm")}
    assert rows[("pt_mc", "acc")]["paired"] is True  # per-document values from lm-eval's samples
    assert doc["tuned"]["tasks"]["pt_mc"]["settings"]["task"] == "pt_mc"
    # the forgetting guard's evaluator: the suite score is lm-eval's acc_norm of the model
    evaluator, guard = regression_guard(tok, spec, every=1, max_drop=0.05, model=model)
    m = evaluator(model, 1)
    want = run_suite(model, tok, spec)["tasks"]["pt_mc"]["metrics"]["acc_norm"]["value"]
    assert m["regression_score"] == pytest.approx(want) and m["regression_drop"] == 0.0
    assert guard(m) is None


def test_a_training_run_guards_with_an_lm_eval_suite(tiny, task_dir, tmp_path, offline):
    """`eval.regression_suite=lm_eval:...` in a real SFT run: the regression score it logs at each
    evaluation is lm-eval's acc_norm of the model at that step."""
    from posttrain.stages import load_config, sft

    d, model, tok = tiny
    train = tmp_path / "narrow.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say it {i}"},
                                                       {"role": "assistant", "content": "yes yes"}]}) + "\n"
                             for i in range(8)))
    spec = f"lm_eval:{task_dir / 'pt_mc.yaml'}@5"
    cfg = load_config("sft", overrides=[
        f"model={d}", f"data.train={train}", f"output_dir={tmp_path / 'run'}", "train.lr=1e-2", "train.max_steps=2",
        "train.batch_size=4", "train.eval_every=2", "train.progress=false", "eval.guard=off",
        "eval.regression_every=2", f"eval.regression_suite={spec}", "eval.regression_max_drop=0.9"])
    res = sft.run(cfg)
    logged = [json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [(r["step"], r["regression_score"]) for r in logged if "regression_score" in r]
    base = run_suite(model, tok, spec)["score"]["value"]
    tuned = run_suite(res.model, tok, spec)["tasks"]["pt_mc"]["metrics"]["acc_norm"]["value"]
    assert scores == [(2, pytest.approx(tuned))]
    drops = [r["regression_drop"] for r in logged if "regression_drop" in r]
    assert drops == [pytest.approx(base - tuned)]
