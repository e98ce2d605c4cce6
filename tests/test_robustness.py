"""Trustworthy runs (issue 6): every user mistake is one line and exit status 2, a killed run resumes to the
same numbers, the same seed gives the same results, a NaN loss stops the run before it writes anything."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sftguard as sg  # noqa: E402

TIMING = {"train_tokens_per_s", "stage2_s", "wall_s"}  # the only fields allowed to differ between equal runs
RUN = ["--method", "selfdistill", "--epochs", "4"]  # the run that is repeated, killed and resumed


@pytest.fixture(scope="session")
def shared(smoke_dirs, smoke_base, tmp_path_factory):
    """The session's smoke world and cache (conftest.py), so the smoke base model is pretrained once."""
    return {"root": tmp_path_factory.mktemp("robust"), "data": smoke_dirs["data"], "cache": smoke_dirs["cache"]}


def smoke(shared, out, *extra) -> list[str]:
    return ["--preset", "smoke", "--data", str(shared["data"]), "--cache_dir", str(shared["cache"]), "--out", str(out), *extra]


@pytest.fixture(scope="session")
def reference(shared):
    """An uninterrupted run, in this process: what every repeated or resumed run must reproduce."""
    out = shared["root"] / "reference"
    sg.cli(smoke(shared, out, *RUN))
    return json.loads((out / "results.json").read_text())


def metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


