import click
import typer

from mavsr_cli.cli import app


def test_every_command_and_option_is_documented():
    group = typer.main.get_command(app)
    assert {"prepare", "tiny-models", "extract-features", "train", "decode", "score", "info"} <= set(group.commands)
    for name, cmd in group.commands.items():
        assert cmd.help and cmd.help.strip(), name
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.help and p.help.strip(), f"{name} {p.opts}"
            if isinstance(p, click.Argument):
                assert getattr(p, "help", None), f"{name} {p.name}"


def test_help_runs(capsys):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["decode", "--help"])
    assert r.exit_code == 0
    assert "--audio-rate" in r.output and "--video-rate" in r.output
