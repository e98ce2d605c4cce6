"""`python sftguard.py --help` a student can scan: flags grouped by purpose, engineering last, one line each."""
import contextlib
import dataclasses
import io
import re

import pytest

import sftguard as S

GROUPS = ["study", "data and model", "SliCK", "training", "self-distillation", "experiments (why SFT forgets)",
          "practitioners' tools", "engineering"]


def help_text() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        S.parse_config(["--help"])
    return out.getvalue()


def test_help_is_grouped_by_purpose_with_engineering_last():
    headings = re.findall(r"^(\S[^\n]*):$", help_text(), flags=re.M)
    assert headings[-len(GROUPS):] == GROUPS
    text = help_text()
    assert text.index("\nengineering:") < text.index("--resume") and text.index("--kl_weight") < text.index("\nengineering:")


def test_every_flag_is_one_line_with_a_short_help():
    fields = dataclasses.fields(S.Config)
    lines = help_text().splitlines()
    assert all(0 < len(line) <= 110 for line in lines if line.strip()), [line for line in lines if len(line) > 110]
    for f in fields:
        line = next(line for line in lines if line.strip().startswith(f"--{f.name} "))
        assert f.metadata["help"][:40] in line, f.name  # the flag and its help on one line
        if f.default == "" or f.default is False:  # an empty default says nothing; the others (0 too) are shown
            assert line.rstrip().endswith(f.metadata["help"]), f.name
        else:
            assert line.rstrip().endswith(f"[{f.default}]"), f.name


def test_the_groups_hold_every_config_field_once():
    names = [f.name for group in S.ARG_GROUPS for f in dataclasses.fields(group)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(S.Config)) and len(set(names)) == len(names)
