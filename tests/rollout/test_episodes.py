"""Multi-turn episodes on a scripted model: known tool calls in, known messages, tokens and masks out."""

import pytest
import torch
from transformers import AutoTokenizer

from posttrain import gym
from posttrain.data.formats import to_example
from posttrain.data.render import tokenize_example
from posttrain.data.sources import Record
from posttrain.gym.lookup import LookupEnv
from posttrain.rollout import GeneratedIds, RolloutEngine, SamplingParams
from posttrain.rollout.episodes import documented_calls, environment_text, resolve_environment, run_episodes

LOGP = -0.25  # every scripted token's log-prob


parse = documented_calls


class ScriptedBackend:
    """A 'model' that answers turn k of an episode with script[k] (the episode is told apart by its
    first user message), ending each turn with <|im_end|>; implements the rollout Backend protocol."""

    name = "scripted"

    def __init__(self, tokenizer, scripts: dict[str, list[str]], *, cut: frozenset = frozenset()):
        self.tok, self.scripts, self.cut = tokenizer, scripts, cut
        self.calls = []

    def generate(self, prompt_ids, params, *, stop_ids, adapters=None):
        out = GeneratedIds.empty(len(prompt_ids))
        self.calls.append(len(prompt_ids))
        for i, ids in enumerate(prompt_ids):
            text = self.tok.decode(ids)
            key = next(k for k in self.scripts if k in text)
            turn = text.count("<|im_start|>assistant") - 1
            reply = self.scripts[key][turn]
            cut = (key, turn) in self.cut
            toks = self.tok(reply + ("" if cut else "<|im_end|>"), add_special_tokens=False)["input_ids"]
            out.tokens[i], out.logprobs[i], out.policy_logprobs[i] = toks, [LOGP] * len(toks), [LOGP] * len(toks)
            out.stop_reasons[i] = "length" if cut else "eos"
        return out


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(gym.base_model_path()))


def _call_text(message):
    fn = message["tool_calls"][0]["function"]
    return '<tool_call>{"name": "%s", "arguments": %s}</tool_call>' % (
        fn["name"], str(fn["arguments"]).replace("'", '"'))


def _script(row):
    """The model's side of a gym:lookup trace, written as the chat template writes it."""
    return [_call_text(m) if m.get("tool_calls") else m["content"] for m in row["messages"] if m["role"] == "assistant"]


def test_scripted_lookup_episodes_reproduce_the_sft_trace_tokens_and_masks(tok):
    pool = gym.load_task_rows("lookup", "train", n=20)
    # a two-lookup question (4 turns) and a one-lookup question (3 turns): episodes of different lengths
    rows = [next(r for r in pool if len(r["messages"]) == n) for (n) in (8, 6)]
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    assert turns == [4, 3]
    backend = ScriptedBackend(tok, {r["messages"][0]["content"]: _script(r) for r in rows})
    eng = RolloutEngine(None, tok, backend=backend)
    eps = run_episodes(eng, rows, LookupEnv, SamplingParams(max_new_tokens=64), parse_calls=parse, max_turns=4)

    for i, row in enumerate(rows):
        # the conversation is the worked trace itself, and the final answer earns 1.0 at the last turn
        assert eps.messages[i] == row["messages"]
        assert eps.turn_rewards[i] == [0.0] * (turns[i] - 1) + [1.0]
        assert eps.num_turns[i] == turns[i] and eps.tool_calls[i] == turns[i] - 1
        # tokens: exactly the template's rendering of the whole conversation; loss mask: exactly SFT's labels
        sft = tokenize_example(to_example(Record(row, f"row {i}")), tok, max_length=4096)
        ids = eps.input_ids[i][eps.attention_mask[i].bool()].tolist()
        assert ids == sft.input_ids[:len(ids)] and len(sft.input_ids) - len(ids) <= 1  # the template's final "\n"
        P = eps.prompt_ids.shape[1]
        loss = torch.cat([torch.zeros(P, dtype=torch.long), eps.loss_mask[i]])[eps.attention_mask[i].bool()]
        assert [t if m else -100 for t, m in zip(ids, loss.tolist())] == sft.labels[:len(ids)]
        # log-probs on the model's tokens only; turn index counts the assistant turns
        lm = eps.loss_mask[i].bool()
        assert eps.logprobs[i][lm].eq(LOGP).all() and eps.logprobs[i][~lm].eq(0).all()
        assert sorted(set(eps.turn_index[i][lm].tolist())) == list(range(turns[i]))
        assert eps.turn_index[i][~lm].eq(-1).all()
    assert eps.rewards.tolist() == [1.0, 1.0]
    # one generation batch per turn, holding only the episodes still running
    assert backend.calls == [2, 2, 2, 1]
    m = eps.metrics()
    assert m["invalid_call_rate"] == 0.0 and m["tool_errors_per_episode"] == 0.0 and m["truncated_frac"] == 0.0
    assert m["turns_per_episode"] == sum(turns) / 2 and m["reward_per_turn"] == 2 / sum(turns)


def test_environment_tokens_are_the_tool_result_and_the_next_prompt(tok):
    row = gym.load_task_rows("lookup", "train", n=1)[0]
    before, turn, result = row["messages"][:1], row["messages"][1], row["messages"][2]
    text = environment_text(tok, before, turn, [result], LookupEnv.tools)
    assert text == "\n<|im_start|>tool\n" + result["content"] + "<|im_end|>\n<|im_start|>assistant\n"


