"""Stage `distill` under torchrun with 2 CPU processes (gloo, DDP): 2 ranks x 2 prompts match 1 process x 4.

Sampling with top_k = 1 makes each prompt's completion the student's greedy one whatever rank or RNG
draws it, so the two runs see the same tokens; the engine divides the summed divergence by the
completion tokens of the whole step on all ranks, so the losses and weights must agree.
"""

import json

from tests.engine.dist_util import losses, max_abs_diff, max_rel_diff, single, torchrun, weights

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 5e-5


def _args(student, teacher, prompts, out, *extra, batch):
    return [f"model={student}", f"distill.teacher={teacher}", f"data.train={prompts}", f"output_dir={out}",
            "train.max_steps=3", f"train.batch_size={batch}", "train.lr=3e-3", "train.seed=5", "train.progress=false",
            "train.warmup_steps=0", "train.schedule=constant", "eval.guard=off", "distill.max_new_tokens=8",
            "distill.top_k=1", *extra]


def test_distill_two_ranks_match_one_process(tiny_models, tmp_path):
    student, teacher = tiny_models("qwen2"), tiny_models("qwen2", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count {i} apples and {i % 5} pears:"}) + "\n"
                               for i in range(16)))
    one, two = tmp_path / "one", tmp_path / "two"
    single(_args(student, teacher, prompts, one, batch=4), stage="distill")
    r = torchrun(_args(student, teacher, prompts, two, "train.distributed=ddp", batch=2), stage="distill")
    assert r.stdout.count("finished:") == 1  # rank 0 alone reports
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 3
    assert la[-1] < la[0]  # the student moved towards the teacher, so the gradients matter
    rel = max_rel_diff(la, lb)
    w = max_abs_diff(weights(one), weights(two))
    print(f"distill ddp: losses {la} vs {lb}, max loss rel diff {rel:.2e}, max weight abs diff {w:.2e}")
    assert rel < LOSS_RTOL and w < WEIGHT_ATOL, (rel, w)
    m = json.loads((two / "manifest.json").read_text())
    assert m["status"] == "completed" and m["result"]["distributed"] == {"strategy": "ddp", "world_size": 2}
