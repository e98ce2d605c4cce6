"""The shipped default base model and its SliCK categories (shipped/): used only when made by this code from this world."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import sftguard as S


def default_world(tmp_path):
    S.build_preset_world("default", tmp_path / "world")  # a fraction of a second
    return S.load_facts(tmp_path / "world")


def test_the_shipped_files_are_what_the_current_code_would_make(tmp_path):
    """Fails after a change to the world, the default pretraining config or the code that pretrains and categorises
    (shipped_key): regenerate the files, then commit shipped/."""
    facts, world = default_world(tmp_path)
    cfg = S.parse_config(["--device", "cpu", "--cache_dir", str(tmp_path / "cache")])
    shipped = json.loads((S.SHIPPED_DIR / "key.json").read_text())
    if shipped["key"] != S.shipped_key(cfg, world):
        pytest.fail(f"shipped/ was made by other code or from another world (key {shipped['key']}, the code's "
                    f"{S.shipped_key(cfg, world)}); regenerate it with `{S.SHIP_COMMAND}` (minutes) and commit shipped/")
    base = S.SHIPPED_DIR / f"base-{S.base_model_key(cfg, world)}"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base)  # float32 on the CPU, as a fresh clone's first run
    categories = S.SHIPPED_DIR / S.categories_cache_name(model, S.category_pool(facts, cfg), cfg, base)
    assert categories.is_file(), "the shipped SliCK categories are not those of this model, facts and settings"
    assert set(json.loads(categories.read_text())) == {f["id"] for f in S.category_pool(facts, cfg)}


def test_the_key_follows_the_code_the_world_and_the_config(monkeypatch, tmp_path):
    _, world = default_world(tmp_path)
    cfg = S.parse_config([])
    key = S.shipped_key(cfg, world)
    assert S.shipped_key(S.parse_config(["--pretrain_epochs", "59"]), world) != key
    assert S.shipped_key(cfg, {**world, "fingerprint": "other"}) != key
    monkeypatch.setattr(S, "get_lr", lambda step, lr, warmup, total: lr)  # a changed learning-rate schedule
    assert S.shipped_key(cfg, world) != key


def ship_by_hand(smoke_base, shipped: Path, key: str):
    """A shipped/ folder holding the session's smoke base model (and no categories), under this key."""
    shutil.copytree(smoke_base.path, shipped / smoke_base.path.name)
    (shipped / "slick-0123456789abcdef.json").write_text("{}")
    (shipped / "key.json").write_text(json.dumps({"key": key}))


def test_a_matching_key_restores_the_shipped_files_and_another_does_not(smoke_base, tmp_path):
    cfg = S.replace(smoke_base.cfg, cache_dir=str(tmp_path / "cache"))
    cache = Path(cfg.cache_dir) / smoke_base.path.name
    ship_by_hand(smoke_base, tmp_path / "stale", "0" * 16)
    assert not S.restore_shipped_base_model(cfg, smoke_base.world, cache, tmp_path / "stale") and not cache.exists()
    ship_by_hand(smoke_base, tmp_path / "shipped", S.shipped_key(cfg, smoke_base.world))
    assert S.restore_shipped_base_model(cfg, smoke_base.world, cache, tmp_path / "shipped")
    assert S.model_fingerprint(cache, tmp_path) == S.model_fingerprint(smoke_base.path, tmp_path)  # byte for byte
    assert (Path(cfg.cache_dir) / "slick-0123456789abcdef.json").read_text() == "{}"


@pytest.mark.slow
def test_ship_base_model_makes_files_a_fresh_cache_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = S.ship_base_model("smoke", tmp_path / "shipped")  # pretrains the smoke model and categorises (~30 s)
    key = json.loads((shipped / "key.json").read_text())
    assert key["regenerate"] == S.SHIP_COMMAND and len(list(shipped.glob("slick-*.json"))) == 1
    cfg = S.parse_config(["--preset", "smoke", "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--data", str(tmp_path / "w")])
    S.build_preset_world("smoke", tmp_path / "w")
    facts, world = S.load_facts(tmp_path / "w")
    assert key["key"] == S.shipped_key(cfg, world)
    monkeypatch.setattr(S, "SHIPPED_DIR", shipped)  # (patching train() itself would change the key: it is shipped code)
    capsys.readouterr()
    model, tokenizer, path = S.load_base_model(cfg, tmp_path / "w", world, torch.device("cpu"))
    printed = capsys.readouterr().out
    assert "using the base model and SliCK categories shipped" in printed and "pretraining" not in printed
    # cached_categories will read this file instead of asking the model
    assert (tmp_path / "cache" / S.categories_cache_name(model, S.category_pool(facts, cfg), cfg, path)).is_file()


def test_fine_tuning_flags_do_not_reach_pretraining(smoke_dirs, tmp_path, monkeypatch):
    # The base model is cached by its pretraining config; a stage-2 flag that changed pretraining would make a cached
    # model and a fresh one differ under the same key.
    seen = []

    def stop_at_train(model, batches, loss_fn, *, cfg, **kw):
        seen.append((cfg.warmup_frac, cfg.grad_clip))
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "train", stop_at_train)
    facts, world = S.load_facts(smoke_dirs["data"])
    for flags in ([], ["--warmup_frac", "0.3", "--grad_clip", "0.2"]):
        cfg = S.parse_config(["--preset", "smoke", "--data", str(smoke_dirs["data"]), "--cache_dir", str(tmp_path), *flags])
        assert S.base_model_key(cfg, world) == S.base_model_key(S.parse_config(["--preset", "smoke"]), world)
        with pytest.raises(KeyboardInterrupt):
            S.pretrain_base_model(cfg, smoke_dirs["data"], world)
    assert seen == [(S.PRETRAIN_WARMUP_FRAC, S.PRETRAIN_GRAD_CLIP)] * 2 == [(0.05, 1.0)] * 2
