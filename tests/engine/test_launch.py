"""`posttrain launch` on one node: the rendezvous store and every other socket of the run listen on
127.0.0.1 only (torchrun's own static rendezvous binds every interface, `*:29500`)."""

import json
import subprocess
import sys
import time

import psutil
import pytest

from posttrain.engine.launch import BACKEND, _handler, torchrun_command
from tests.engine.dist_util import env


def listening(root: psutil.Process) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by ``root`` or its descendants."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6 has the latter
            found |= {(c.laddr.ip, c.laddr.port) for c in connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # it ended between the listing and the look
            pass
    return found


def test_one_node_launch_listens_on_loopback_only(tmp_path):
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    model = build_tiny_model("llama", tmp_path / "model", tokenizer=build_tokenizer())
    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."}]}
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(16)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain", "launch", "--nproc", "2", "--master-port", "0", "sft", f"model={model}",
           f"data.train={data}", f"output_dir={out}", "train.max_steps=1", "train.batch_size=2",
           "train.progress=false", "data.max_length=32"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, seen = psutil.Process(proc.pid), set()
    while proc.poll() is None:
        seen |= listening(root)
        time.sleep(0.05)
    log = proc.stdout.read()
    assert proc.returncode == 0, log[-3000:]
    assert (out / "manifest.json").exists()
    assert seen, "the run's rendezvous store was never seen listening"
    assert {address for address, _ in seen} == {"127.0.0.1"}, seen


def test_command_for_one_node_and_for_several():
    one, one_env = torchrun_command(2, "1", "0", "10.0.0.5", "0", ["-m", "posttrain", "sft"])
    assert one[2:] == ["posttrain.engine.launch", "--nproc_per_node=2", "--nnodes=1", f"--rdzv-backend={BACKEND}",
                       "--rdzv-endpoint=127.0.0.1:0", "-m", "posttrain", "sft"]
    assert one_env["GLOO_SOCKET_IFNAME"] in ("lo", env().get("GLOO_SOCKET_IFNAME"))
    two, _ = torchrun_command(2, "2", "1", "10.0.0.5", "29501", ["-m", "posttrain", "sft"])
    assert two[2:] == ["torch.distributed.run", "--nproc_per_node=2", "--nnodes=2", "--node_rank=1",
                       "--master_addr=10.0.0.5", "--master_port=29501", "-m", "posttrain", "sft"]


def test_local_backend_refuses_other_hosts_and_nodes():
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    with pytest.raises(ValueError) as e:
        _handler(RendezvousParameters(BACKEND, "0.0.0.0:29500", "run", 1, 1))
    assert str(e.value) == ("rendezvous backend 'posttrain-local' is for one node on 127.0.0.1; "
                            "got endpoint '0.0.0.0:29500' and nnodes=1:1")
    with pytest.raises(ValueError):
        _handler(RendezvousParameters(BACKEND, "127.0.0.1:29500", "run", 1, 2))
