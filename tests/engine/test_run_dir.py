"""`claim` uses an output_dir only when it is new, empty or provably an unfinished run of ours."""

import json

import pytest

from posttrain.config import load_config
from posttrain.engine import run as rundir
from posttrain.engine.run import RunDirError

from .mounts import tmpfs


def _cfg(out):
    return load_config("sft", overrides=["model=m", "data.train=t.jsonl", f"output_dir={out}"])


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_new_and_empty_dirs_are_claimed(tmp_path):
    for out in (tmp_path / "new" / "run", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert rundir.claim(_cfg(out), resume=False) == out
        assert "stage: sft" in (out / "config.yaml").read_text()


def test_foreign_model_folder_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"mine")
    (out / "notes.txt").write_text("keep")
    before = _snapshot(out)
    with pytest.raises(RunDirError) as e:
        rundir.claim(_cfg(out), resume=False)
    assert str(e.value) == (
        f"output_dir {out} is not empty and is not a posttrain run (no manifest.json or config.yaml written by "
        "posttrain); it holds model/, notes.txt. posttrain never writes over files it did not create: choose a new "
        "output_dir, or move those files away (nothing was changed)")
    with pytest.raises(RunDirError):
        rundir.claim(_cfg(out), resume=True)
    assert _snapshot(out) == before


def test_foreign_config_yaml_is_not_proof(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 3\n")
    with pytest.raises(RunDirError, match="it holds config.yaml"):
        rundir.claim(_cfg(out), resume=False)
    assert (out / "config.yaml").read_text() == "lr: 3\n"


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", '{"stage": "sft"}', "\xff\xfe"])
def test_corrupt_manifest_is_refused_not_retrained_over(tmp_path, content):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "w").write_text("trained")
    (out / "manifest.json").write_text(content, encoding="latin-1")
    for resume in (False, True):
        with pytest.raises(RunDirError) as e:
            rundir.claim(_cfg(out), resume=resume)
        assert str(e.value).startswith(f"{out / 'manifest.json'} is empty or corrupt, so posttrain cannot tell "
                                       "whether this run completed; nothing was changed.")
    assert (out / "manifest.json").read_text(encoding="latin-1") == content
    assert (out / "model" / "w").read_text() == "trained"


def test_completed_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(RunDirError, match="already holds a completed run"):
        rundir.claim(_cfg(out), resume=True)


def test_our_unfinished_run_resumes_and_needs_resume_for_checkpoints(tmp_path):
    out = tmp_path / "run"
    rundir.claim(_cfg(out), resume=False)  # writes config.yaml: from now on the directory is provably ours
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(RunDirError, match="holds checkpoints of an unfinished run; pass --resume"):
        rundir.claim(_cfg(out), resume=False)
    (out / "manifest.json").write_text(json.dumps({"status": "failed", "stage": "sft"}))
    assert rundir.claim(_cfg(out), resume=True) == out
    assert not (out / "manifest.json").exists()  # a resumed run is not signed off until it ends


def test_output_dir_that_is_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("x")
    with pytest.raises(RunDirError) as e:
        rundir.claim(_cfg(out), resume=False)
    assert str(e.value) == f"output_dir {out} is a file, not a directory; choose another output_dir (nothing was changed)"


def test_read_only_output_dir(tmp_path):
    # a read-only mount: root (as in CI) writes through file permissions, not through a read-only mount
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(RunDirError) as e:
            rundir.claim(_cfg(ro / "run"), resume=False)
    assert str(e.value) == (f"cannot write to output_dir {ro / 'run'}: Read-only file system ({ro / 'run'}); "
                            "choose a writable output_dir")


def test_commit_never_replaces_a_folder_it_did_not_claim(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "mine.txt").write_text("keep")
    tmp = rundir._atomic_dir(final)
    (tmp / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match=f"{final} already exists; posttrain does not replace what it did not write"):
        rundir._commit(tmp, final)
    assert (final / "mine.txt").read_text() == "keep" and not tmp.exists()


def test_failed_manifest_that_cannot_be_written_does_not_hide_the_error(tmp_path, capsys):
    out = tmp_path / "gone"  # the directory does not exist: writing the manifest fails
    rundir.write_manifest(out, status="failed", cfg=_cfg(out), data_hashes={}, result={}, started=0.0)
    assert f"posttrain: could not write {out / 'manifest.json'} (No such file or directory)" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="the run is not signed off"):
        rundir.write_manifest(out, status="completed", cfg=_cfg(out), data_hashes={}, result={}, started=0.0)
