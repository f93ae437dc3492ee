"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match one process with the same global batch.

Tolerances (fp32, AdamW, 6 steps): loss trajectories agree to 1e-5 relative and final weights to
2e-5 absolute; what differs is only the order of floating-point reductions across ranks.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5


def _rows(n):
    rows = []
    for i in range(n):
        a, b = i % 17, (i * 7) % 13
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}, surely."}]})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    d = tmp_path_factory.mktemp("dist")
    model = build_tiny_model("llama", d / "model", tokenizer=build_tokenizer())
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(64)))
    return model, data


def _env():
    # one thread per rank: two ranks share two cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(model, data, out, *extra, batch=4, steps=6):
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", f"train.max_steps={steps}",
            f"train.batch_size={batch}", "train.lr=1e-3", "train.seed=5", "train.progress=false",
            "data.max_length=64", "train.warmup_steps=0", *extra]


def _single(args):
    r = subprocess.run([sys.executable, "-m", "posttrain", "sft", *args], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _torchrun(args, nproc=2, port=29631):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "posttrain", "sft", *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _losses(run):
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def _weights(run, sub="model"):
    f = run / sub / ("adapter_model.safetensors" if sub == "adapter" else "model.safetensors")
    return load_file(str(f))


def _close(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < WEIGHT_ATOL, worst
    return worst


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_two_ranks_match_one_process(setup, tmp_path, strategy, adapter):
    model, data = setup
    extra = [f"adapter.type={adapter}"] + (["train.lr=5e-3"] if adapter == "lora" else [])
    one = tmp_path / "one"
    _single(_args(model, data, one, *extra, batch=4))
    two = tmp_path / "two"
    _torchrun(_args(model, data, two, *extra, f"train.distributed={strategy}", batch=2))
    la, lb = _losses(one), _losses(two)
    assert len(la) == len(lb) == 6  # rank 0 alone logs: no duplicated lines
    assert la == pytest.approx(lb, rel=LOSS_RTOL)
    sub = "adapter" if adapter == "lora" else "model"
    _close(_weights(one, sub), _weights(two, sub))
    m = json.loads((two / "manifest.json").read_text())
    assert m["result"]["distributed"] == {"strategy": strategy, "world_size": 2}


def test_fsdp_kill_resume_and_reshard_to_one_rank(setup, tmp_path):
    """Kill an FSDP run after a checkpoint, resume it on 1 rank; it ends where an uninterrupted run does."""
    model, data = setup
    ref = tmp_path / "ref"
    _single(_args(model, data, ref, "train.save_every=2", batch=4, steps=8))

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
           "-m", "posttrain", "sft", *_args(model, data, run, "train.save_every=2", "train.distributed=fsdp",
                                            batch=2, steps=8)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-4").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    # torchrun starts its workers in their own sessions: kill the whole tree
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    assert not (run / "manifest.json").exists() and not (run / "model").exists()
    saved = json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert saved["world_size"] == 2

    # the sharded checkpoint converts to a plain HF model in one process, equal to the 1-rank one
    from transformers import AutoModelForCausalLM

    from posttrain.engine.export import export_checkpoint

    e2 = export_checkpoint(run / "checkpoints" / "step-4", tmp_path / "export2")
    e1 = export_checkpoint(ref / "checkpoints" / "step-4", tmp_path / "export1")
    assert AutoModelForCausalLM.from_pretrained(str(e2)) is not None
    _close(load_file(str(e1 / "model.safetensors")), load_file(str(e2 / "model.safetensors")))

    # resume with 1 process and the same global batch (4 = 2 per rank x 2 ranks)
    _single(_args(model, data, run, "train.save_every=2", batch=4, steps=8) + ["--resume"])
    la, lb = _losses(ref), _losses(run)
    assert la == pytest.approx(lb, rel=LOSS_RTOL)
    _close(_weights(ref), _weights(run))


def test_samplers_give_each_rank_a_disjoint_shard():
    from posttrain.engine.sampler import BatchSampler

    seen = []
    for r in range(2):
        s = BatchSampler(40, 4, seed=1, rank=r, world_size=2)
        seen.append([i for _ in range(s.batches_per_epoch) for i in s.next_batch()])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))
    one = BatchSampler(40, 8, seed=1)
    first = one.next_batch()
    assert sorted(first) == sorted(seen[0][:4] + seen[1][:4])  # same global batch as one rank x 8


def test_fsdp_wraps_each_decoder_layer_then_root(setup):
    """In-process, 1-rank gloo group: each layer and the root are FSDP units; bf16 params, fp32 reduce."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import posttrain
    from posttrain.engine.dist import decoder_layers, wrap_model

    model, _ = setup
    m, _ = posttrain.load(model)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29651")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped, used = wrap_model(m, "fsdp", precision="bf16", device=torch.device("cpu"))
        assert used == "fsdp"
        assert isinstance(wrapped, FSDPModule)
        assert all(isinstance(layer, FSDPModule) for layer in decoder_layers(wrapped))
        mp = wrapped._get_fsdp_state()._mp_policy
        assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
        _, auto = wrap_model(posttrain.load(model)[0], "auto", precision="fp32", device=torch.device("cpu"))
        assert auto == "ddp"  # a tiny model fits replicated
    finally:
        dist.destroy_process_group()
