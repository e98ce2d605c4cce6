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
    assert "| selfdistill-kl_weight16 | λ=16 |" in table and "At equal acquisition" in table
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
    results = [{"run": "selfdistill-kl_weight1", "method": "selfdistill", "sweep_field": "kl_weight", "sweep_value": 1.0,
                "final": scores, "forgetting": 0.0, "excess_forgetting": 0.0, "curve": [{"epoch": 0, **scores}, {"epoch": 1, **scores}]}]
    sftguard.write_sweep_report(tmp_path, results, scores, cfg)
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


# --- the L2 control at equal acquisition: hand-made sweep rows -----------------------------------------------------
def sweep_row(run, method, field, value, new_curve, held_curve, l2_weight=None):
    curve = [{"epoch": e, "known_acc": 1.0, "unknown_acc": u, "held_acc": h} for e, (u, h) in enumerate(zip(new_curve, held_curve))]
    return {"run": run, "method": method, "sweep_field": field, "sweep_value": value, "l2_weight": l2_weight, "curve": curve,
            "final": {k: v for k, v in curve[-1].items() if k != "epoch"}, "forgetting": (held_curve[0] - held_curve[-1]) / held_curve[0],
            "excess_forgetting": 0.0}


def test_the_frontier_is_interpolated_between_the_runs_that_bracket_the_target():
    # (new-fact accuracy, forgetting): 90% lies a quarter of the way from 0.8 to 1.0
    points = [(1.0, 0.20), (0.2, 0.02), (0.8, 0.12)]
    assert sftguard.frontier_forgetting_at(points, 0.85) == pytest.approx(0.14)
    assert sftguard.frontier_forgetting_at(points, 0.8) == pytest.approx(0.12)
    assert sftguard.frontier_forgetting_at(points, 0.1) is None and sftguard.frontier_forgetting_at([(0.5, 0.1)], 0.9) is None


def test_equal_acquisition_table_reads_each_method_at_ninety_percent():
    rows = [sweep_row("selfdistill-kl_weight1", "selfdistill", "kl_weight", 1.0, [0.0, 0.5, 1.0], [0.8, 0.76, 0.76]),
            sweep_row("selfdistill-kl_weight4", "selfdistill", "kl_weight", 4.0, [0.0, 0.4, 0.8], [0.8, 0.78, 0.78]),
            sweep_row("l2-l2_weight0.1", "l2", "l2_weight", 0.1, [0.0, 0.95, 1.0], [0.8, 0.64, 0.6], l2_weight=0.1),
            sweep_row("l2-l2_weight1", "l2", "l2_weight", 1.0, [0.0, 0.3, 0.5], [0.8, 0.72, 0.72], l2_weight=1.0),
            sweep_row("l2-l2_weight0.03", "l2", "l2_weight", 0.03, [0.0, 1.0, 1.0], [0.8, 0.56, 0.56], l2_weight=0.03),
            sweep_row("known_only", "known_only", None, None, [0.0, 0.0], [0.8, 0.8]),
            sweep_row("l2-matched", "l2", None, None, [0.0, 0.1, 0.2], [0.8, 0.76, 0.76], l2_weight=0.9)]
    text = sftguard.equal_acquisition_table(rows)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines() if line.startswith("| ")}
    # self-distillation: the frontier between 80% (2.5% forgetting) and 100% (5%) at 90%: 3.75; its lambda=1 curve
    # reaches 90% four fifths of the way from epoch 1 (50%) to epoch 2 (100%), where held-out accuracy is 0.76: 5%
    assert lines["selfdistill, λ swept"] == ["2", "100.0, 80.0", "3.8", "5.0 (selfdistill-kl_weight1, epoch 2)"]
    # L2: between 50% (10%) and 100% (25%) at 90%: 22%; its alpha=0.1 curve passes 90% 0.9/0.95 of the way to epoch 1,
    # where held-out accuracy is 0.8 - 0.16 * 0.9 / 0.95 = 0.648: 18.9% (first reached in epoch 1); alpha=0.03 reaches
    # 90% too, with more forgetting (27%): the table shows the sweep's lowest
    # (the matched L2 run is a point of the alpha frontier too, at 20% new facts: it does not bracket 90%)
    assert lines["l2, α swept"] == ["4", "100.0, 50.0, 100.0, 20.0", "22.0", "18.9 (l2-l2_weight0.1, epoch 1)"]
    assert lines["l2-matched (α=0.9)"] == ["1", "20.0", "–", "never reached"]
    # without the alpha = 1 run, the matched run's 20% and alpha = 0.1's 100% bracket 90%: 25 - (25 - 5) / 8 = 22.5
    without = sftguard.equal_acquisition_table([r for r in rows if r["run"] != "l2-l2_weight1"])
    assert "| l2, α swept | 3 | 100.0, 100.0, 20.0 | 22.5 |" in without
    assert "known_only" not in lines


