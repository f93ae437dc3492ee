"""Loading a checkpoint never runs code from it unless trusted; damaged files give one clear error."""

import pickle

import pytest
import torch

from posttrain.engine import checkpoint as ckpt
from posttrain.engine.checkpoint import CheckpointError
from posttrain.models.loading import load


class _Payload:
    """Unpickling this writes `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def saved(tiny_models, tmp_path):
    """A model, its optimizer after one step, and a checkpoint of both."""
    model, _ = load(tiny_models("qwen2"), device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", "step-1", model=model, optimizer=opt,
                                trainer_state={"step": 1})
    return model, opt, path


def test_own_checkpoint_loads_without_trust_bit_exact(saved, tiny_models):
    model, opt, path = saved
    fresh, _ = load(tiny_models("qwen2"), device="cpu")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert state["step"] == 1
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_crafted_metadata_is_refused_and_runs_nothing(saved, tmp_path):
    model, _, path = saved
    marker = tmp_path / "marker"
    meta = path / "weights" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights(path, model)
    assert str(e.value).startswith(f"{meta}: refused to load: it refers to 'builtins.exec'")
    assert "--trust-checkpoint" in str(e.value)
    assert not marker.exists()
    # the payload is live: trusting the file runs it
    with pytest.raises(BaseException):
        ckpt.load_weights(path, model, trust=True)
    assert marker.read_text() == "ran"


def test_crafted_optimizer_value_is_refused_and_runs_nothing(saved, tmp_path):
    """DCP unpickles non-tensor optimizer values with torch.load(weights_only=False) by default."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sdu

    model, opt, path = saved
    marker = tmp_path / "marker"
    osd = sdu.get_optimizer_state_dict(model, opt)
    osd["param_groups"][0]["lr"] = _Payload(marker)
    dcp.save(osd, checkpoint_id=str(path / "optim"))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(path, model=model, optimizer=opt)
    assert str(e.value).startswith(f"{path / 'optim'}: refused to load: a stored value would need code")
    assert "--trust-checkpoint" in str(e.value)
    assert not marker.exists()
    ckpt.load_checkpoint(path, model=model, optimizer=opt, trust=True)
    assert marker.read_text() == "ran"


def test_crafted_rng_file_is_refused_even_when_trusted(saved, tmp_path):
    model, opt, path = saved
    marker = tmp_path / "marker"
    torch.save({"rng": _Payload(marker), "scheduler": None}, path / "extra-rank0.pt")
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="extra-rank0.pt: refused to load"):
            ckpt.load_checkpoint(path, model=model, optimizer=opt, trust=trust)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "weights" / ".metadata").write_bytes(b""), "weights/.metadata: damaged or not a checkpoint's"),
    (lambda p: (p / "weights" / ".metadata").write_bytes((p / "weights" / ".metadata").read_bytes()[:100]),
     "weights/.metadata: damaged or not a checkpoint's"),
    (lambda p: (p / "weights" / ".metadata").write_bytes(pickle.dumps([1, 2])), "holds a list, not DCP metadata"),
    (lambda p: (p / "weights" / ".metadata").unlink(), "weights/.metadata not found"),
    (lambda p: (p / "weights" / "__0_0.distcp").write_bytes(b"\0" * 64), "weights: cannot read the checkpoint"),
    (lambda p: (p / "trainer_state.json").write_text('{"step": 1'), "trainer_state.json: damaged"),
    (lambda p: (p / "trainer_state.json").write_text("[]"), "trainer_state.json: not a posttrain trainer state"),
    (lambda p: (p / "extra-rank0.pt").write_bytes(b"PK\3\4junk"), "extra-rank0.pt: damaged"),
])
def test_damaged_checkpoint_names_the_file(saved, damage, message):
    model, opt, path = saved
    damage(path)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(path, model=model, optimizer=opt)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_resume_through_the_cli_refuses_a_crafted_checkpoint_unless_trusted(tiny_models, tmp_path, capsys):
    """`posttrain sft --resume` reads the run's latest checkpoint: a crafted `.metadata` there runs
    nothing and names the file; `--trust-checkpoint` reaches the loader (the payload then runs)."""
    import json

    from posttrain.cli import main
    from posttrain.stages import load_config, sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    args = [f"model={tiny_models('qwen2')}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
            "train.save_every=1", "train.batch_size=4", "train.progress=false"]
    sft.run(load_config("sft", overrides=args))
    (out / "manifest.json").unlink()  # as a kill after the step-1 checkpoint leaves it (no manifest, no model)
    (out / "model").rename(tmp_path / "model-moved")
    meta = sorted((out / "checkpoints").glob("step-*"))[-1] / "weights" / ".metadata"
    marker = tmp_path / "marker"
    meta.write_bytes(pickle.dumps(_Payload(marker)))
    assert main(["sft", "--resume", *args]) == 2
    err = capsys.readouterr().err
    assert ".metadata" in err and "--trust-checkpoint" in err and "Traceback" not in err
    assert not marker.exists()
    # trusted, the payload runs (it is no metadata object, so the load then fails with a clear error)
    assert main(["sft", "--resume", "--trust-checkpoint", *args]) == 2
    assert marker.read_text() == "ran"
