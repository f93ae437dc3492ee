"""Fixtures for the eval tests: one tiny random model loaded once, and helpers to write task files (ours, and
lm-evaluation-harness task YAMLs over local JSONL files)."""

import json
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(scope="session")
def tiny(tiny_models):
    """(model_dir, model, tokenizer) of a tiny random qwen2 checkpoint."""
    from posttrain.models.loading import load

    d = tiny_models("qwen2")
    model, tok = load(d, device="cpu")
    return d, model, tok


@pytest.fixture(scope="session")
def other_tiny(tmp_path_factory, tokenizer):
    """A second tiny checkpoint with other random weights (a 'tuned' model that differs from the base)."""
    from posttrain.models.tiny import build_tiny_model

    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-other"), tokenizer=tokenizer, seed=1)


def write_task(dir_: Path, name: str, spec: dict, rows: list[dict]) -> Path:
    """A task YAML + JSONL pair in `dir_`; returns the YAML path."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = dir_ / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": f"{name}.jsonl", **spec}))
    return path


# lm-eval task rows: multiple choice (the label indexes the choices) and whole texts for a rolling perplexity
LM_EVAL_MC = [{"prompt": "The capital of Goumos is", "choices": [" Pomsom", " Paris", " elppa"], "label": 0},
              {"prompt": "12 + 30 =", "choices": [" 42", " 43", " 52", " 7"], "label": 0},
              {"prompt": "Hello", "choices": [", how can I help you today?", " world"], "label": 1},
              {"prompt": "The quick brown", "choices": [" fox", " dog jumps"], "label": 0},
              {"prompt": "Numbers 0 1 2", "choices": [" 3", " 4 5 6", " x"], "label": 0},
              {"prompt": "Red, green and", "choices": [" blue", " seven", " the"], "label": 0}]
LM_EVAL_TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Numbers 0 1 2 3 4 5 6 7 8 9 10."},
                 {"text": "A third document, a little longer than the others, to be scored whole."}]

# the body of an lm-eval task YAML for each output type, over the columns of the rows above (and prompt/target)
_LM_EVAL_BODY = {
    "multiple_choice": 'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                       'target_delimiter: ""\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n',
    "loglikelihood_rolling": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                             'metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]\n',
    "generate_until": 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
                      'generation_kwargs: {until: ["\\n"], max_gen_toks: 5, do_sample: false}\n'
                      'metric_list: [{metric: exact_match}]\n',
}


def write_lm_eval_task(dir_: Path, name: str, rows: list[dict], output_type: str) -> Path:
    """lm-eval task `pt_<name>` in `dir_`: `<name>.jsonl` and `pt_<name>.yaml`, read offline by lm-eval's
    `json` loader; returns the YAML path."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = dir_ / f"pt_{name}.yaml"
    path.write_text(f"task: pt_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {dir_ / name}.jsonl\n"
                    f"test_split: test\noutput_type: {output_type}\n" + _LM_EVAL_BODY[output_type])
    return path


def narrow_step(model, tok, lr):
    """One SGD step on a narrow chat task (8 prompts, one answer): at a high learning rate the model forgets fast."""
    rows = [tok(f"<|im_start|>user\nSay it {i}<|im_end|>\n<|im_start|>assistant\nyes yes yes yes<|im_end|>")["input_ids"]
            for i in range(8)]
    width = min(len(r) for r in rows)
    batch = torch.tensor([r[:width] for r in rows])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return step