BAD = [
    ('What is 2 + 2?', ['<tool_call>{"name": "lookup", "arguments": {"item": </tool_call>',  # malformed JSON
                        "Answer: 4"]),
    ('Count our dams', ['<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>',  # unknown tool
                        '<tool_call>{"name": "lookup", "arguments": {"item": "dams"}}</tool_call>',
                                    '<tool_call>{"name": "calculator", "arguments": {"expression": "1 / 0"}}</tool_call>',
                                    "Answer: 0"]),
]


def test_invalid_calls_tool_errors_and_max_turns(tok):
    rows = [{"messages": [{"role": "user", "content": q}], "answer": "4", "country": "Luos"} for q, _ in BAD]
    backend = ScriptedBackend(tok, dict(BAD))
    eng = RolloutEngine(None, tok, backend=backend)
    eps = run_episodes(eng, rows, LookupEnv, SamplingParams(max_new_tokens=64), parse_calls=parse, max_turns=3,
                       group_size=2)
    assert len(eps) == 4 and eps.group_size == 2
    # episode 0/1: the malformed call is an ordinary (wrong) final answer that ends the episode
    assert eps.num_turns == [1, 1, 3, 3]
    assert eps.malformed_calls == [1, 1, 0, 0] and eps.invalid_calls == [0, 0, 1, 1]
    assert eps.tool_calls == [0, 0, 3, 3] and eps.tool_errors == [0, 0, 3, 3]
    assert eps.truncated == [False, False, True, True]  # max_turns=3 came before the answer
    assert [m["content"] for m in eps.messages[2] if m["role"] == "tool"] == [
        "error: unknown tool 'search' (tools: lookup, calculator)",
        "error: unknown item 'dams' (items: lakes, towers, bridges)",
        "error: division by zero"]
    assert eps.rewards.tolist() == [0.0, 0.0, 0.0, 0.0]
    m = eps.metrics()
    assert m["invalid_call_rate"] == pytest.approx(4 / 8)  # (2 malformed + 2 unknown) / (2 + 6 attempts)
    assert m["tool_errors_per_episode"] == 1.5 and m["turns_per_episode"] == 2.0
    # ragged episodes share one padded batch: the short ones are padding after their last token
    short, long_ = int(eps.completion_attention[0].sum()), int(eps.completion_attention[2].sum())
    assert short < long_ == eps.completion_ids.shape[1]
    assert eps.loss_mask[0, short:].sum() == 0 and eps.batch()["completion_mask"] is eps.loss_mask


def test_a_cut_turn_ends_the_episode_and_a_missing_argument_is_invalid(tok):
    cut_q, bare_q = "How many lakes do we have?", "How many towers do we have?"
    backend = ScriptedBackend(tok, {cut_q: ['<tool_call>{"name": "lookup", "arguments": {"item": "la'],
                                    bare_q: ['<tool_call>{"name": "lookup", "arguments": {}}</tool_call>', "Answer: 4"]},
                              cut=frozenset({(cut_q, 0)}))
    eng = RolloutEngine(None, tok, backend=backend)
    rows = [{"messages": [{"role": "user", "content": q}], "answer": "4", "country": "Luos"} for q in (cut_q, bare_q)]
    eps = run_episodes(eng, rows, LookupEnv, SamplingParams(max_new_tokens=8), parse_calls=parse)
    assert eps.num_turns == [1, 2] and eps.truncated == [True, False]
    assert eps.invalid_calls == [0, 1] and eps.tool_errors == [0, 1]
    assert eps.messages[1][2] == {"role": "tool", "content": "error: lookup needs the argument 'item'", "error": True}
    assert eps.rewards.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"params.n must be 1 \(use group_size for several episodes per row\), got 2"):
        run_episodes(eng, rows, LookupEnv, SamplingParams(n=2), parse_calls=parse)


def test_the_documented_python_environment_runs_model_code_in_the_sandbox(tok):
    """docs/rl.md's example environment, exactly as printed, played by the scripted model."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rl.md").read_text()
    section = doc[doc.index("## Multi-turn episodes"):]
    ns = {}
    exec(compile(re.findall(r"```python\n(.*?)```", section, flags=re.S)[1], "docs/rl.md PythonEnv", "exec"), ns)
    q = "What is 6 * 7?"
    script = ['<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>', "Answer: 42"]
    eng = RolloutEngine(None, tok, backend=ScriptedBackend(tok, {q: script}))
    eps = run_episodes(eng, [{"question": q, "answer": "42"}], ns["PythonEnv"], SamplingParams(max_new_tokens=64),
                       max_turns=3)  # the documented parser by default
    assert eps.messages[0][2] == {"role": "tool", "content": "42\n", "error": False}
    assert eps.rewards.tolist() == [1.0] and eps.num_turns == [2]


def test_environments_by_name():
    assert resolve_environment("gym:lookup") is LookupEnv
    assert resolve_environment("posttrain.gym.lookup:LookupEnv") is LookupEnv
    with pytest.raises(ValueError, match="environment 'lookup': give a registered name \\(gym:lookup\\) or 'module:Class'"):
        resolve_environment("lookup")
    with pytest.raises(ValueError, match="environment 'posttrain.gym.lookup:Nope': cannot import it"):
        resolve_environment("posttrain.gym.lookup:Nope")
