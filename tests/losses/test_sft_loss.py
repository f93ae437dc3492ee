"""The output head at labelled positions only gives token_nll's loss and gradients exactly."""

import torch

from posttrain.losses.sft import IGNORE_INDEX, next_token_targets, target_nll, token_nll


def random_labels(B, T, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    # prompt, padding and a row with no loss at all: the shapes chat data has
    labels[0, :7] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[1, 15:] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    labels[3, :12] = IGNORE_INDEX
    return labels


def test_next_token_targets_keep_exactly_the_needed_positions():
    labels = random_labels(4, 20, 50)
    positions, targets = next_token_targets(labels)
    # position t is needed iff some row trains labels[:, t+1]; rows 0 and 1 start training at 7 and 3
    assert positions.tolist() == list(range(2, 19))
    assert torch.equal(targets, labels[:, positions + 1])
    assert int((targets != IGNORE_INDEX).sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_target_nll_at_kept_positions_equals_token_nll_and_its_gradient():
    B, T, V = 4, 20, 50
    labels = random_labels(B, T, V)
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
    full, n_full = token_nll(logits, labels)
    (g_full,) = torch.autograd.grad(full, logits)
    positions, targets = next_token_targets(labels)
    part, n_part = target_nll(logits[:, positions], targets)
    (g_part,) = torch.autograd.grad(part, logits)
    assert int(n_full) == int(n_part) == 13 + 12 + 0 + 8
    assert abs(float(full.detach()) - float(part.detach())) < 1e-5 * abs(float(full.detach()))
    assert torch.allclose(g_full, g_part, atol=1e-7)


def test_no_loss_tokens_gives_a_zero_that_still_backpropagates():
    labels = torch.full((2, 6), IGNORE_INDEX)
    positions, targets = next_token_targets(labels)
    assert positions.numel() == 0
    logits = torch.randn(2, 6, 9, requires_grad=True)
    loss, n = target_nll(logits[:, positions], targets)
    loss.backward()
    assert int(n) == 0 and float(loss) == 0.0 and logits.grad.abs().sum() == 0
