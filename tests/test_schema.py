"""Rule E: every value is checked before anything is written, by one table (``conf/schema.yaml``) that covers every
key of every command; each rule refuses wrong types, negatives, zero where zero is invalid, inf/nan and absurd
values in one line."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from segvoc.config import CONF_DIR, REPO_ROOT, check_values, compose, leaves, rule_for, schema
from segvoc.errors import ConfigError

COMMANDS = {"train": [], "evaluate": ["ckpt=x"], "predict": ["ckpt=x", "input=y"], "export": ["ckpt=x"],
            "report": ["sweep=x"], "check": [], "prepare": []}
GROUPS = ("model", "loss", "optimizer", "scheduler", "augment", "logger", "callbacks", "infer", "perf", "debug",
          "trainer", "data", "experiment", "hparams_search")
# keys no shipped config sets, that a user adds with +key=value
ADDED = {"trainer.min_epochs": 1, "trainer.max_steps": 10, "trainer.check_val_every_n_epoch": 1,
         "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 2, "trainer.gradient_clip_val": 1.0}


@functools.cache
def composed() -> tuple[tuple[str, DictConfig], ...]:
    """Every command's config, and train's with every choice of every group."""
    out = [(name, compose([*ov, "paths.output_dir=/tmp/x"], config_name=name)) for name, ov in COMMANDS.items()]
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            # a mandatory value (data=folder's root: ???) is the user's to give
            shipped = OmegaConf.load(path)
            given = [f"data.{key}=/tmp/x" for key in shipped if group == "data" and OmegaConf.is_missing(shipped, key)]
            out.append(("train", compose([f"{group}={path.stem}", "paths.output_dir=/tmp/x", *given])))
    return tuple(out)


def test_every_key_the_commands_compose_has_a_rule():
    rules, unchecked = schema()
    keys = [(key, value) for _, cfg in composed() for key, value in leaves(cfg, unchecked)]
    missing = sorted({key for key, value in keys if not isinstance(value, DictConfig) and rule_for(key, rules) is None})
    assert not missing, f"keys without a rule in conf/schema.yaml: {missing}"
    # and every rule is some composed key's own (or a key users add): the walk reached the nested keys, and a key
    # is not covered by another key's rule
    used = {id(rule_for(key, rules)) for key, _ in keys}
    unused = sorted(p for p, rule in rules.items() if id(rule) not in used and p not in ADDED)
    assert not unused, f"rules in conf/schema.yaml that no composed key has: {unused}"


def test_every_rule_accepts_what_the_project_ships():
    for _, cfg in composed():
        check_values(cfg)


@functools.cache
def _where(pattern: str) -> tuple[DictConfig, str]:
    """A composed config holding a key that ``pattern`` names, and that key."""
    rules, unchecked = schema()
    for _, cfg in composed():
        for key, value in leaves(cfg, unchecked):
            mapping = rules[pattern]["type"] == "mapping"
            if rule_for(key, {pattern: {}}) is not None and (mapping or not isinstance(value, DictConfig)) and (
                    rule_for(key, rules) is rules[pattern]):
                return cfg, key
    assert pattern in ADDED, f"{pattern}: no shipped config has it; add a value to ADDED"
    cfg = composed()[0][1].copy()
    with open_dict(cfg):  # a key a user adds with +key=value
        OmegaConf.update(cfg, pattern, ADDED[pattern], force_add=True)
    return cfg, pattern


def bad_values(rule: dict) -> list:
    """Wrong types, negatives, zero where zero is invalid, inf/nan and absurdly large values for ``rule``."""
    kind, also = rule["type"], rule.get("also") or []
    if kind == "bool":
        values = ["yes", 1, 0.5, [True]]
    elif kind == "choice":
        values = ["nonsense", 1.5, True, [rule["choices"][0]]]
    elif kind == "text":
        values = [5, 1.5, True, [1]]
    elif kind == "mapping":
        values = [5, "abc", [1]]
    elif kind == "list":
        item = rule.get("item") or {"type": "text"}
        good = 1 if item["type"] in ("int", "number") else "x"
        values = ["abc", 3.0, {"a": 1}]
        if "length" in rule:
            values.append([good] * (rule["length"] + 1))
        if "item" in rule:
            values += [[v] * rule.get("length", 1) for v in bad_values(item)[:3]]
    else:
        values = ["abc", True, [1], math.inf, -math.inf, math.nan, 1e12]
        low = rule.get("min", rule.get("above"))
        if low is not None:
            values += [low - 1, -5]
            if "above" in rule:
                values.append(rule["above"])
        if "max" in rule:
            values.append(rule["max"] + 1)
        if "below" in rule:
            values.append(rule["below"])
        if kind == "int":
            values += [2.5, float(rule.get("min", 1) + 1)]  # 2.0 is not a whole number of the config's type
            values += [float(a) for a in also if type(a) is int]  # -1.0 is not the -1 that "also" accepts
    return [v for v in values if not any(v == a and type(v) is type(a) for a in also)]


RULES = sorted(schema()[0])


@pytest.mark.parametrize("pattern", RULES)
def test_each_rule_refuses_bad_values_in_one_line(pattern):
    rule = schema()[0][pattern]
    for value in bad_values(rule):
        cfg, key = _where(pattern)
        cfg = cfg.copy()
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        with pytest.raises(ConfigError) as err:
            check_values(cfg)
        message = str(err.value)
        assert message.startswith(f"{key}=") and "must be" in message and "\n" not in message, (value, message)


@pytest.mark.parametrize(("typed", "key"), [("data.batch_size=2.0", "data.batch_size"),
                                             ("stats.confidence=95", "stats.confidence")])
def test_a_bad_value_on_the_command_line_writes_nothing(typed, key, tmp_path):
    """The whole command: one line, exit code 2, and neither a run directory nor a checkpoint."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "segvoc.train", "data=synthetic", "debug=smoke", typed,
                        f"hydra.run.dir={run}", f"paths.output_root={tmp_path / 'out'}"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert r.stderr.strip().startswith(f"error: {key}=")
    assert not run.exists() and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("workers", [0, 2])
def test_num_classes_below_a_mask_label_names_the_first_file(smoke_cfg, tmp_path, workers, capsys):
    """Item 12: ``data.num_classes`` below the largest mask label is refused when the masks are read, naming the
    file, also from a loader worker (it was an IndexError in the loss)."""
    from segvoc.app import run_app
    from segvoc.train import train

    cfg = smoke_cfg("data.num_classes=5", f"data.num_workers={workers}", "trainer.max_epochs=1")
    with pytest.raises(SystemExit) as exc:
        run_app(train, cfg)
    assert exc.value.code == 2
    captured = capsys.readouterr().err
    assert "Traceback" not in captured, captured[-2000:]
    err = captured.strip().splitlines()[-1]
    assert err.startswith("error: ") and "SegmentationClass/syn_" in err and ".png: mask has values " in err
    assert "outside 0-4 and 255 (data.num_classes=5)" in err
    assert not list(Path(tmp_path).rglob("*.ckpt"))
