"""The paper's central finding, end to end on the `ci` preset: after stage 2 from one shared teacher, plain SFT
forgets held-out known facts clearly more than self-distillation (lambda=1, tau=0.5), at comparable new-fact
accuracy, while fine-tuning on known facts alone forgets little.

Three runs of `python sftguard.py --preset ci --method M` (M = known_only, sft, selfdistill) share one world and
one cache (the world built first with data_prep): the first pretrains the base model and computes the SliCK categories; the other
two reuse them, and stage 1 is seeded, so all three start stage 2 from the same teacher. 3-4 minutes on a
2-core CPU. The run is deterministic on CPU; the margins below were chosen to hold with room to spare for
seeds 0, 1 and 2 (measured, in % forgetting, known_only / sft / selfdistill: 3.0 / 14.9 / 5.2, 3.6 / 20.0 / 7.9,
4.4 / 20.6 / 5.1; new-fact accuracy sft 92.0 / 91.2 / 90.2, selfdistill 81.5 / 82.0 / 84.2)."""
import json

import pytest

import data_prep

pytestmark = pytest.mark.slow  # the ci preset: about 3 minutes

METHODS = ("known_only", "sft", "selfdistill")
SEED = 0


@pytest.fixture(scope="session")
def ci_runs(tmp_path_factory, sftguard_cli):
    root = tmp_path_factory.mktemp("ci")
    data_prep.build_world(data_prep.WorldConfig(**{**data_prep.WORLD_PRESETS["ci"], "preset": "ci", "out": str(root / "data")}))
    results = {}
    for method in METHODS:  # the first run pays for the base model and SliCK; the others reuse them
        out = root / method
        proc = sftguard_cli("--preset", "ci", "--method", method, "--seed", SEED, "--device", "cpu", "--out", out,
                            "--data", root / "data", "--cache_dir", root / "cache", timeout=1200)
        assert proc.returncode == 0, f"{method}: {proc.stderr[-3000:]}"
        results[method] = json.loads((out / "results.json").read_text())
    return results


def pct(x):
    return f"{100 * x:.1f}%"


def test_runs_share_one_teacher_that_knows_the_held_out_facts(ci_runs):
    teachers = [ci_runs[m]["teacher"] for m in METHODS]
    assert all(t == teachers[0] for t in teachers), teachers
    assert ci_runs["sft"]["splits"] == {"known": 200, "unknown": 400, "held": 150, "val": 40}
    # Forgetting is only measurable if the teacher answers the held-out probe; measured 89-93% over seeds 0-2.
    assert teachers[0]["held_acc"] >= 0.8, teachers[0]


def test_known_only_control_forgets_little(ci_runs):
    assert ci_runs["known_only"]["forgetting"] <= 0.08, pct(ci_runs["known_only"]["forgetting"])  # measured <= 4.4%


def test_both_methods_learn_the_new_facts(ci_runs):
    sft, sd = ci_runs["sft"]["final"]["unknown_acc"], ci_runs["selfdistill"]["final"]["unknown_acc"]
    assert sft >= 0.8, f"sft new-fact accuracy {pct(sft)}"  # measured >= 90.2%
    assert sd >= 0.8 * sft, f"selfdistill new-fact accuracy {pct(sd)} vs sft {pct(sft)}"  # measured >= 0.88x


def test_sft_forgets_clearly_more_than_self_distillation(ci_runs):
    sft, sd = ci_runs["sft"]["forgetting"], ci_runs["selfdistill"]["forgetting"]
    msg = f"forgetting: sft {pct(sft)}, selfdistill {pct(sd)}"
    assert sft >= 0.10, msg  # measured >= 14.9%
    assert sft >= sd + 0.05, msg  # measured gap >= 9.7 points
    assert sft >= 2 * sd, msg  # measured ratio >= 2.5


def test_sft_forgets_more_at_matched_new_fact_accuracy(ci_runs):
    """Not just because self-distillation learns fewer new facts: compare SFT at the first epoch where it has
    learned as many new facts as self-distillation has at the end."""
    sd = ci_runs["selfdistill"]
    target = sd["final"]["unknown_acc"]
    point = next(p for p in ci_runs["sft"]["curve"] if p["epoch"] > 0 and p["unknown_acc"] >= target)
    teacher_held = ci_runs["sft"]["teacher"]["held_acc"]
    sft_forgetting = (teacher_held - point["held_acc"]) / teacher_held
    # measured gap >= 8.2 points (sft at epoch 8 in seeds 0-2)
    assert sft_forgetting >= sd["forgetting"] + 0.05, (
        f"sft at epoch {point['epoch']} (new {pct(point['unknown_acc'])}) forgets {pct(sft_forgetting)}; "
        f"selfdistill (new {pct(target)}) {pct(sd['forgetting'])}")
