"""On-policy distillation on the gym (issue 21): the demo's GRPO-trained reasoning model teaches the
reasoning-SFT model, which must reach >= 90% of the teacher's held-out reasoning accuracy in <= 1/3 of
the time GRPO took to train the teacher.

The chain is the shipped recipe's optional rows through `posttrain demo` (the pipeline):
`reasoning_unguarded` (full-fine-tuning SFT), `grpo_unguarded` (the teacher) and `distill` (from
`reasoning_unguarded`, teacher `grpo_unguarded`), so both training times are measured in this run,
on the same machine. Accuracy is greedy exact match of the final answer on 200 held-out problems.
The second test runs docs/rl.md's off-policy recipe (the teacher's verified answers as SFT data) on
the same chain. About 15 minutes on one idle core (the GRPO teacher is 8 of them): marked slow.

Measured 2026-12-07 by `bash .ci/run` on a fresh clone (one thread): student 0.315, teacher 0.515
(GRPO 481 s); the row's 120 distillation steps reached 0.505 (98%) in 102 s, 0.21 of GRPO's time
(150 steps: the same 0.505 at 0.27-0.31, too close to the bar for CI; docs/rl.md). One seed: 0.505 is
1.2 standard errors (n = 200) above the 0.46 bar.
On both cores (`make test-distill-gym` since 2026-12-07; an idle 2-core AVX2 CPU, CI on a fresh clone):
student 0.31, teacher 0.465 (GRPO 478 s), distillation 0.45 (97%) in 135 s, 0.28 of GRPO's time; 747 s.
"""

import contextlib
import json
import re
from pathlib import Path

import pytest

from posttrain.pipeline.demo import run_demo

pytestmark = pytest.mark.slow

FRACTION_OF_TEACHER = 0.90  # issue 21
TIME_FRACTION = 1 / 3       # of GRPO's training time
OFFPOLICY_GAIN = 0.06       # measured +0.12 (0.315 -> 0.435, 496 teacher answers kept): half of it


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-distill")
    return out, run_demo(out, stages=("base", "reasoning_unguarded", "grpo_unguarded", "distill"))


def test_distilled_student_reaches_90_percent_of_the_teacher_in_a_third_of_its_time(demo):
    out, s = demo
    student, teacher, distilled = s["reasoning_unguarded"], s["grpo_unguarded"], s["distill"]
    print(json.dumps({"reasoning_unguarded": student, "grpo_unguarded": teacher, "distill": distilled}))
    assert distilled["reasoning_accuracy"] >= FRACTION_OF_TEACHER * teacher["reasoning_accuracy"], (teacher, distilled)
    assert distilled["train_time_s"] <= TIME_FRACTION * teacher["train_time_s"], (teacher, distilled)
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["stages"]["distill"]["started_from"] == "reasoning_unguarded"
    # the student's samples moved towards the teacher: per-token divergence falls over the run
    recs = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"]
    first = sum(r["divergence"] for r in train[:10]) / 10
    last = sum(r["divergence"] for r in train[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def offpolicy_from_the_docs(demo_dir, work: Path) -> dict:
    """docs/rl.md's off-policy recipe as printed (the teacher's verified answers as SFT data, then a
    pipeline's `sft` stage), with `runs/demo` and `runs/offpolicy` pointing into this test's folders."""
    from posttrain.pipeline import load_recipe, run_pipeline

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rl.md").read_text()
    section = doc[doc.index("**Off-policy distillation**"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    recipe = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    fix = {"runs/demo": str(demo_dir), "runs/offpolicy": str(work / "offpolicy")}
    for a, b in fix.items():
        code, recipe = code.replace(a, b), recipe.replace(a, b)
    with contextlib.chdir(work):  # the snippet writes teacher.jsonl and the recipe reads it, relative paths
        exec(compile(code, "docs/rl.md off-policy", "exec"), {})
        (work / "distill-offpolicy.yaml").write_text(recipe)
        return run_pipeline(load_recipe(work / "distill-offpolicy.yaml"), report=False)


def test_offpolicy_recipe_from_the_docs(demo, tmp_path):
    out, s = demo
    lin = offpolicy_from_the_docs(out, tmp_path)
    kept = (tmp_path / "teacher.jsonl").read_text().splitlines()
    # the teacher answers about half of the training prompts right (0.515 held out; measured 496 of 1000)
    assert 350 <= len(kept) <= 650, len(kept)
    acc = lin["stages"]["student"]["measures"]["reasoning_accuracy"]
    before = s["reasoning_unguarded"]["reasoning_accuracy"]
    print(json.dumps({"kept": len(kept), "student_before": before, "after": acc,
                      "teacher": s["grpo_unguarded"]["reasoning_accuracy"]}))
    assert acc >= before + OFFPOLICY_GAIN, (before, acc)
