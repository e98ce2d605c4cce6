"""--seeds: the matched-acquisition view and the mean ± sd table over seeds."""
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


def test_mean_row_averages_numbers_and_curves_over_seeds():
    rows = [{"key": "name", "count": 10, "method": "sft", "forgetting": 0.2, "drift": 0.1, "fit_target": None,
             "curve": [{"epoch": 0, "held_acc": 0.8}, {"epoch": 1, "held_acc": 0.6}]},
            {"key": "name", "count": 10, "method": "sft", "forgetting": 0.4, "drift": 0.3, "fit_target": None,
             "curve": [{"epoch": 0, "held_acc": 0.6}, {"epoch": 1, "held_acc": 0.4}]}]
    m = S.mean_row(rows)
    assert m["forgetting"] == pytest.approx(0.3) and m["drift"] == pytest.approx(0.2)
    assert m["key"] == "name" and m["count"] == 10 and m["fit_target"] is None
    assert [p["held_acc"] for p in m["curve"]] == pytest.approx([0.7, 0.5])
    rows[1]["curve"] = rows[1]["curve"][:1]  # a fitted condition that stopped earlier: keep the first seed's curve
    assert S.mean_row(rows)["curve"] == rows[0]["curve"]


def test_seeds_combine_with_experiments_but_not_with_sweeps():
    assert S.parse_config(["--experiment", "interference", "--seeds", "0,1"]).seeds == "0,1"  # checked and accepted
    with pytest.raises(S.UserError, match="--sweep"):
        S.parse_config(["--sweep", "kl_weight=0,1", "--seeds", "0,1"])
