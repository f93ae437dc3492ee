"""The drift guard's reference built in pieces, each paid from the budget: the pieces, a cold cache within
the budget by the guard's own accounting, a short run that pays for nothing, the roll-back to the last
good check's exact weights, and the piece count carried through a resume."""

import time

import pytest
import torch

from posttrain.eval import drift as D
from posttrain.eval.guard import DriftGuard
from tests.eval.conftest import narrow_step


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def _model(tiny_models):
    from posttrain.models.loading import load

    model, tok = load(tiny_models("qwen2"), device="cpu")
    model.requires_grad_(True)
    return model, tok


class Clock:
    """A clock that moves only when the test says: the guard's own work then takes no time."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t



def test_pieces_double_and_spread_over_every_kind_and_form(tiny_models):
    model, tok = _model(tiny_models)
    g = DriftGuard(model, tok, max_new_tokens=6)  # the default 64 prompts and 64 text rows, pieces of 8
    assert [len(p.prompts) for p in g.pieces] == [8, 8, 16, 16, 16]
    assert [len(p.text_rows) for p in g.pieces] == [8, 8, 16, 16, 16]
    ids = [r["id"] for p in g.pieces for r in p.prompts]
    assert sorted(ids) == sorted(r["id"] for r in D.subset(D.load_prompts(), 64))  # each prompt once
    for p in g.pieces:
        assert {r["form"] for r in p.prompts} == {"plain", "chat"} and len({r["kind"] for r in p.prompts}) >= 4
    assert g.n_active == 0 and not list(D.cache_dir().glob("*"))  # nothing built before training
    # the start, measured against itself at every size, is exactly 0: the checks batch as the reference did
    for n in range(1, 6):
        m = g(model, 0)
        assert g.n_active == n and m["drift_prompts"] == sum(len(p.ref.n_cont) for p in g.pieces[:n])
        assert m["drift_kl"] == 0.0 and m["general_ppl_change"] == 0.0 and m["drift_kl_core"] == 0.0
    assert len(list(D.cache_dir().glob("*.safetensors"))) == 5 and len(list(D.cache_dir().glob("ppl-*.json"))) == 5


def test_a_short_run_on_a_cold_cache_builds_nothing_and_says_why(tiny_models):
    model, tok = _model(tiny_models)
    g = DriftGuard(model, tok)
    step = narrow_step(model, tok, lr=1e-3)
    for s in (1, 2):
        step()
        assert g.after_step(model, s, 2, {}) == ({}, None)
    out = g.summary()
    assert out["checks"] == 0 and out["drift_kl"] == 0.0 and out["build_s"] == 0.0
    assert out["note"].startswith("no check after the start: the run (") and "within 10% of its time" in out["note"]
    assert not list(D.cache_dir().glob("*"))  # no piece of the reference was paid for
    assert out["setup_s"] < g.next_cost()  # the set-up (a probe) costs less than the first check would


def test_cold_cache_stays_within_the_budget_by_the_guards_own_accounting(tiny_models):
    model, tok = _model(tiny_models)
    t0 = time.perf_counter()
    g = DriftGuard(model, tok)  # default prompts, continuations and text; a base never seen
    in_guard = time.perf_counter() - t0
    step, s, t_end = narrow_step(model, tok, lr=1e-4), 0, time.perf_counter() + 6.0
    while time.perf_counter() < t_end:
        step()
        s += 1
        t1 = time.perf_counter()
        _, reason = g.after_step(model, s, 0, {})
        in_guard += time.perf_counter() - t1
        assert reason is None
    out = g.summary()
    assert out["checks"] >= 2 and out["build_s"] > 0 and g.n_active >= 2, out
    assert len(list(D.cache_dir().glob("*.safetensors"))) == g.n_active  # built here, piece by piece
    # the accounting holds all the guard's time (the test's own clock around every call agrees) ...
    assert out["spent_s"] == pytest.approx(in_guard, rel=0.05, abs=0.02)
    # ... and the share stays within the 10% budget, the cold build of the pieces included
    assert out["time_share"] <= 0.10 * 1.1, out
    # the first check came early: it needed only the first piece, an eighth of the reference
    assert g.history[0]["drift_prompts"] <= 8


def test_rollback_restores_the_last_good_checks_weights_exactly(tiny_models):
    model, tok = _model(tiny_models)
    clock = Clock()
    g = DriftGuard(model, tok, n_prompts=16, max_new_tokens=6, n_text=8, max_drift_kl=0.05, max_ppl_change=None,
                   clock=clock)
    step, weights, reason = narrow_step(model, tok, lr=0.3), {}, None
    for s in range(1, 21):
        step()
        clock.t += 1.0  # a second of training per step and no guard time: a check after every step
        weights[s] = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, reason = g.after_step(model, s, 20, {})
        if reason:
            break
    assert reason is not None and g.history[-1]["drift_kl"] > 0.05, g.history
    assert [h["step"] for h in g.history] == list(range(1, s + 1))
    # the roll-back target is the check just before, not the start
    assert g.good_step == s - 1 >= 1 and reason.endswith(f"weights rolled back to step {s - 1} (eval.guard: off "
                                                         "disables it)")
    assert all(torch.equal(p, weights[s - 1][n]) for n, p in model.named_parameters())
    assert g.history[-2]["drift_kl"] <= 0.05


def test_resume_measures_as_many_pieces_as_before(tiny_models):
    model, tok = _model(tiny_models)
    kw = dict(n_prompts=24, max_new_tokens=4, n_text=24)
    clock = Clock()
    g = DriftGuard(model, tok, clock=clock, **kw)
    assert len(g.pieces) == 3
    for s in (1, 2):
        clock.t += 1.0
        assert g.after_step(model, s, 0, {})[0]
    state = g.state_dict()
    assert state["pieces"] == 2 and [h["step"] for h in state["history"]] == [1, 2]
    again = DriftGuard(model, tok, clock=Clock(), **kw)
    again.load_state_dict(state)
    m = again(model, 3)
    assert again.n_active == 2 and m["drift_prompts"] == g.history[-1]["drift_prompts"]
    assert [h["step"] for h in again.history] == [1, 2, 3]
