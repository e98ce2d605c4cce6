"""End to end: `python sftguard.py --preset smoke --method all`, as a user runs it, writes a complete
results.json per method, results.md, summary.md and config.json; a second run never overwrites them."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import sftguard as S

RUNS = {"known_only": None, "sft": None, "selfdistill": None, "freeze-attn": "attn", "freeze-mlp": "mlp", "l2": None}
ACCURACIES = {"known_acc", "unknown_acc", "held_acc"}


def strict_json(path):
    """json.loads that refuses NaN/Infinity, which other JSON readers cannot parse."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def smoke_all(smoke_dirs, sftguard_cli, tmp_path_factory):
    """`python data_prep.py --preset smoke --out DATA`, then one `--method all` smoke run on it (an explicit --data
    that does not exist is an error: tests/test_protocol.py); the base model comes from the session's cache."""
    root = tmp_path_factory.mktemp("e2e")
    out, data = root / "run", root / "data"
    built = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "data_prep.py"), "--preset", "smoke", "--out", str(data)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    args = ["--preset", "smoke", "--method", "all", "--seed", "0", "--device", "cpu",
            "--out", out, "--cache_dir", smoke_dirs["cache"], "--data", data]
    result = sftguard_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return out, data, args, result


def test_writes_every_folder(smoke_all):
    out, data, _, _ = smoke_all
    assert (data / "facts.jsonl").is_file() and (data / "world.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(RUNS)
    assert (out / "summary.md").is_file()
    for name in RUNS:
        assert {"results.json", "results.md", "config.json"} <= {p.name for p in (out / name).iterdir()}, name


@pytest.mark.parametrize("name", list(RUNS))
def test_results_json_is_complete(smoke_all, name):
    out = smoke_all[0]
    r = strict_json(out / name / "results.json")
    cfg = S.parse_config(["--preset", "smoke"])
    assert r["method"] == name.split("-")[0] and r["trainable"] == RUNS[name] and r["seed"] == 0
    assert {k: r["splits"][k] for k in ("known", "unknown", "held")} == {"known": cfg.n_known, "unknown": cfg.n_unknown, "held": cfg.n_held}
    assert set(r["categories"]) == set(S.CATEGORIES) and all(isinstance(n, int) and n >= 0 for n in r["categories"].values())
    assert sum(r["categories"].values()) >= sum(r["splits"].values())  # every split fact was categorised
    for part in ("teacher", "final"):
        assert ACCURACIES <= set(r[part]) and all(0.0 <= r[part][k] <= 1.0 for k in ACCURACIES), part
    # one curve entry per evaluation: the teacher (epoch 0), then every epoch of stage 2
    assert [c["epoch"] for c in r["curve"]] == list(range(cfg.epochs + 1))
    assert all(ACCURACIES <= set(c) for c in r["curve"])
    assert {k: r["curve"][0][k] for k in ACCURACIES} == {k: r["teacher"][k] for k in ACCURACIES}
    assert {k: r["curve"][-1][k] for k in ACCURACIES} == {k: r["final"][k] for k in ACCURACIES}
    held_teacher, held_final = r["teacher"]["held_acc"], r["final"]["held_acc"]
    assert held_teacher > 0  # the smoke world's teacher knows some held-out facts, else forgetting is undefined
    assert r["forgetting"] == pytest.approx((held_teacher - held_final) / held_teacher)
    assert r["train_tokens_per_s"] > 0 and r["wall_s"] > 0 and math.isfinite(r["wall_s"])


def test_every_method_shares_the_teacher_and_the_split(smoke_all):
    out = smoke_all[0]
    results = {name: strict_json(out / name / "results.json") for name in RUNS}
    first = results["sft"]
    for name, r in results.items():
        assert r["teacher"] == first["teacher"] and r["splits"] == first["splits"] and r["categories"] == first["categories"], name
    control = results["known_only"]["forgetting"]
    for r in results.values():
        assert r["excess_forgetting"] == pytest.approx(r["forgetting"] - control)
    # freeze trains a part of the model, the others all of it
    assert results["freeze-attn"]["trainable_params"] < results["sft"]["trainable_params"]
    assert results["freeze-mlp"]["trainable_params"] < results["sft"]["trainable_params"]
    assert results["freeze-attn"]["trainable_params"] != results["freeze-mlp"]["trainable_params"]


@pytest.mark.parametrize("name", list(RUNS))
def test_config_json_is_the_config_of_that_folder(smoke_all, name):
    out = smoke_all[0]
    config = strict_json(out / name / "config.json")
    assert config["method"] == name.split("-")[0] and config["preset"] == "smoke" and config["seed"] == 0
    if RUNS[name]:
        assert config["trainable"] == RUNS[name]


def test_markdown_tables(smoke_all):
    out = smoke_all[0]
    summary = (out / "summary.md").read_text()
    assert "| method | trainable | D_known (task) | D_unknown (new) | D_held (held-out) |" in summary
    table1 = summary.split("\n\n| method | trainable |")[1].split("\n\n")[0]  # Table 1, then where the forgetting came from
    rows = [line for line in table1.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() + "-" + row.split("|")[2].strip() for row in rows] == [
        "known_only-all", "sft-all", "selfdistill-all", "freeze-attn", "freeze-mlp", "l2-all"]
    sft = strict_json(out / "sft" / "results.json")
    assert f"| {100 * sft['final']['held_acc']:.1f} |" in rows[1]  # the table shows this run's numbers, in %
    assert "| method | shock (epoch 1) |" in summary and (out / "anatomy.png").is_file() == (S.pyplot() is not None)
    shock = S.forgetting_anatomy(sft["curve"]).shock
    assert f"| sft | {100 * shock:.1f} |" in summary
    for name in RUNS:
        table = (out / name / "results.md").read_text()
        assert "| method | trainable |" in table and f"| {name.split('-')[0]} |" in table, name
        assert "| method | shock (epoch 1) |" in table, name


def test_second_run_without_overwrite_refuses_and_keeps_results(smoke_all, sftguard_cli):
    out, _, args, _ = smoke_all
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    again = sftguard_cli(*args)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == before[p] for p in files)


def test_a_default_folder_that_holds_a_run_gets_a_fresh_sibling(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert S.parse_config(["--preset", "smoke", "--method", "sft"]).out == ""  # a free default stays the default
    (tmp_path / "runs/smoke/sft-seed0").mkdir(parents=True)
    (tmp_path / "runs/smoke/sft-seed0/results.json").write_text("{}")
    assert S.parse_config(["--preset", "smoke", "--method", "sft"]).out == "runs/smoke/sft-seed0-2"
    assert "writes to runs/smoke/sft-seed0-2" in capsys.readouterr().out  # said at the start
    (tmp_path / "runs/smoke/sft-seed0-2").mkdir()
    assert S.parse_config(["--preset", "smoke", "--method", "sft"]).out == "runs/smoke/sft-seed0-3"
    assert S.parse_config(["--preset", "smoke", "--method", "sft", "--resume"]).out == ""  # resumes the run there
    explicit = S.parse_config(["--preset", "smoke", "--method", "sft", "--out", "runs/smoke/sft-seed0"])
    assert explicit.out == "runs/smoke/sft-seed0"  # never replaced: check_output refuses it unless --overwrite
