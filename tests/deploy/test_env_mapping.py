"""Every option of every subcommand reads MODELSHELF_<FLAG> (issue 8 item 11).

The loop walks the real parser, so a flag added later is covered without touching this file:
for each option it picks a value the flag itself accepts and differs from the default, sets
only the variable, and checks the parsed value is exactly what the flag would have given; then
that a flag on the command line still wins.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.cli import build_parser, settings_from_args

_CANDIDATES = ("7", "2.5", "/env/dir", "env-value")


def env_name(flag: str) -> str:
    """The documented rule: --memory-multiplier -> MODELSHELF_MEMORY_MULTIPLIER."""
    return "MODELSHELF_" + flag[2:].upper().replace("-", "_")


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, parser) for every parser that has no further subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, path + (name,))


def _options():
    for path, parser in _leaves(build_parser()):
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and not isinstance(action, argparse._HelpAction):
                yield path, longs[0], action


OPTIONS = list(_options())


def _sample(action: argparse.Action) -> tuple[str, object]:
    """(text for the variable, the value the flag gives for it), different from the default."""
    if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
        return "yes", True if isinstance(action, argparse.BooleanOptionalAction) else action.const
    if isinstance(action, argparse._CountAction):
        return "3", 3
    if isinstance(action, argparse._AppendAction):
        convert = action.type or str
        return "env-a=1, env-b=2", [convert("env-a=1"), convert("env-b=2")]
    if action.choices:
        value = next(c for c in action.choices if c != action.default)
        return str(value), value
    for text in _CANDIDATES:
        try:
            value = action.type(text) if action.type else text
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
        if value != action.default:
            return text, value
    raise AssertionError(f"no sample value for {action.option_strings}: extend _CANDIDATES")


def _argv(path: tuple[str, ...], parser_action: argparse.Action, extra: list[str]) -> list[str]:
    """The subcommand plus whatever else it requires (positionals, required options)."""
    sub = build_parser()
    for name in path:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    argv = list(path)
    for a in sub._actions:
        if a.dest == parser_action.dest or isinstance(a, argparse._HelpAction):
            continue
        if not a.option_strings and a.nargs not in ("?", "*"):
            argv.append("positional")
        elif a.option_strings and a.required:
            argv += [a.option_strings[0], "1Gi"]
    return argv + extra


def test_the_loop_sees_every_subcommand_and_the_flags_of_the_issue():
    seen = {(*path, flag) for path, flag, _ in OPTIONS}
    assert {("run", "--memory-multiplier"), ("run", "--port"), ("pull", "--no-progress"), ("pull", "--header"),
            ("cache", "ls", "--json"), ("cache", "gc", "--max-cache-bytes"), ("prefetch", "--cache-dir")} <= seen
    assert len(OPTIONS) > 50


@pytest.mark.parametrize("path, flag, action", OPTIONS, ids=[f"{' '.join(p)} {f}" for p, f, _ in OPTIONS])
def test_every_flag_reads_its_variable(agent_env, path, flag, action):
    text, expected = _sample(action)
    agent_env({env_name(flag): text})
    args = build_parser().parse_args(_argv(path, action, []))
    assert getattr(args, action.dest) == expected, f"{env_name(flag)}={text!r} was not honoured by {flag}"


@pytest.mark.parametrize("path, flag, action", [o for o in OPTIONS if not isinstance(o[2], argparse._StoreTrueAction)],
                         ids=[f"{' '.join(p)} {f}" for p, f, a in OPTIONS if not isinstance(a, argparse._StoreTrueAction)])
def test_the_command_line_wins(agent_env, path, flag, action):
    text, expected = _sample(action)
    agent_env({env_name(flag): text})
    on_line = action.default if action.default not in (None, [], expected) else None
    if on_line is None or isinstance(action, argparse._AppendAction):
        return  # nothing else to give for this flag: covered by the test above
    args = build_parser().parse_args(_argv(path, action, [flag, str(on_line)]))
    assert getattr(args, action.dest) == (action.type(str(on_line)) if action.type else str(on_line))


def test_memory_multiplier_reaches_the_settings(agent_env):
    """The case of the issue: --memory-multiplier ignored MODELSHELF_MEMORY_MULTIPLIER."""
    agent_env({"MODELSHELF_MEMORY_MULTIPLIER": "sklearn=2.5 xgboost=4", "MODELSHELF_CONFIG_DIR": "/c",
               "MODELSHELF_CACHE_DIR": "/d"})
    settings = settings_from_args(build_parser().parse_args(["run"]))
    assert settings.memory_multipliers == {"sklearn": 2.5, "xgboost": 4.0}
    assert settings.config_dir == Path("/c")


def test_lists_take_lines_commas_or_spaces(agent_env):
    for text in ("A:1\nB:2", "A:1,B:2", "A:1 B:2", " A:1 , B:2 "):
        agent_env({"MODELSHELF_HEADER": text})
        assert build_parser().parse_args(["pull", "u", "d"]).header == ["A:1", "B:2"]
    agent_env({"MODELSHELF_HEADER": "Authorization: Bearer t0k\nX-Other: a, b"})  # one per line keeps spaces
    assert build_parser().parse_args(["pull", "u", "d"]).header == ["Authorization: Bearer t0k", "X-Other: a, b"]


@pytest.mark.parametrize("variable, value, says", [
    ("MODELSHELF_PORT", "eighty", "MODELSHELF_PORT='eighty'"),
    ("MODELSHELF_SERVER", "tensorflow", "MODELSHELF_SERVER='tensorflow'"),
    ("MODELSHELF_NO_PROGRESS", "maybe", "MODELSHELF_NO_PROGRESS='maybe'"),
])
def test_a_bad_value_names_its_variable(agent_env, capsys, variable, value, says):
    agent_env({variable: value})
    argv = ["pull", "u", "d"] if "PROGRESS" in variable else ["run"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_flag_kinds_added_later_are_mapped_too(monkeypatch):
    """The mapping knows argparse's action kinds, not our flags: a new parser with every kind."""
    from agent.cli import _apply_env

    for name, value in {"MODELSHELF_DRY_RUN": "true", "MODELSHELF_NO_CACHE": "yes", "MODELSHELF_COLOR": "0",
                        "MODELSHELF_VERBOSE": "2", "MODELSHELF_TAG": "a b", "MODELSHELF_LIMIT": "9"}.items():
        monkeypatch.setenv(name, value)
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-cache", action="store_false")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--verbose", "-v", action="count", default=0)
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--limit", type=int, default=1)
    _apply_env(p)
    args = p.parse_args([])
    assert (args.dry_run, args.no_cache, args.color, args.verbose, args.tag, args.limit) == (True, False, False, 2, ["a", "b"], 9)
    assert p.parse_args(["--limit", "3", "--color"]).limit == 3


def test_a_required_flag_is_satisfied_by_its_variable(agent_env):
    agent_env({"MODELSHELF_CACHE_DIR": "/var/cache/modelshelf"})
    assert build_parser().parse_args(["cache", "ls"]).cache_dir == Path("/var/cache/modelshelf")
