"""--seeds: the matched-acquisition view and the mean ± sd table over seeds."""
import dataclasses
import math

import pytest

import sftguard as S


def fake_result(method, held_curve, unknown_curve, trainable=None, forgetting=0.1):
    curve = [{"epoch": e, "known_acc": 1.0, "unknown_acc": u, "held_acc": h} for e, (h, u) in enumerate(zip(held_curve, unknown_curve))]
    return {"method": method, "trainable": trainable, "teacher": {"known_acc": 0.9, "unknown_acc": 0.0, "held_acc": held_curve[0]},
            "final": {k: v for k, v in curve[-1].items() if k != "epoch"}, "curve": curve, "forgetting": forgetting,
            "excess_forgetting": forgetting}


def test_matched_acquisition_takes_the_first_epoch_past_the_threshold():
    r = fake_result("sft", [0.8, 0.7, 0.6, 0.5], [0.0, 0.5, 0.92, 0.99])
    m = S.matched_acquisition(r)
    assert m["epoch"] == 2 and m["held_acc"] == 0.6
    assert m["forgetting"] == pytest.approx((0.8 - 0.6) / 0.8)
    assert S.matched_acquisition(fake_result("sft", [0.8, 0.7], [0.0, 0.5])) is None


def test_seeds_table_reports_mean_and_sd():
    cfg = S.Config(method="sft", preset="smoke")
    per_seed = [[fake_result("sft", [0.8, 0.6], [0.0, 0.95], forgetting=0.2)],
                [fake_result("sft", [0.8, 0.7], [0.0, 0.90], forgetting=0.4)]]
    text = S.seeds_markdown(per_seed, cfg, [0, 1])
    row = next(line for line in text.splitlines() if line.startswith("| sft |"))
    assert "30.0 ± 14.1" in row  # forgetting: mean of 20% and 40%, sample sd 14.1
    assert "65.0 ± 7.1" in row  # final held-out accuracy
    matched = [line for line in text.splitlines() if line.startswith("| sft |")][1]
    assert "2/2" in matched


@pytest.mark.parametrize("spec", ["0,x", "1,1", ","])
def test_bad_seeds_are_refused(spec):
    with pytest.raises(S.UserError):
        S.parse_seeds(spec)


def test_forgetting_plot_is_drawn_from_every_seeds_curve(tmp_path):
    per_seed = [[fake_result("known_only", [0.8, 0.8], [0.0, 0.0]), fake_result("sft", [0.8, 0.6], [0.0, 0.95])],
                [fake_result("known_only", [0.8, 0.7], [0.0, 0.0]), fake_result("sft", [0.8, 0.7], [0.0, 0.90])]]
    assert S.plot_forgetting_curves(tmp_path / "forgetting.png", per_seed, [0, 1])
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now raises ImportError
    per_seed = [[fake_result("sft", [0.8, 0.6], [0.0, 0.95])]]
    assert S.plot_forgetting_curves(tmp_path / "forgetting.png", per_seed, [0]) is False
    assert not (tmp_path / "forgetting.png").exists()


def interference_rows(name_accs, uuid_fitted_accs):
    """One seed's interference rows at one count (100): held-out accuracy falls 0.1 an epoch under name keys and 0.05
    under the fitted UUID run, from a teacher at 0.8."""
    def row(key, method, accs, slope, fit=None):
        curve = [{"epoch": e, "new_acc": a, "held_acc": 0.8 - slope * e} for e, a in enumerate(accs)]
        return {"key": key, "count": 100, "method": method, "fit_target": fit, "new_acc": accs[-1], "teacher_held_acc": 0.8,
                "forgetting": S.relative_drop(0.8, curve[-1]["held_acc"]), "drift": 0.01, "curve": curve}
    return [row("name", "sft", name_accs, 0.1), row("uuid", "sft", [0.0, 0.2], 0.05), row("name", "selfdistill", [0.0, 0.9], 0.02),
            row("uuid", "selfdistill", [0.0, 0.2], 0.02), row("name", "l2", [0.0, 0.1], 0.05),
            row("uuid", "sft", uuid_fitted_accs, 0.05, fit=0.9)]


