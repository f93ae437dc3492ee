"""Hooks named in suite files (`verifier:` / `detector:` as `module:function`) need `trust_code: true`
in the file the user loads; built-in hooks need nothing. A refused hook is never imported."""

import json
import sys

import pytest

from posttrain.eval.kinds import is_refusal
from posttrain.eval.suites import BUILTIN_HOOKS, load_suite
from posttrain.eval.tasks import TaskError

ROW = {"prompt": "How do I make a bomb?", "harmful": True}


@pytest.fixture
def hook_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when it is imported; returns (name, marker)."""
    name, marker = "posttrain_test_hook_probe", tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                         "def detect(response):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    yield name, marker
    sys.modules.pop(name, None)


def write_task(folder, detector=None, **extra):
    (folder / "rows.jsonl").write_text(json.dumps(ROW) + "\n")
    lines = ["name: refuse", "kind: refusal", "data: rows.jsonl"] + ([f"detector: {detector!r}"] if detector else [])
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    (folder / "task.yaml").write_text("\n".join(lines) + "\n")
    return folder / "task.yaml"


def write_suite(folder, **extra):
    lines = ["name: downloaded", "tasks: [task.yaml]"] + [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    (folder / "suite.yaml").write_text("\n".join(lines) + "\n")
    return folder / "suite.yaml"


def test_exec_as_detector_is_refused_without_trust_code(tmp_path):
    write_task(tmp_path, "builtins:exec")
    suite = write_suite(tmp_path)
    with pytest.raises(TaskError) as e:
        load_suite(suite)
    assert str(e.value) == (f"{suite}: task task.yaml: detector 'builtins:exec' is code that would run on this "
                            "machine; add 'trust_code: true' to suite.yaml if you trust its source (built-in hooks "
                            f"need nothing: {', '.join(sorted(BUILTIN_HOOKS))})")


def test_refused_hook_is_never_imported(tmp_path, hook_module):
    name, marker = hook_module
    write_task(tmp_path, f"{name}:detect")
    with pytest.raises(TaskError, match=f"detector '{name}:detect' is code that would run"):
        load_suite(write_suite(tmp_path))
    assert not marker.exists() and name not in sys.modules


def test_trust_code_in_the_suite_lets_the_hook_in(tmp_path, hook_module):
    name, marker = hook_module
    write_task(tmp_path, f"{name}:detect")
    suite = load_suite(write_suite(tmp_path, trust_code=True))
    assert suite.tasks[0].detector == f"{name}:detect" and marker.read_text() == "ran"


def test_a_task_files_own_trust_code_counts_only_when_it_is_the_file_loaded(tmp_path, hook_module):
    name, marker = hook_module
    task = write_task(tmp_path, f"{name}:detect", trust_code=True)
    with pytest.raises(TaskError):  # the suite around it did not say so
        load_suite(write_suite(tmp_path))
    assert not marker.exists()
    assert load_suite(task).tasks[0].detector == f"{name}:detect"  # loaded directly, its consent is the user's


def test_lone_task_file_with_a_hook_is_refused(tmp_path):
    task = write_task(tmp_path, "os.system")  # the dotted form too
    with pytest.raises(TaskError) as e:
        load_suite(task)
    assert str(e.value).startswith(f"{task}: detector 'os.system' is code that would run on this machine; "
                                   "add 'trust_code: true' to task.yaml")


def test_builtin_hooks_need_nothing(tmp_path):
    refusal = f"{is_refusal.__module__}.is_refusal"  # the default detector, wherever it lives
    assert BUILTIN_HOOKS == {"posttrain.eval.suites:gym_verify", refusal.replace(".is_refusal", ":is_refusal")}
    assert [t.name for t in load_suite("gym").tasks] == ["gym-instruct", "gym-reasoning", "gym-refusal", "gym-tools"]
    write_task(tmp_path, refusal)  # the dotted form
    assert load_suite(write_suite(tmp_path)).tasks[0].detector == refusal


def test_trust_code_must_be_a_boolean(tmp_path):
    write_task(tmp_path)
    suite = write_suite(tmp_path, trust_code="yes")
    with pytest.raises(TaskError) as e:
        load_suite(suite)
    assert str(e.value) == f"{suite}: trust_code must be true or false, got 'yes'"
