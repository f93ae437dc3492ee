"""Prompt and prefix tuning on Llama and Qwen2: PEFT interop, training, generation with the installed transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.models import adapters as A

ARCHS = ["llama", "qwen2"]
N = 5


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _ids():
    return torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(0))


def _adapted(path, kind, tokenizer, **kw):
    torch.manual_seed(0)
    return A.apply(_load(path), AdapterConfig(type=kind, num_virtual_tokens=N, **kw), tokenizer=tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_saved_prompt_loads_in_peft(tiny_models, tokenizer, tmp_path, arch, kind):
    from peft import PeftModel

    path = tiny_models(arch)
    m = _adapted(path, kind, tokenizer, prefix_projection=kind == "prefix")
    ids = _ids()
    ours = m(input_ids=ids).logits
    assert ours.shape[:2] == ids.shape  # virtual positions are not returned
    with A.disabled(m):
        assert torch.equal(m(input_ids=ids).logits, _load(path)(input_ids=ids).logits)
    A.save(m, tmp_path / "ad")
    config, tensors, _ = A.read_adapter(tmp_path / "ad")
    assert list(tensors) == ["prompt_embeddings"]
    if kind == "prefix":  # GQA: PEFT's geometry uses the KV heads
        layers, kv, hd = m.config.num_hidden_layers, m.config.num_key_value_heads, 64 // 4
        assert config["token_dim"] == kv * hd and config["num_attention_heads"] == kv
        assert tensors["prompt_embeddings"].shape == (N, layers * 2 * kv * hd)
    d = A.describe(tmp_path / "ad")
    assert d["type"] == kind and d["num_virtual_tokens"] == N and not d["vllm_servable"]
    assert f"virtual tokens {N}" in A.format_description(d)
    pm = PeftModel.from_pretrained(_load(path), str(tmp_path / "ad")).eval()
    theirs = pm(input_ids=ids).logits
    assert (theirs[:, -ids.shape[1]:] - ours).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_saved_prompt_loads_here(tiny_models, tmp_path, arch, kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    path = tiny_models(arch)
    torch.manual_seed(1)
    cfg = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N) if kind == "prompt"
           else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    pm = get_peft_model(_load(path), cfg).eval()  # PEFT's random init: N(0, 1) virtual tokens
    ids = _ids()
    theirs = pm(input_ids=ids).logits[:, -ids.shape[1]:]
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = A.load_adapter(_load(path), tmp_path / "peft")
    assert A.adapter_type(ours) == kind
    assert (ours(input_ids=ids).logits - theirs).abs().max() < 1e-4
    assert (ours(input_ids=ids).logits - _load(path)(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_left_padded_equals_alone_and_uncached(tiny_models, tokenizer, arch, kind):
    m = _adapted(tiny_models(arch), kind, tokenizer)
    prompts = ["Hello", "What is 2 + 3? The answer is"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (enc["attention_mask"] == 0).any()
    batch = m.generate(**enc, max_new_tokens=6, do_sample=False)
    for i, p in enumerate(prompts):
        one = tokenizer([p], return_tensors="pt")["input_ids"]
        alone = m.generate(input_ids=one, max_new_tokens=6, do_sample=False)
        cur = one
        for _ in range(6):  # the same greedy decode through full forwards, no KV cache
            cur = torch.cat([cur, m(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert alone.tolist() == cur.tolist()
        assert batch[i, -6:].tolist() == alone[0, -6:].tolist()
    with A.disabled(m):
        base = m.generate(**enc, max_new_tokens=6, do_sample=False)
    assert base[:, -6:].tolist() != batch[:, -6:].tolist()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_training_updates_only_virtual_tokens(tiny_models, tokenizer, kind):
    m = _adapted(tiny_models("qwen2"), kind, tokenizer, prefix_projection=kind == "prefix")
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("posttrain_prompt.") for n in names)
    ids = _ids()
    labels = ids.clone()
    labels[:, :3] = -100
    m.train()
    opt = torch.optim.Adam(A.trainable_parameters(m), lr=5e-2)
    losses = []
    for _ in range(8):
        out = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1
    # HF's loss over the extended labels equals the NLL over the real tokens of the returned logits
    with torch.no_grad():
        out = m(input_ids=ids, labels=labels)
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, nll, atol=1e-5, rtol=1e-5)


def test_prompt_init_from_text_and_vocab(tiny_models, tokenizer):
    path = tiny_models("llama")
    m = _adapted(path, "prompt", tokenizer, init_text="Hello world")
    emb = m.get_input_embeddings().weight
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    want = emb[torch.tensor((ids * N)[:N])]
    assert torch.equal(m.posttrain_prompt.embedding.weight, want)
    cfg = m._posttrain_adapter_state.configs["default"]
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["prompt_tuning_init_text"] == "Hello world"
    v = _adapted(path, "prompt", tokenizer).posttrain_prompt.embedding.weight  # default: sampled vocabulary
    assert all(any(torch.equal(row, e) for e in emb) for row in v)


def test_packed_batches_are_refused(tiny_models, tokenizer):
    m = _adapted(tiny_models("qwen2"), "prefix", tokenizer)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    with pytest.raises(ValueError, match="prefix tuning does not support packed batches"):
        m(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=mask, position_ids=torch.arange(6)[None])
    with pytest.raises(ValueError, match="cannot be merged"):
        A.merge(m)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    with pytest.raises(ValueError, match="cannot train with gradient checkpointing"):
        m(input_ids=torch.ones(1, 6, dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_logits_at_kept_positions_equal_the_full_logits_there(tiny_models, tokenizer, arch, kind):
    # SFT and preference losses run the output head only at loss positions (logits_to_keep=tensor);
    # prompt tuning shifts those positions past its virtual tokens
    m = _adapted(tiny_models(arch), kind, tokenizer)
    ids = _ids()
    full = m(input_ids=ids).logits
    keep = torch.tensor([0, 3, 4, 9])
    kept = m(input_ids=ids, logits_to_keep=keep).logits
    assert kept.shape[:2] == (2, 4)
    assert torch.allclose(kept, full[:, keep], atol=1e-5), (kept - full[:, keep]).abs().max()
    last = m(input_ids=ids, logits_to_keep=3).logits
    assert torch.allclose(last, full[:, -3:], atol=1e-5)