def test_an_l2_sweep_adds_the_probe_and_the_matched_weights():
    runs = sftguard.sweep_runs(sftguard.parse_config(["--sweep", "kl_weight=0.5,2;l2_weight=0.1"]))
    assert [(r.folder, r.method, r.field, r.value) for r in runs] == [
        ("selfdistill-kl_weight0.5", "selfdistill", "kl_weight", 0.5), ("selfdistill-kl_weight2", "selfdistill", "kl_weight", 2.0),
        ("l2-l2_weight0.1", "l2", "l2_weight", 0.1), ("known_only", "known_only", None, None), ("sft", "sft", None, None),
        ("selfdistill", "selfdistill", None, None), ("l2-matched", "l2", None, None), ("l2-matched-epoch1", "l2", None, None)]
    assert runs[2].cfg.l2_weight == 0.1 and runs[0].cfg.kl_weight == 0.5 and runs[3].cfg.kl_weight == 1.0
    # the probe is the self-distillation run at the configured lambda and tau: a swept one where there is one
    with_default = [r.folder for r in sftguard.sweep_runs(sftguard.parse_config(["--sweep", "kl_weight=1,2;l2_weight=0.1"]))]
    assert with_default == ["selfdistill-kl_weight1", "selfdistill-kl_weight2", "l2-l2_weight0.1", "known_only", "sft",
                            "l2-matched", "l2-matched-epoch1"]
    kl_only = [r.folder for r in sftguard.sweep_runs(sftguard.parse_config(["--sweep", "kl_weight=0,16"]))]
    assert kl_only == ["selfdistill-kl_weight0", "selfdistill-kl_weight16", "known_only", "sft", "l2"]
    with pytest.raises(sftguard.UserError, match="each NAME once"):
        sftguard.parse_config(["--sweep", "kl_weight=1;kl_weight=2"])


def test_matched_weights_over_the_run_and_over_epoch_one():
    # probe every 2 steps of a 4-step epoch: steps 0 and 2 are epoch 1
    probe = {"step": [0, 2, 4, 6], "kl_grad_norm": [4.0, 2.0, 1.0, 1.0], "distance": [0.5, 1.0, 2.0, 2.5]}
    w = sftguard.matched_l2_weights(probe, steps_per_epoch=4)
    assert w["l2_weight"] == pytest.approx(8.0 / (2 * 6.0)) and w["l2_weight_epoch1"] == pytest.approx(6.0 / (2 * 1.5))
    assert (w["steps"], w["steps_epoch1"]) == (4, 2)


@pytest.mark.slow
def test_an_l2_sweep_runs_l2_at_the_weights_its_probe_matched(smoke_dirs, sftguard_cli, tmp_path):
    proc = sftguard_cli(*smoke_args(smoke_dirs, tmp_path, "--sweep", "l2_weight=0.1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "sweep.json").read_text())
    probe = report["l2_probe"]
    assert probe["steps"] > probe["steps_epoch1"] > 0 and probe["l2_weight"] > 0 and probe["l2_weight_epoch1"] > 0
    assert json.loads((tmp_path / "l2-matched" / "config.json").read_text())["l2_weight"] == probe["l2_weight"]
    assert json.loads((tmp_path / "l2-matched-epoch1" / "config.json").read_text())["l2_weight"] == probe["l2_weight_epoch1"]
    assert [p["run"] for p in report["points"]] == ["l2-l2_weight0.1", "known_only", "sft", "selfdistill", "l2-matched", "l2-matched-epoch1"]
    assert "Gradient-matched L2 weight" in (tmp_path / "sweep.md").read_text()
