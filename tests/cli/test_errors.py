"""Bad input through the real `posttrain` command: one line naming what and where, exit code 2, no traceback.

A representative subset of the corpus in tests/data/test_bad_input.py, run as subprocesses (as a
user runs them); `--debug` brings the traceback back.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.engine.checkpoint import list_checkpoints

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}


def _posttrain(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _sft(model, data, out, *extra):
    return ["sft", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=1",
            "train.progress=false", *extra]


def _one_error_line(r):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("posttrain: error: ")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0][len("posttrain: error: "):]


def _chat(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("qwen2")


def test_utf16_data_file(model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps({"messages": [U, A]}).encode("utf-16"))
    msg = _one_error_line(_posttrain(*_sft(model, data, tmp_path / "run")))
    assert msg.startswith(f"{data}: the file is UTF-16-encoded; save it as UTF-8")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"


def test_truncated_safetensors(model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[:4096])
    data = _chat(tmp_path / "train.jsonl", {"messages": [U, A]})
    msg = _one_error_line(_posttrain(*_sft(broken, data, tmp_path / "run")))
    assert msg.startswith(f"{st}: truncated (4096 bytes, its header describes ")


def test_hub_name_offline(tmp_path):
    data = _chat(tmp_path / "train.jsonl", {"messages": [U, A]})
    msg = _one_error_line(_posttrain(*_sft("some-org/some-model", data, tmp_path / "run")))
    assert msg.startswith("model 'some-org/some-model' is not a local directory, and the hub could not be reached")


def test_foreign_output_dir_is_refused_and_kept(model, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"someone else's")
    data = _chat(tmp_path / "train.jsonl", {"messages": [U, A]})
    msg = _one_error_line(_posttrain(*_sft(model, data, out)))
    assert msg.startswith(f"output_dir {out} is not empty and is not a posttrain run")
    assert (out / "model" / "model.safetensors").read_bytes() == b"someone else's"
    assert sorted(p.name for p in out.iterdir()) == ["model"]


def test_export_of_a_crafted_checkpoint_runs_nothing(model, tmp_path, capsys):
    data = _chat(tmp_path / "train.jsonl", *[{"messages": [U, A]}] * 4)
    run = tmp_path / "run"
    assert main(_sft(model, data, run, "train.save_every=1", "train.max_steps=2")) == 0
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    marker = tmp_path / "marker"
    (ckpt / "weights" / ".metadata").write_bytes(
        pickle.dumps(type("P", (), {"__reduce__": lambda s: (exec, (f"open({str(marker)!r}, 'w')",))})()))
    msg = _one_error_line(_posttrain("export", ckpt, "--out", tmp_path / "exported"))
    assert msg.startswith(f"{ckpt / 'weights' / '.metadata'}: refused to load: it refers to 'builtins.exec'")
    assert "--trust-checkpoint" in msg
    assert not marker.exists() and not (tmp_path / "exported").exists()
    # the same through --resume (in-process: the same `main`)
    (run / "manifest.json").unlink()
    assert main([*_sft(model, data, run, "train.save_every=1", "train.max_steps=3"), "--resume"]) == 2
    assert f"posttrain: error: {ckpt / 'weights' / '.metadata'}: refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_debug_shows_the_traceback(tmp_path):
    r = _posttrain("--debug", *_sft("some-org/some-model", tmp_path / "t.jsonl", tmp_path / "run"))
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "ModelLoadError: model 'some-org/some-model'" in r.stderr


# the rest in-process through the same `main` (no interpreter start per case)
@pytest.mark.parametrize("make, message", [
    (lambda t: t.joinpath("train.jsonl").write_bytes(b""), "{data}: the file holds no rows"),
    (lambda t: t.joinpath("train.parquet").write_bytes(b"PAR1 junk"), "{parquet}: not a readable parquet file"),
    (lambda t: t.joinpath("train.jsonl").write_bytes(b'{"messages": []}\n{"text": "\xff"}\n'),
     "{data} line 2: not valid UTF-8 (byte 0xff at column 11)"),
    (lambda t: _chat(t / "train.jsonl", {"messages": [U, A]}, {"messages": [U, A, {"role": "system", "content": "x"},
                                                                              U, A]}),
     "{data} line 2: messages[2] is a system message after the conversation started"),
    (lambda t: _chat(t / "train.jsonl", {"messages": [U, A, U]}),
     "{data} line 1: messages ends on a user turn (messages[2])"),
    (lambda t: _chat(t / "train.jsonl", {"messages": [{"role": "tool", "content": "1"}, U, A]}),
     "{data} line 1: messages[0] is a tool result with no tool call before it"),
])
def test_bad_data_in_process(model, tmp_path, capsys, make, message):
    make(tmp_path)
    src = tmp_path / "train.parquet" if (tmp_path / "train.parquet").exists() else tmp_path / "train.jsonl"
    assert main(_sft(model, src, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"posttrain: error: {message.format(data=src, parquet=src)}" in err


def test_output_dir_is_a_file_and_missing_model(model, tmp_path, capsys):
    data = _chat(tmp_path / "train.jsonl", {"messages": [U, A]})
    (tmp_path / "run").write_text("x")
    assert main(_sft(model, data, tmp_path / "run")) == 2
    assert f"posttrain: error: output_dir {tmp_path / 'run'} is a file, not a directory" in capsys.readouterr().err
    assert main(_sft(tmp_path / "nope", data, tmp_path / "run2")) == 2
    assert f"posttrain: error: model directory not found: {tmp_path / 'nope'}; give a directory" in \
        capsys.readouterr().err
