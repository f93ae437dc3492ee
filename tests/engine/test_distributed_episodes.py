"""Multi-turn GRPO (`grpo.environment`) under torchrun with 2 CPU processes (gloo, DDP): each rank plays
whole groups of episodes for its own prompts, the two ranks' prompts make one process's global batch,
and rank 0 alone writes the episode metrics."""

import json

from posttrain import gym
from tests.engine.dist_util import records, torchrun

G = 4
PROBE = '''
import json, os


class Probe:
    """Two turns per episode (a tool message after the first); records which rank played which row."""

    tools = [{"type": "function", "function": {"name": "note", "description": "Write a note",
                                               "parameters": {"type": "object", "properties": {}}}}]

    def reset(self, row):
        self.turns = 0
        with open(os.path.join(os.environ["PROBE_DIR"], "rank%s.jsonl" % os.environ.get("RANK", "0")), "a") as f:
            f.write(json.dumps(row["prompt"]) + "\\n")
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages, assistant_turn):
        self.turns += 1
        text = assistant_turn["content"] or ""
        reward = sum(ch.isdigit() for ch in text) / max(1, len(text))
        return ([], reward, True) if self.turns == 2 else ([{"role": "tool", "content": "noted"}], reward, False)
'''


def test_multi_turn_grpo_keeps_each_group_on_one_rank(tmp_path, monkeypatch):
    from posttrain.engine.sampler import BatchSampler

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "episode_probe.py").write_text(PROBE)
    (tmp_path / "played").mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "probe"))
    monkeypatch.setenv("PROBE_DIR", str(tmp_path / "played"))
    prompts = [f"Count {i} apples and {i % 5} pears." for i in range(16)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "run"
    r = torchrun([f"model={gym.base_model_path()}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
                  "train.batch_size=2", "train.lr=1e-3", "train.seed=5", "train.progress=false",
                  "train.warmup_steps=0", "train.distributed=ddp", f"grpo.num_generations={G}",
                  "grpo.max_new_tokens=16", "grpo.environment=episode_probe:Probe", "grpo.max_turns=2"], stage="grpo")
    assert r.stdout.count("finished:") == 1
    played = [[json.loads(x) for x in (tmp_path / "played" / f"rank{k}.jsonl").read_text().splitlines()]
              for k in (0, 1)]
    one = BatchSampler(len(prompts), 4, seed=5)
    for step in range(2):
        seen = []
        for rank in (0, 1):
            ps = played[rank][step * 2 * G:(step + 1) * 2 * G]  # train.batch_size=2 prompts per rank, G episodes each
            groups = [ps[i:i + G] for i in range(0, len(ps), G)]
            assert len(groups) == 2 and all(len(set(g)) == 1 for g in groups)
            seen.append({g[0] for g in groups})
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == {prompts[i] for i in one.next_batch()}
    recs = records(out)
    assert [x["step"] for x in recs] == [1, 2]
    assert all(1 <= x["turns_per_episode"] <= 2 and "invalid_call_rate" in x and "reward_per_turn" in x for x in recs)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed" and m["result"]["distributed"] == {"strategy": "ddp", "world_size": 2}
