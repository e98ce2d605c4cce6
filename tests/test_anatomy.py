"""Where forgetting comes from: the shock, residue and drift read off hand-made held-out curves with known answers."""
import math

import pytest

import sftguard as S


def curve(held, key="held_acc", **other):
    """A curve with these held-out accuracies at epochs 0 (the teacher), 1, 2, ..."""
    return [{"epoch": e, key: h, **{k: v[e] for k, v in other.items()}} for e, h in enumerate(held)]


def test_shock_residue_and_drift_of_a_curve_with_known_answers():
    # teacher 0.90; epoch 1 drops to 0.70 (shock 20 points); the best of epochs 2-4 is 0.85 (residue 5);
    # the end, epoch 6, is 0.70 (total 20): drift 15 points after the settled level
    a = S.forgetting_anatomy(curve([0.90, 0.70, 0.80, 0.85, 0.82, 0.75, 0.70]))
    assert (a.shock, a.residue, a.drift, a.total) == pytest.approx((0.20, 0.05, 0.15, 0.20))
    assert a.residue + a.drift == pytest.approx(a.total)


def test_the_residue_is_read_in_epochs_2_to_4_only():
    # epoch 5 recovers fully, but that is after the settle window: it is not the residue
    a = S.forgetting_anatomy(curve([0.90, 0.70, 0.80, 0.78, 0.80, 0.90, 0.60]))
    assert a.residue == pytest.approx(0.10) and a.drift == pytest.approx(0.20)
    # epoch 1 is the shock, never the settled level, even when it is the best epoch
    a = S.forgetting_anatomy(curve([0.90, 0.88, 0.80, 0.80, 0.80, 0.80]))
    assert a.shock == pytest.approx(0.02) and a.residue == pytest.approx(0.10) and a.drift == pytest.approx(0.0)


def test_short_curves_clip_the_window():
    a = S.forgetting_anatomy(curve([0.90, 0.70, 0.80]))  # two epochs: the window is epoch 2 alone
    assert (a.shock, a.residue, a.drift, a.total) == pytest.approx((0.20, 0.10, 0.0, 0.10))
    a = S.forgetting_anatomy(curve([0.90, 0.70]))  # one epoch: it settles where it is
    assert (a.shock, a.residue, a.drift, a.total) == pytest.approx((0.20, 0.20, 0.0, 0.20))


def test_a_method_that_gains_has_negative_parts():
    a = S.forgetting_anatomy(curve([0.90, 0.92, 0.93, 0.91, 0.90, 0.95]))
    assert (a.shock, a.residue, a.drift, a.total) == pytest.approx((-0.02, -0.03, -0.02, -0.05))


def test_undefined_curves_give_none():
    assert S.forgetting_anatomy(curve([0.9])) is None  # no stage-2 epoch
    assert S.forgetting_anatomy(curve([0.9, math.nan, 0.8])) is None  # e.g. no held-out fact of that relation
    assert S.forgetting_anatomy(curve([0.9, 0.8]), key="held_same_relation_acc") is None


def fake_result(method, held, trainable=None):
    return {"method": method, "trainable": trainable, "curve": curve(held)}


def test_the_main_table_shows_points_per_method_and_mean_sd_over_seeds():
    one = S.anatomy_report([fake_result("sft", [0.90, 0.70, 0.85, 0.80, 0.80, 0.70]), fake_result("freeze", [0.9, 0.8, 0.9], "mlp")])
    sft = next(line for line in one.splitlines() if line.startswith("| sft |"))
    assert [c.strip() for c in sft.split("|")[2:-1]] == ["20.0", "5.0", "15.0", "20.0", "25.0"]
    assert any(line.startswith("| freeze-mlp |") for line in one.splitlines())
    seeds = S.anatomy_report([[fake_result("sft", [0.90, 0.70, 0.85, 0.80]), fake_result("sft", [0.90, 0.80, 0.85, 0.70])]])
    row = next(line for line in seeds.splitlines() if line.startswith("| sft |"))
    # shock 20 and 10 points: mean 15, sample sd 7.1; residue 5 in both; drift 5 and 15; total 10 and 20
    assert [c.strip() for c in row.split("|")[2:6]] == ["15.0 ± 7.1", "5.0 ± 0.0", "10.0 ± 7.1", "15.0 ± 7.1"]
    assert row.split("|")[6].strip() == "33.3"  # of the means: 5 / 15


def test_interference_rows_split_by_relation(tmp_path):
    def row(method, count, same, other, key="name"):
        held = [(s + o) / 2 for s, o in zip(same, other)]
        return {"method": method, "key": key, "count": count, "fit_target": None,
                "curve": curve(held, held_same_relation_acc=same, held_other_relations_acc=other)}
    rows = [row("sft", 10, [0.9, 0.5, 0.5], [0.9, 0.9, 0.9]), row("sft", 100, [0.9, 0.4, 0.6, 0.5], [0.9, 0.88, 0.88, 0.8]),
            row("known_only", 0, [0.9, 0.9, 0.9], [0.9, 0.9, 0.9], key=None)]
    table = S.interference_anatomy_rows([rows], "country")
    labels = [label for label, _ in table]
    assert labels[:3] == ["SFT, name keys | 100 | all", "SFT, name keys | 100 | same relation (country)",
                          "SFT, name keys | 100 | other relations"]  # the largest count only, and the control
    assert labels[3].startswith("known_only") and len(labels) == 6
    same, other = table[1][1][0], table[2][1][0]
    assert (same.shock, same.residue, same.drift) == pytest.approx((0.5, 0.3, 0.1))
    assert (other.shock, other.residue, other.drift) == pytest.approx((0.02, 0.02, 0.08))
    text = S.anatomy_markdown("condition | new facts | held-out facts", table)
    assert "| SFT, name keys | 100 | same relation (country) | 50.0 | 30.0 | 10.0 | 40.0 | 75.0 |" in text


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    text = S.anatomy_report([fake_result("sft", [0.9, 0.7, 0.8, 0.8])], tmp_path, "t")
    assert "anatomy.png" in text and (tmp_path / "anatomy.png").read_bytes()[:4] == b"\x89PNG"


def test_the_share_of_a_tiny_total_is_not_shown():
    row = S.anatomy_cells([S.ForgettingAnatomy(shock=0.01, residue=0.005, drift=0.005, total=0.01)])
    assert row == ["1.0", "0.5", "0.5", "1.0", "–"]