def run_subprocess(args, **env):
    """sftguard.py in a fresh process with this process's thread count (CPU sums depend on how work is split)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **env}
    return subprocess.Popen([sys.executable, str(REPO / "sftguard.py"), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# ----------------------------------------------------------------------------------------------- bad input
def copy_data(shared, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(shared["data"], data)
    return data


def edit_facts(edit):
    """A setup that rewrites facts.jsonl of a copy of the smoke world: edit(list of lines) -> list of lines."""
    def setup(shared, tmp_path):
        data = copy_data(shared, tmp_path)
        lines = (data / "facts.jsonl").read_text().splitlines()
        (data / "facts.jsonl").write_text("\n".join(edit(lines)) + "\n")
        return ["--data", str(data)]
    return setup


def edit_fact(line_index: int, change):
    def edit(lines):
        fact = json.loads(lines[line_index])
        change(fact)
        return lines[:line_index] + [json.dumps(fact)] + lines[line_index + 1:]
    return edit_facts(edit)


def drop_relation(lines):
    first = json.loads(lines[0])["relation"]
    return [line for line in lines if json.loads(line)["relation"] != first]


def data_without(name):
    def setup(shared, tmp_path):
        data = copy_data(shared, tmp_path)
        (data / name).unlink()
        return ["--data", str(data)]
    return setup


def bad_world_json(shared, tmp_path):
    data = copy_data(shared, tmp_path)
    (data / "world.json").write_text('{"source": "synthetic", ')
    return ["--data", str(data)]


def bert_folder(shared, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               vocab_size=64)).save_pretrained(tmp_path / "bert")
    return ["--model", str(tmp_path / "bert")]


def garbage_model_folder(shared, tmp_path):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("this is not a config {")
    return ["--model", str(tmp_path / "garbage")]


def out_with_results(shared, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    return []


def out_with_checkpoints(shared, tmp_path):
    (tmp_path / "out" / "checkpoints" / "teacher").mkdir(parents=True)
    return []


def out_with_other_flags(shared, tmp_path):
    (tmp_path / "out" / "checkpoints" / "teacher").mkdir(parents=True)
    killed = asdict(sg.parse_config(smoke(shared, tmp_path / "out", "--lr", "0.001")))
    (tmp_path / "out" / "checkpoints" / "teacher" / "config.json").write_text(json.dumps(killed))
    return ["--resume"]


def out_is_a_file(shared, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    return []


# (name, setup(shared, tmp_path) -> extra argv, or a plain argv list, words the one-line message must hold)
BAD_INPUT = [
    ("unknown method", ["--method", "magic"], "choose one of sft, selfdistill, freeze, known_only, l2, all"),
    ("unknown preset", ["--preset", "huge"], "choose one of smoke, default, realistic, large, ci"),
    ("unknown flag", ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1; see python sftguard.py --help"),
    ("unknown experiment", ["--experiment", "telepathy"], "unknown --experiment 'telepathy'; choose one of"),
    ("negative KL weight", ["--kl_weight", "-1"], "--kl_weight -1.0 is out of range"),
    ("nan L2 weight", ["--l2_weight", "nan"], "--l2_weight nan is out of range"),
    ("zero temperature", ["--temperature", "0"], "--temperature 0.0 is out of range"),
    ("negative SliCK temperature", ["--slick_temperature", "-0.5"], "--slick_temperature -0.5 is out of range"),
    ("infinite learning rate", ["--lr", "inf"], "--lr inf is out of range"),
    ("warm-up of every step", ["--warmup_frac", "1"], "leaves no steps after warm-up"),
    ("negative split size", ["--n_held", "-3"], "--n_held -3 is negative"),
    ("width not divisible by heads", ["--n_embd", "65"], "is not divisible by --n_head"),
    ("key/value heads not dividing the heads", ["--n_kv_head", "3"], "does not divide --n_head"),
    ("resume and overwrite", ["--resume", "--overwrite"], "pass one of them"),
    ("unknown epoch checkpoints", ["--epoch_checkpoints", "sometimes"], "--epoch_checkpoints must be one of auto, always, never"),
    ("unknown device", ["--device", "tpu"], "unknown --device 'tpu'"),
    ("freeze pattern matches nothing", ["--method", "freeze", "--trainable", "no_such_module"], "matches no parameter"),
    ("freeze pattern is a bad regex", ["--method", "freeze", "--trainable", "(mlp"], "nor a valid regex"),
    ("model path absent", ["--model", "/nonexistent/model"], "is not a folder with a config.json"),
    ("model is a BERT", bert_folder, "is a BertForMaskedLM, not a causal LM"),
    ("model config is garbage", garbage_model_folder, "has an unreadable config.json"),
    ("data is a file", lambda shared, tmp_path: ["--data", str(shared["data"] / "facts.jsonl")], "is not a folder"),
    ("facts.jsonl missing", data_without("facts.jsonl"), "facts.jsonl is missing; build the data"),
    ("pretrain.jsonl missing", data_without("pretrain.jsonl"), "pretrain.jsonl is missing"),
    ("world.json not JSON", bad_world_json, "world.json is not valid JSON"),
    ("facts line not JSON", edit_facts(lambda lines: lines[:5] + ["{oops"] + lines[5:]), "facts.jsonl:6 is not valid JSON"),
    ("facts line not an object", edit_facts(lambda lines: lines[:2] + ["[1, 2]"] + lines[2:]), "facts.jsonl:3 is not a JSON object"),
    ("fact lacks a field", edit_fact(3, lambda f: f.pop("question")), "facts.jsonl:4 lacks question"),
    ("fact with empty answers", edit_fact(7, lambda f: f.update(answers=[])), "facts.jsonl:8 needs \"answers\""),
    ("fact with a blank answer", edit_fact(7, lambda f: f.update(answers=["  "])), "facts.jsonl:8 needs \"answers\""),
    ("answers not a list", edit_fact(0, lambda f: f.update(answers="Paris")), "facts.jsonl:1 needs \"answers\""),
    ("repeated fact id", edit_fact(1, lambda f: f.update(id="f000000")), "facts.jsonl:2 repeats the id"),
    ("relation with no facts", edit_facts(drop_relation), "has no facts in"),
    ("too little data", ["--n_known", "100000"], "where --n_known 100000 were asked"),
    ("a split comes out empty", ["--slick_max_facts", "3", "--n_known", "0", "--n_unknown", "0", "--n_held", "0", "--n_val", "0"],
     "split came out empty"),
    ("out holds results", out_with_results, "already holds a run's results; pass --overwrite"),
    ("out holds a killed run", out_with_checkpoints, "pass --resume to continue it or --overwrite"),
    ("resume with other flags", out_with_other_flags, "--resume needs the flags of the killed run; --lr was 0.001"),
    ("out is a file", out_is_a_file, "exists and is not a folder"),
]
if not torch.cuda.is_available():
    BAD_INPUT.append(("CUDA asked for but absent", ["--device", "cuda"], "no CUDA device is available; use --device cpu"))


@pytest.mark.parametrize("setup, expected", [row[1:] for row in BAD_INPUT], ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(shared, tmp_path, capsys, setup, expected):
    extra = setup if isinstance(setup, list) else setup(shared, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        sg.cli(smoke(shared, tmp_path / "out", *extra))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], errors


@pytest.mark.parametrize("setup, expected", [(edit_fact(2, lambda f: f.pop("answers")), "facts.jsonl:3 lacks answers"),
                                             (["--no_such_flag", "1"], "error: unrecognized arguments: --no_such_flag 1")],
                         ids=["fact lacks answers", "unknown flag"])
def test_bad_input_in_a_fresh_process_has_no_traceback(shared, tmp_path, setup, expected):
    extra = setup if isinstance(setup, list) else setup(shared, tmp_path)
    proc = run_subprocess(smoke(shared, tmp_path / "out", *extra))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and expected in err, err


def test_help_lists_every_flag(capsys):
    """argparse %-formats help strings: a stray % in one field's help breaks --help for everyone."""
    with pytest.raises(SystemExit) as exit_info:
        sg.cli(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert all(f"--{name}" in shown for name in asdict(sg.Config()))


def test_internal_errors_keep_their_traceback(monkeypatch, shared, tmp_path):
    def broken(cfg):
        raise KeyError("a bug, not a user mistake")
    monkeypatch.setattr(sg, "main", broken)
    with pytest.raises(KeyError):
        sg.cli(smoke(shared, tmp_path / "out"))


def test_tokenizer_without_pad_token_is_padded_with_eos(shared, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = ["<eos>", "Q:", "A:", "Where", "was", "Ada", "Lovelace", "born?", "London", "Paris"]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>")
    assert tokenizer.pad_token is None
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=0, bos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")

    cfg = sg.parse_config(smoke(shared, tmp_path / "out", "--model", str(tmp_path / "tiny")))
    model, tok, _ = sg.load_base_model(cfg, shared["data"], {"source": "synthetic"}, torch.device("cpu"))
    assert tok.pad_token == "<eos>" and model.config.pad_token_id == tok.eos_token_id == 0
    facts = [{"question": "Where was Ada born?", "answers": ["London"]},
             {"question": "Where was Ada Lovelace born?", "answers": ["Paris"]}]
    batch = next(sg.qa_batches(tok, facts, batch_size=2)(torch.Generator().manual_seed(0)))
    padded = batch["attention_mask"] == 0
    assert padded.sum() == 1 and (batch["input_ids"][padded] == 0).all() and (batch["labels"][padded] == -100).all()
    answers = sg.generate_answers(model, tok, [sg.QA_PROMPT.format(question=f["question"]) for f in facts],
                                  max_new_tokens=2, batch_size=2)
    assert len(answers) == 2 and all(len(a) == 1 for a in answers)


# ----------------------------------------------------------------------------------------------- NaN and output safety
@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_earlier_results(shared, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = '{"an earlier run": true}\n'
    (out / "results.json").write_text(earlier)
    with pytest.raises(SystemExit) as exit_info:  # an absurd learning rate: the weights overflow in stage 2
        sg.cli(smoke(shared, out, "--method", "sft", "--lr", "1e30", "--overwrite"))
    assert exit_info.value.code == 3
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "the loss became nan" in message[0] and "step" in message[0], message
    assert (out / "results.json").read_text() == earlier  # the failed run destroyed nothing ...
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # ... and wrote nothing, checkpoints included


def test_overwrite_replaces_a_finished_run(shared, reference, tmp_path):
    out = shared["root"] / "reference"
    with pytest.raises(SystemExit):
        sg.cli(smoke(shared, out, *RUN))  # refused: the folder holds the reference run
    before = (out / "results.json").read_text()
    sg.cli(smoke(shared, out, *RUN, "--overwrite"))
    again = json.loads((out / "results.json").read_text())
    assert metrics(again) == metrics(reference) and again["wall_s"] != json.loads(before)["wall_s"]
    assert not (out / "checkpoints").exists()  # deleted when a run finishes


# ----------------------------------------------------------------------------------------------- determinism and --resume
def test_same_seed_same_results_in_another_process(shared, reference, tmp_path):
    proc = run_subprocess(smoke(shared, tmp_path / "again", *RUN), PYTHONHASHSEED="12345")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert metrics(again) == metrics(reference)
    assert [p["held_acc"] for p in again["curve"]] == [p["held_acc"] for p in reference["curve"]]


def test_other_seed_other_results(shared, reference, tmp_path):
    """The determinism test above could pass if results ignored the seed; they do not."""
    sg.cli(smoke(shared, tmp_path / "seed1", *RUN, "--seed", "1"))
    other = json.loads((tmp_path / "seed1" / "results.json").read_text())
    assert other["curve"] != reference["curve"]


def test_killed_during_stage_2_then_resumed_gives_the_same_numbers(shared, reference, tmp_path):
    out = tmp_path / "killed"
    proc = run_subprocess(smoke(shared, out, *RUN))
    first_epoch = out / "checkpoints" / "selfdistill" / "epoch-0001"
    deadline = time.monotonic() + 240
    while not first_epoch.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err[-2000:]}"
    assert not (out / "results.json").exists()
    assert (out / "checkpoints" / "teacher" / "model.safetensors").is_file()

    with pytest.raises(SystemExit):  # a plain rerun must not silently start over
        sg.cli(smoke(shared, out, *RUN))
    proc = run_subprocess(smoke(shared, out, *RUN, "--resume"))
    log, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stage 1: resumed the teacher" in log and "selfdistill: resumed after epoch" in log, log
    resumed_after = int(log.split("selfdistill: resumed after epoch ")[1].split()[0])
    assert 1 <= resumed_after < 4  # it really was killed inside stage 2
    result = json.loads((out / "results.json").read_text())
    assert metrics(result) == metrics(reference)
    assert not (out / "checkpoints").exists()


def test_killed_without_epoch_checkpoints_restarts_the_method_from_the_teacher(shared, reference, tmp_path):
    out, never = tmp_path / "killed", ["--epoch_checkpoints", "never"]  # what a 7B run does by default (auto)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:  # progress bars: a file, so that no pipe fills up
        proc = subprocess.Popen([sys.executable, str(REPO / "sftguard.py"), *smoke(shared, out, *RUN, *never)], cwd=REPO,
                                env=env, text=True, stdout=subprocess.PIPE, stderr=stderr)
        for line in proc.stdout:  # epoch 1 is done (with its checkpoint, if one were saved): kill inside stage 2
            if line.startswith("  selfdistill epoch 2:"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{(tmp_path / 'stderr.txt').read_text()[-2000:]}"
    assert (out / "checkpoints" / "teacher" / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob("*/epoch-*"))  # never: no student checkpoint was written

    proc = run_subprocess(smoke(shared, out, *RUN, *never, "--resume"))
    log, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stage 1: resumed the teacher" in log and "resumed after epoch" not in log, log
    assert metrics(json.loads((out / "results.json").read_text())) == metrics(reference)  # as if never killed
    assert not (out / "checkpoints").exists()
