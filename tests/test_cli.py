"""cwdpo/cli.py: every command is declared once (`@command` above its function) and the parser is built from
that table alone."""
import argparse

import pytest

from cwdpo import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_the_parser_has_exactly_the_declared_commands_and_every_command_function_is_declared():
    functions = {name for name in dir(cli) if name.startswith("cmd_")}
    declared = {c.fn.__name__ for c in cli.COMMANDS.values()}
    assert declared == functions
    assert list(_subparsers(cli.build_parser())) == list(cli.COMMANDS)


def test_a_command_gets_the_options_it_declares(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.command("echo-spec", "test command", threads=True, args=(cli.arg("--extra", type=int, default=3),))(
        lambda a: calls.append((a.spec, a.out, a.threads, a.extra)))
    args = cli.build_parser().parse_args(["echo-spec", "--spec", "{}", "--out", "o", "--threads", "2"])
    assert (args.name, args.job, args.hf) == ("echo-spec", True, False)
    args.fn(args)
    assert calls == [("{}", "o", 2, 3)]
    with pytest.raises(SystemExit):  # --spec and --out are required where declared
        cli.build_parser().parse_args(["echo-spec", "--out", "o"])
    gpus = cli.build_parser().parse_args(["gpus", "--n", "0", "--", "true"])
    assert (gpus.job, gpus.command, not hasattr(gpus, "spec")) == (False, ["--", "true"], True)
