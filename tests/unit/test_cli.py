from pathlib import Path

import typer

from mavsr_cli.cli import app


def test_every_command_and_option_is_documented():
    group = typer.main.get_command(app)
    assert {"prepare", "tiny-models", "extract-features", "train", "decode", "score", "info"} <= set(group.commands)
    n = 0
    for name, cmd in _all_commands():
        assert cmd.help and cmd.help.strip(), name
        for p in cmd.params:  # typer vendors its own click: go by the parameter kind, not the class
            if p.param_type_name == "option" and p.name != "help":
                assert p.help and p.help.strip(), f"{name} {p.opts}"
                n += 1
            if p.param_type_name == "argument":
                assert getattr(p, "help", None), f"{name} {p.name}"
    assert n > 50  # the walk saw the options


def test_help_runs(capsys):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["decode", "--help"])
    assert r.exit_code == 0
    assert "--audio-rate" in r.output and "--video-rate" in r.output


def _all_commands():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from ((f"{name} {sub}", c) for sub, c in cmd.commands.items())
        else:
            yield name, cmd


def test_help_teaches_examples_and_flags_take_no_value():
    from typer.testing import CliRunner

    names = dict(_all_commands())
    assert {"prepare synth", "prepare lrs3", "decode", "transcribe", "info"} <= set(names)
    for name in names:
        r = CliRunner().invoke(app, [*name.split(), "-h"], env={"COLUMNS": "160"})
        assert r.exit_code == 0, name
        assert "Examples:" in r.output and "mavsr " in r.output.split("Examples:")[1], name
        assert "<bool>" not in r.output, name  # `--force`, never `--force <bool>`
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "160"})
    listed = [n for n in ("prepare", "tiny-models", "extract-features", "train", "decode", "score") if n in r.output]
    assert sorted(listed, key=r.output.index) == listed  # in stage order


def test_version_and_a_quick_help(tmp_path):
    import subprocess
    import sys

    from mavsr_cli import __version__

    r = subprocess.run([sys.executable, "-m", "mavsr_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"mavsr {__version__}"
    # --help loads neither torch nor transformers (they took most of its 8 s on a loaded 2-core machine)
    code = ("import sys; sys.argv = ['mavsr', 'decode', '--help']\nfrom mavsr_cli.cli import app\ntry: app()\n"
            "except SystemExit: pass\nprint([m for m in ('torch', 'transformers', 'av', 'numpy') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("[]"), r.stdout[-300:] + r.stderr[-300:]


def test_info_takes_dir_and_says_what_the_recipe_holds(tmp_path):
    from typer.testing import CliRunner

    (tmp_path / "data/train").mkdir(parents=True)
    (tmp_path / "data/train/manifest.jsonl").write_text("{}\n{}\n")
    (tmp_path / "data/train/.done").write_text("")
    (tmp_path / "exp/x/ckpt/step-000020").mkdir(parents=True)
    r = CliRunner().invoke(app, ["info", "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "data/train: done, 2 utterances" in r.output
    assert "exp/x: training unfinished, last checkpoint step-000020" in r.output and "decode uses" not in r.output
    for step in ("step-000010", "step-000020"):  # checkpoints with their tensors, as decode reads them
        (tmp_path / "exp/x/ckpt" / step).mkdir(parents=True, exist_ok=True)
        (tmp_path / "exp/x/ckpt" / step / "model.safetensors").write_bytes(b"")
    (tmp_path / "exp/x/meta.json").write_text('{"checkpoint": "step-000010"}')  # the best, not the last
    r = CliRunner().invoke(app, ["info", "--dir", str(tmp_path)])
    assert "last checkpoint step-000020 (decode uses step-000010)" in r.output


def test_log_lines_never_glue_onto_a_live_progress_bar():
    """On a terminal, a line logged while a bar is live starts a line of its own (it used to be
    written past rich's stdout proxy, right after the bar's last frame)."""
    import os
    import pty
    import re
    import subprocess
    import sys

    code = ("import time\nfrom mavsr_cli.cli import _log\nfrom mavsr_cli.progress import bar\n"
            "with bar() as p:\n    t = p.add_task('work', total=3, info='')\n    for i in range(3):\n"
            "        p.advance(t)\n        time.sleep(0.15)\n        _log(f'logged line {i}')\n")
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "MAVSR_QUIET"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    lines = re.split(r"[\r\n]+", text)
    assert "━" in text  # a bar was drawn (a terminal)
    for i in range(3):
        assert f"logged line {i}" in lines, [x for x in lines if "logged" in x]


def test_extract_features_next_line_follows_what_was_extracted(tmp_path):
    from mavsr_cli.cli import _after_features
    from mavsr_cli.config import Modality

    conf = Path("conf/synth.yaml")
    assert _after_features(conf, tmp_path, None, None) == "mavsr train --config conf/synth.yaml --rates all"
    assert _after_features(conf, tmp_path, Modality("a"), None) == \
        "mavsr train --config conf/synth.yaml --modality a --rates all"  # as the features were made
    assert _after_features(conf, tmp_path, None, ["dev"]) == "mavsr decode --exp exp/<tag> --split dev --sweep"
    assert _after_features(conf, tmp_path, None, ["train", "dev"]).startswith("mavsr train")
    exp = tmp_path / "exp/imported"
    (exp / "ckpt/step-000001").mkdir(parents=True)
    (exp / "ckpt/step-000001/model.safetensors").write_bytes(b"")
    (exp / "config.yaml").write_text("")
    assert _after_features(exp / "config.yaml", tmp_path, None, ["test"]) == "mavsr decode --exp exp/imported --sweep"
    assert _after_features(exp / "config.yaml", tmp_path, None, ["val"]) == \
        "mavsr decode --exp exp/imported --split val --sweep"


def test_every_help_example_parses_as_its_command():
    """Each example under a command's --help names only options it has, gives every required one, and
    values of their types (the claims example once lacked its two required options)."""
    import shlex

    from mavsr_cli.cli import EXAMPLES

    commands = dict(_all_commands())
    checked = 0
    for examples in EXAMPLES.values():
        for example in examples:
            for part in example.split("  #")[0].split("&&"):
                words = shlex.split(part)
                if words[0] == "torchrun":  # torchrun [its options] -m mavsr_cli CMD ...
                    words = ["mavsr", *words[words.index("mavsr_cli") + 1:]]
                if words[0] != "mavsr":
                    continue  # bash study.sh and the like
                name = " ".join(words[1:3]) if " ".join(words[1:3]) in commands else words[1]
                args = words[1 + len(name.split()):]
                if any("$" in w or "`" in w for w in args):
                    continue  # filled in by the shell
                commands[name].make_context(name, args)  # raises on an unknown or missing option, or a bad value
                checked += 1
    assert checked > 20