def test_interference_checks_over_seeds_read_each_seeds_own_curve():
    # the seeds' runs reach 90% of the new facts at different epochs (fitted runs stop there): seed A's name keys at
    # epoch 2 (held 0.6: forgetting 0.25) and its UUID run at epoch 3 (0.65: 0.1875); seed B's both at 0.7 (0.125)
    a = S.InterferenceNumbers.of(interference_rows([0.0, 0.5, 0.9], [0.0, 0.3, 0.6, 0.9]), [100])
    b = S.InterferenceNumbers.of(interference_rows([0.0, 0.9], [0.0, 0.45, 0.9]), [100])
    assert a.matched == {"name": [pytest.approx(0.25)], "uuid": [pytest.approx(0.1875)]} and a.levels == [0.9]
    m = S.InterferenceNumbers.mean([a, b])
    assert m.matched["name"] == [pytest.approx(0.1875)] and m.matched["uuid"] == [pytest.approx(0.15625)]
    assert m.sft["name"] == [pytest.approx((0.25 + 0.125) / 2)] and m.drift["name sft"] == pytest.approx(0.01)
    assert m.level == pytest.approx(0.1) and m.sd_at == pytest.approx(0.02 / 9 / 0.8) and m.l2_at == pytest.approx(0.0625)
    checks = dict((claim, ok) for claim, ok, _ in S.interference_checks(m))
    assert checks["the same at equal new-fact accuracy"] is True  # the last claim of that name: L2 0.0625 >= 2 x 0.0028


def test_l2_that_learned_nothing_new_is_not_comparable_at_equal_acquisition():
    # L2 ends where the teacher started on the new facts (0.05): there, before any training, both forgettings are
    # undefined (nan, not "0 >= 2 x 0"), and the check must say so rather than count it as the paper's finding
    rows = interference_rows([0.0, 0.5, 0.9], [0.0, 0.3, 0.6, 0.9])
    l2 = next(r for r in rows if r["method"] == "l2")
    l2["curve"] = [{**p, "new_acc": 0.05} for p in l2["curve"]]
    l2["new_acc"] = 0.05
    next(r for r in rows if r["method"] == "selfdistill" and r["key"] == "name")["curve"][0]["new_acc"] = 0.05  # the same teacher
    x = S.InterferenceNumbers.of(rows, [100])
    assert math.isnan(x.l2_at) and math.isnan(x.sd_at) and x.teacher_new == 0.05 and x.level == 0.05
    claim, ok, numbers = S.interference_checks(x)[-1]
    assert claim == "the same at equal new-fact accuracy" and ok is False and "not comparable" in numbers


def test_trends_over_the_counts_are_not_ticked_from_one_count():
    # one count: "flat within 5 points" (range 0) and "grows with the count" (nothing to compare) would hold trivially
    trends = ("UUID-key forgetting flat within 5 points over the counts", "name-key forgetting grows with the count")
    one = S.InterferenceNumbers.of(interference_rows([0.0, 0.5, 0.9], [0.0, 0.3, 0.6, 0.9]), [100])
    checks = {claim: (ok, numbers) for claim, ok, numbers in S.interference_checks(one)}
    assert all(checks[c][0] is False and "not measured: one count" in checks[c][1] for c in trends)
    # two counts: the trends are read, and hold or fail on the numbers
    holds = lambda x: [dict((claim, ok) for claim, ok, _ in S.interference_checks(x))[c] for c in trends]  # noqa: E731
    assert holds(dataclasses.replace(one, sft={"name": [0.05, 0.2], "uuid": [0.01, 0.03]})) == [True, True]
    assert holds(dataclasses.replace(one, sft={"name": [0.2, 0.05], "uuid": [0.01, 0.1]})) == [False, False]


def test_seeds_combine_with_experiments_but_not_with_sweeps():
    assert S.parse_config(["--experiment", "interference", "--seeds", "0,1"]).seeds == "0,1"  # checked and accepted
    with pytest.raises(S.UserError, match="--sweep"):
        S.parse_config(["--sweep", "kl_weight=0,1", "--seeds", "0,1"])
