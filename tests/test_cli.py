"""The `fastcd` command answers a new user's first questions: its version, the shipped configs, the resolved
config, help with defaults for every option, where benchmarks write, and refusals that name its own options."""
import argparse
import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastcd.cli import BENCHES, COMMANDS, main
from fastcd.commands.configs import description
from fastcd.config import load_config
from fastcd.paths import configs_dir
from tests.conftest import tiny_dict

ROOT = Path(__file__).resolve().parents[1]
TABLES = [("", COMMANDS), ("bench ", BENCHES)]


def parser_of(module_name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def options_of(command: str) -> set[str]:
    """Every option string of `fastcd COMMAND` (e.g. "repro" or "bench train")."""
    words = command.split()
    table = BENCHES if words[0] == "bench" else COMMANDS
    return {o for a in parser_of(table[words[-1]][0])._actions for o in a.option_strings}


def assert_names_only_its_options(command: str, message: str) -> None:
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message))
    assert named, message
    assert named <= options_of(command), f"{command}: {sorted(named - options_of(command))} in {message!r}"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastcd {importlib.metadata.version('fastcd')}"


def test_configs_lists_every_shipped_config_with_a_description(capsys):
    assert main(["configs"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("configs/"))
    shipped = {f"configs/{p.parent.name}/{p.name}" for p in configs_dir().glob("*/*.yaml") if p.name[0] != "_"}
    assert set(lines) == shipped
    assert all(len(text.strip()) > 10 for text in lines.values()), lines
    assert main(["configs", "fashion-mnist"]) == 0
    assert all("fashion-mnist" in line for line in capsys.readouterr().out.splitlines() if line.startswith("configs/"))


def test_description_is_the_first_sentence_of_the_opening_comment(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("# CD with decay (seed: 28.36). The seed does not\n# print this list.\nbase: _base.yaml\n# later\n")
    assert description(path) == "CD with decay (seed: 28.36)."
    path.write_text("base: _base.yaml\n")
    assert description(path) == ""


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(str(tmp_path / "run"))))
    assert main(["train", str(config), "--print-config", "--set", "train.epochs=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(config, ["train.epochs=7"]).to_dict() and printed["train"]["epochs"] == 7
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("prefix", "name"), [(p, n) for p, table in TABLES for n in table])
def test_every_option_has_help_and_shows_its_default(prefix, name):
    table = BENCHES if prefix else COMMANDS
    parser = parser_of(table[name][0])
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"fastcd {prefix}{name} {action.option_strings or action.dest}: no help"
        default = action.default
        if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction, argparse._HelpAction)) \
                or default in (None, "", []):
            continue
        shown = {str(default), f"{default:g}" if isinstance(default, float) else str(default)}
        assert any(s in text for s in shown) or "default" in text, \
            f"fastcd {prefix}{name} {action.option_strings}: default {default!r} not shown in {text!r}"


def test_benchmarks_write_under_the_working_directory_by_default(tmp_path, monkeypatch):
    from fastcd.paths import results_dir
    from fastcd.utils.results import record

    monkeypatch.chdir(tmp_path)
    path = record("probe", {"x": 1})
    assert path.parent == tmp_path / "fastcd-results" == results_dir()
    assert parser_of(BENCHES["train"][0]).parse_args(["c.yaml"]).out == ""  # "" = results_dir()


def test_refusals_name_options_the_command_has(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(str(run))))
    cases = [("train", ["train", str(config)]),
             ("repro", ["repro", "fashion-mnist", "--out", str(tmp_path), "--set", f"train.out_dir={run}"]),
             ("bench train", ["bench", "train", str(config), "--ablation", "--skip", "compile"]),
             ("bench train", ["bench", "train", str(config), "--data", "loader", "--data-path", str(tmp_path / "p")]),
             ("prepare", ["prepare", "--verify", str(tmp_path), "extra"])]
    for command, argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert_names_only_its_options(command, err)


def test_every_option_a_subcommand_module_mentions_is_one_of_its_own():
    """Static: a `--option` written in a subcommand module's strings (errors, hints, help) exists there."""
    for _, table in TABLES:
        for module_name, _ in table.values():
            module = importlib.import_module(module_name)
            own = {o for a in parser_of(module_name)._actions for o in a.option_strings}
            tree = ast.parse(Path(module.__file__).read_text())
            # "`fastcd other --opt`" names another command's option
            strings = " ".join(n.value for n in ast.walk(tree)
                               if isinstance(n, ast.Constant) and isinstance(n.value, str) and "fastcd " not in n.value)
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", strings))
            assert named <= own, f"{module_name}: {sorted(named - own)}"


def test_an_uninstalled_checkout_fails_with_a_one_line_hint():
    """From the source tree without `pip install -e .`, fastcd.kernels/data_prep/bench do not exist."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
            "getattr(f, '__module__', '')]; from fastcd.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv in (["prepare", "--help"], ["bench", "kernels", "--help"]):
        done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "pip install -e ." in done.stderr and "make setup" in done.stderr
