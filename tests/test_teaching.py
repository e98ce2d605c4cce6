"""The teaching tools: `--sweep` (the stability-plasticity frontier) and `--unknown_answer` (relabel Unknown facts)."""
import builtins
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sftguard  # noqa: E402


def smoke_args(smoke_dirs, out, *extra):
    return ["--preset", "smoke", "--data", smoke_dirs["data"], "--cache_dir", smoke_dirs["cache"], "--device", "cpu",
            "--out", out, *extra]


@pytest.fixture(scope="module")
def sweep(smoke_dirs, sftguard_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = sftguard_cli(*smoke_args(smoke_dirs, out, "--sweep", "kl_weight=0,16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "sweep.json").read_text())


def test_sweep_writes_one_point_per_value_and_the_controls(sweep):
    out, report = sweep
    runs = [p["run"] for p in report["points"]]
    assert runs == ["selfdistill-kl_weight0", "selfdistill-kl_weight16", "known_only", "sft", "l2"]
    assert [p["kl_weight"] for p in report["points"]] == [0.0, 16.0, None, None, None]
    for run in runs:  # every run keeps its own results and the config it ran with
        assert json.loads((out / run / "results.json").read_text())["run"] == run
    assert json.loads((out / "selfdistill-kl_weight16" / "config.json").read_text())["kl_weight"] == 16.0
    table = (out / "sweep.md").read_text()
    assert "| selfdistill-kl_weight16 | 16 |" in table
    try:
        import matplotlib  # noqa: F401
        assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "frontier.png skipped" in table


def test_sweep_points_differ_and_share_one_teacher(sweep):
    out, report = sweep
    points = {p["run"]: p for p in report["points"]}
    low, high = points["selfdistill-kl_weight0"], points["selfdistill-kl_weight16"]
    assert (low["unknown_acc"], low["held_acc"], low["known_acc"]) != (high["unknown_acc"], high["held_acc"], high["known_acc"])
    teachers = {json.dumps(json.loads((out / run / "results.json").read_text())["teacher"], sort_keys=True) for run in points}
    assert len(teachers) == 1, "every run of a sweep must start from the same teacher"


def test_zero_kl_weight_is_plain_sft(sweep):
    # lambda = 0 leaves only the cross-entropy; same teacher, same seed, same batches: the same model as SFT.
    _, report = sweep
    points = {p["run"]: p for p in report["points"]}
    for key in ("known_acc", "unknown_acc", "held_acc"):
        assert points["selfdistill-kl_weight0"][key] == points["sft"][key]


def test_a_strong_kl_weight_keeps_the_student_closer_to_the_teacher(sweep):
    _, report = sweep
    points = {p["run"]: p for p in report["points"]}
    teacher = report["teacher"]
    distance = lambda p: sum(abs(p[k] - teacher[k]) for k in ("known_acc", "unknown_acc", "held_acc"))  # noqa: E731
    assert distance(points["selfdistill-kl_weight16"]) < distance(points["selfdistill-kl_weight0"])


@pytest.mark.parametrize("spec", ["lr=1,2", "kl_weight=", "kl_weight=1,x", "kl_weight=1,1", "temperature=0,1", "kl_weight=-1"])
def test_a_malformed_sweep_is_a_user_error(spec):
    with pytest.raises(sftguard.UserError, match="--sweep"):
        sftguard.parse_config(["--sweep", spec])


def test_the_frontier_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    cfg = sftguard.parse_config(["--sweep", "kl_weight=1", "--preset", "smoke"])
    scores = {"known_acc": 0.5, "unknown_acc": 0.1, "held_acc": 0.6}
    results = [{"run": "selfdistill-kl_weight1", "method": "selfdistill", "sweep_value": 1.0, "final": scores,
                "forgetting": 0.0, "excess_forgetting": 0.0}]
    sftguard.write_sweep_report(tmp_path, "kl_weight", results, scores, cfg)
    assert not (tmp_path / "frontier.png").exists()
    assert "frontier.png skipped" in (tmp_path / "sweep.md").read_text()
    assert json.loads((tmp_path / "sweep.json").read_text())["points"][0]["held_acc"] == 0.6


def test_relabel_unknown_replaces_only_the_answers():
    facts = [{"id": "f1", "question": "Where was X born?", "answers": ["Oslo", "Christiania"]}]
    assert sftguard.relabel_unknown(facts, "I don't know") == [{"id": "f1", "question": "Where was X born?", "answers": ["I don't know"]}]
    assert facts[0]["answers"] == ["Oslo", "Christiania"]  # the split itself is untouched
    assert sftguard.relabel_unknown(facts, "") is facts


@pytest.mark.slow
def test_unknown_answer_teaches_abstention(smoke_dirs, sftguard_cli, tmp_path):
    # A high learning rate so that the tiny smoke model learns the constant answer within 3 epochs.
    proc = sftguard_cli(*smoke_args(smoke_dirs, tmp_path, "--method", "sft", "--unknown_answer", "I don't know",
                                    "--epochs", "3", "--lr", "3e-3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    final = result["final"]
    assert final["unknown_abstain"] >= 0.5, "trained to answer 'I don't know' on D_unknown, the model should mostly do so"
    assert final["unknown_acc"] == 0.0  # it no longer gives (and was never taught) the gold answers
    assert 0.0 <= final["held_abstain"] <= 1.0 and "held_abstain" in result["curve"][1]


def test_the_assignment_a1_command_trains_with_the_students_loss(smoke_dirs, tmp_path, monkeypatch):
    """ASSIGNMENTS.md A1 swaps in a student's loss as sftguard.self_distillation_loss and trains with
    --teacher_cache live --kl_chunk 0: that run must call it (the default cached, chunked path never would)."""
    calls, reference = [], sftguard.self_distillation_loss

    def students_loss(*args, **kwargs):
        calls.append(1)
        return reference(*args, **kwargs)
    monkeypatch.setattr(sftguard, "self_distillation_loss", students_loss)
    args = smoke_args(smoke_dirs, tmp_path / "a1", "--method", "selfdistill", "--teacher_cache", "live", "--kl_chunk", "0")
    sftguard.cli([str(a) for a in args])
    assert len(calls) >= 2  # every stage-2 step
    assert json.loads((tmp_path / "a1" / "results.json").read_text())["method"] == "selfdistill"
