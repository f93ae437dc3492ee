"""The chunked head at loss positions against the plain path (materialised logits), on the tiny
Llama/Qwen2/Mistral/Gemma checkpoints: same loss, same gradients, fp32 tolerance."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.config import AdapterConfig
from posttrain.losses.sft import next_token_targets, target_nll
from posttrain.models import adapters as A
from posttrain.models.head import dense_head, position_logps, position_nll, takes_logits_to_keep
from posttrain.rollout.logprobs import completion_logprobs

B, T = 2, 14


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).train()


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0  # right padding on row 1
    labels = ids.clone()
    labels[0, :5], labels[1, :7] = -100, -100  # prompts
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _assert_same_nll(model, vocab, *, rtol=1e-4, atol=1e-5):
    inputs, labels = _batch(vocab)
    positions, targets = next_token_targets(labels)
    params = _trainable(model)
    loss, n = position_nll(model, inputs, positions, targets)
    grads = torch.autograd.grad(loss, params)
    ref, ref_n = target_nll(model(**inputs, use_cache=False, logits_to_keep=positions).logits, targets)
    ref_grads = torch.autograd.grad(ref, params)
    assert int(n) == int(ref_n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
    return float(loss)


def test_takes_logits_to_keep(tiny_models):
    m = _load(tiny_models("qwen2"))
    assert takes_logits_to_keep(m)
    assert not takes_logits_to_keep(nn.Linear(2, 2))


def test_full_finetune_every_arch(tiny_models, arch):
    m = _load(tiny_models(arch))
    head = dense_head(m)
    assert head is not None and head.weight is m.lm_head.weight
    # gemma ties the head to the input embeddings: one parameter, both gradients summed into it
    assert (head.weight is m.get_input_embeddings().weight) == (arch == "gemma")
    shapes = []
    m.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    _assert_same_nll(m, m.config.vocab_size)
    # the chunked call handed the head an empty slice; the plain call computed [B, K, V]
    inputs, labels = _batch(m.config.vocab_size)
    k = len(next_token_targets(labels)[0])
    assert shapes == [(B, 0, m.config.vocab_size), (B, k, m.config.vocab_size)]


def test_gradient_checkpointing(tiny_models):
    m = _load(tiny_models("llama"))
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same_nll(m, m.config.vocab_size)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_body_adapters(tiny_models, kind):
    m = _load(tiny_models("mistral"))
    A.apply(m, AdapterConfig(type=kind, r=4))
    with torch.no_grad():  # a fresh adapter is the identity; move it so its gradients are not trivial
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert dense_head(m) is not None
    _assert_same_nll(m, m.config.vocab_size)


def test_adapted_head_falls_back_to_plain(tiny_models):
    m = _load(tiny_models("qwen2"))
    m.requires_grad_(False)
    st = A.AdapterState(kind="lora")
    A.set_state(m, st)
    A.add_lora(m, st, "default", ["lm_head", "model.layers.0.self_attn.q_proj"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert type(m.get_output_embeddings()) is not nn.Linear
    assert dense_head(m) is None
    _assert_same_nll(m, m.config.vocab_size)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning(tiny_models, tokenizer, kind):
    m = _load(tiny_models("llama"))
    torch.manual_seed(0)
    A.apply(m, AdapterConfig(type=kind, num_virtual_tokens=3), tokenizer=tokenizer)
    _assert_same_nll(m, m.config.vocab_size)


def test_gemma2_softcapping():
    cfg = AutoConfig.for_model("gemma2", vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, intermediate_size=64, final_logit_softcapping=2.0)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").train()
    with torch.no_grad():
        m.lm_head.weight.mul_(40)  # logits well past the cap, so that a missing tanh would show
    assert dense_head(m).softcap == 2.0
    _assert_same_nll(m, 300)


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_model_without_logits_to_keep_uses_plain(tiny_models):
    m = _NoLogitsToKeep(_load(tiny_models("qwen2")))
    assert dense_head(m) is None
    inputs, labels = _batch(m.inner.config.vocab_size)
    positions, targets = next_token_targets(labels)
    loss, n = position_nll(m, inputs, positions, targets)
    ref, _ = target_nll(m.inner(**inputs, logits_to_keep=positions).logits, targets)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_position_logps_equals_rollout_scoring(tiny_models, temperature):
    m = _load(tiny_models("qwen2"))
    g = torch.Generator().manual_seed(1)
    P, C = 5, 6
    ids = torch.randint(3, m.config.vocab_size, (3, P + C), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left-padded prompt
    comp = torch.ones(3, C, dtype=torch.long)
    comp[1, -2:] = 0  # a completion that stopped early
    batch = {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
             "completion_mask": comp}
    ref_lp, ref_ent = completion_logprobs(m, batch, temperature=temperature, with_entropy=True)
    (ref_g,) = torch.autograd.grad(ref_lp.sum(), [m.lm_head.weight])
    positions = torch.arange(P - 1, P + C - 1)
    targets = ids[:, P:].masked_fill(comp == 0, -100)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    lp, ent = position_logps(m, inputs, positions, targets, temperature=temperature, with_entropy=True)
    (g,) = torch.autograd.grad(lp.sum(), [m.lm_head.weight])
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.detach(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-5)
    assert (lp[1, -2:] == 0).all() and (ent[1, -2:] == 0).all()


def test_position_logps_rejects_bad_temperature(tiny_models):
    m = _load(tiny_models("qwen2"))
    inputs, labels = _batch(m.config.vocab_size)
    positions, targets = next_token_targets(labels)
    with pytest.raises(ValueError, match="position_logps: temperature must be > 0, got 0"):
        position_logps(m, inputs, positions, targets, temperature=0)
