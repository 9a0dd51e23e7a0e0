"""Every command and every flag of the command line says what it does in `--help`."""

from __future__ import annotations

import argparse

from desupcon.cli import build_parser


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser and every subcommand's, by name."""
    parser = build_parser()
    found = {"desupcon": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"desupcon {name}": sub for name, sub in action.choices.items()})
    return found


def test_every_command_has_help_text():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helped = {a.dest for a in commands._choices_actions if a.help}
    assert helped == set(commands.choices), f"commands without help: {set(commands.choices) - helped}"


def test_every_flag_has_help_text():
    missing = []
    parsers = all_parsers()
    assert len(parsers) >= 7  # desupcon + quickstart, teacher, train, sweep, analyze, report
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            text = action.help
            if not text or text == argparse.SUPPRESS or not text.strip():
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
        parser.format_help()  # a stray % in a help string would only fail here
    assert not missing, "flags without help text:\n  " + "\n  ".join(missing)
