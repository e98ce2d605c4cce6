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
    pytest.importorskip("matplotlib")
    per_seed = [[fake_result("known_only", [0.8, 0.8], [0.0, 0.0]), fake_result("sft", [0.8, 0.6], [0.0, 0.95])],
                [fake_result("known_only", [0.8, 0.7], [0.0, 0.0]), fake_result("sft", [0.8, 0.7], [0.0, 0.90])]]
    assert S.plot_forgetting_curves(tmp_path / "forgetting.png", per_seed, [0, 1])
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now raises ImportError
    per_seed = [[fake_result("sft", [0.8, 0.6], [0.0, 0.95])]]
    assert S.plot_forgetting_curves(tmp_path / "forgetting.png", per_seed, [0]) is False
    assert not (tmp_path / "forgetting.png").exists()
