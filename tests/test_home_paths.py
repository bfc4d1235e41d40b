"""``~`` in paths: the home folder, as a shell reads it, also where the shell leaves it alone
(a YAML config, ``data.root=~/x``, ``--out=~/x``); before, a run landed in a folder named ``~``
under the current directory."""

from __future__ import annotations

from scrollsam.cli import main
from scrollsam.config import load_config


def test_config_paths_starting_with_a_tilde_are_the_home_folders(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    exp = tmp_path / "exp.yaml"
    exp.write_text("out: ~/runs/t2\nmodel:\n  checkpoint: ~/sam/vit_b.pth\n")
    cfg = load_config(exp, ["data.root=~/data"])
    assert (cfg.out, cfg.data.root, cfg.model.checkpoint) == (
        f"{home}/runs/t2", f"{home}/data", f"{home}/sam/vit_b.pth")
    assert load_config(None, ["out=runs/~x"]).out == "runs/~x"  # only at the start


def test_an_option_value_starting_with_a_tilde_is_the_home_folders(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--fragments", "1", "--height", "32", "--width", "32", "--depth", "4",
                 "~/made"]) == 0
    assert (home / "made" / "train" / "1").is_dir() and not (tmp_path / "~").exists()
    assert main(["evaluate", "--pred=~/made/train/1/inklabels.png",  # not expanded by a shell
                 "--labels=~/made/train/1/inklabels.png"]) == 0
    capsys.readouterr()
