"""A prediction into a folder that holds an earlier one leaves none of the earlier one's files to
be read as its own; an OME-Zarr prediction is never lost to a PNG one without --restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from infer_helpers import make_run

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("replaced")
    write_fragment(root / "a", height=96, width=80, depth=8, seed=1)
    write_fragment(root / "b", height=96, width=80, depth=8, seed=2, labels=False)
    make_run(root / "run", "data.input=ir")
    return root


def predict(data: Path, frag: str, out: Path, *args: str) -> int:
    return main(["predict", "--run", str(data / "run"), "--fragment", str(data / frag),
                 "--out", str(out), "--device", "cpu", *args])


def test_another_fragments_metrics_and_tif_do_not_stay_beside_the_new_pngs(data, tmp_path,
                                                                            capsys):
    """Before: fragment a's metrics.json (it has labels) and prob.tif stayed beside the PNGs of
    fragment b (no labels, no --save-tif), read as b's score and probabilities."""
    out = tmp_path / "out"
    assert predict(data, "a", out, "--save-tif") == 0
    assert {"metrics.json", "prob.tif"} <= {p.name for p in out.iterdir()}
    assert predict(data, "b", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [".prediction.json", "mask.png", "overlay.png",
                                                     "prob.png"]
    assert predict(data, "a", out, "--format", "zarr") == 0  # PNG files -> OME-Zarr
    names = {p.name for p in out.iterdir()}
    assert not names & {"mask.png", "overlay.png", "prob.png"}, names
    assert {"prob.ome.zarr", "metrics.json", "summary.json", "prob_preview.png"} <= names
    assert json.loads((out / "metrics.json").read_text())["fragment"] == "a"
    capsys.readouterr()


def test_a_png_prediction_over_an_ome_zarr_one_needs_restart(data, tmp_path, capsys):
    """Before: the PNGs were written beside the other fragment's OME-Zarr map, summary and
    previews."""
    out = tmp_path / "out"
    assert predict(data, "a", out, "--format", "zarr") == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert predict(data, "b", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out: {out} holds an OME-Zarr prediction (prob.ome.zarr) "
                          f"and this one writes PNG files; pass --format zarr to continue it, "
                          f"--restart to discard it"), err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing lost
    assert predict(data, "b", out, "--restart") == 0
    assert sorted(p.name for p in out.iterdir()) == [".prediction.json", "mask.png", "overlay.png",
                                                     "prob.png"]


def test_files_no_prediction_wrote_are_never_removed_nor_replaced(data, tmp_path, capsys):
    """Before (this morning's first version): the user's own summary.json, metrics.json and
    prob_preview.png in --out were removed as "the earlier prediction's", and a hand-made
    mask.png was removed by an OME-Zarr prediction (replaced by a PNG one)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    own = {"summary.json": "{\"notes\": 1}\n", "metrics.json": "{\"f0.5\": 0.7}\n",
           "prob_preview.png": "not a picture"}
    for name, text in own.items():
        (mine / name).write_text(text)
    assert predict(data, "b", mine) == 0  # b: no labels, so no metrics.json of its own
    assert {n: (mine / n).read_text() for n in own} == own
    assert {"prob.png", "mask.png", "overlay.png"} <= {p.name for p in mine.iterdir()}

    wip = tmp_path / "wip"
    wip.mkdir()
    (wip / "mask.png").write_bytes((data / "a" / "mask.png").read_bytes())
    (wip / "prob.tif").write_text("mine")
    capsys.readouterr()
    assert predict(data, "a", wip) == 2  # PNG mode would write over mask.png
    err = capsys.readouterr().err
    assert err == (f"error: --out: {wip} holds mask.png, not written by a scrollsam prediction, "
                   f"which this one would replace; choose another --out\n"), err
    assert predict(data, "a", wip, "--format", "zarr") == 0  # writes no mask.png, removes none
    assert (wip / "mask.png").read_bytes() == (data / "a" / "mask.png").read_bytes()
    assert (wip / "prob.tif").read_text() == "mine"


def test_a_prediction_killed_while_writing_is_replaced_by_the_next(data, tmp_path):
    """A PNG prediction killed after prob.png, before its record: the folder still counts as a
    prediction's (prob.png is written first), so the rerun replaces it."""
    out = tmp_path / "out"
    assert predict(data, "a", out) == 0
    (out / ".prediction.json").unlink()
    (out / "overlay.png").unlink()
    assert predict(data, "b", out) == 0  # a's metrics.json goes: b has no labels
    assert sorted(p.name for p in out.iterdir()) == [".prediction.json", "mask.png",
                                                     "overlay.png", "prob.png"]


def test_an_unwritable_out_or_submission_folder_is_refused_before_any_work(data, tmp_path,
                                                                          capsys, monkeypatch):
    """Before: the refusal came after the whole prediction (QA: `--submission` into a folder
    without write permission)."""
    import subprocess

    from scrollsam.infer.predict import Predictor

    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    monkeypatch.setattr(Predictor, "predict_rows", lambda *a, **k: pytest.fail("predicted"))
    try:
        for args, said in (([str(locked / "out")], f"error: --out: cannot write into {locked} "),
                           ([str(tmp_path / "out"), "--submission", str(locked / "s.csv")],
                            f"error: --submission: cannot write into {locked} ")):
            capsys.readouterr()
            assert predict(data, "a", Path(args[0]), *args[1:]) == 2
            assert capsys.readouterr().err.startswith(said)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_a_submission_that_is_a_link_to_nothing_needs_force_before_any_work(data, tmp_path,
                                                                             capsys, monkeypatch):
    """Before: refused by write_submission only after the whole prediction (QA)."""
    from scrollsam.infer.predict import Predictor

    link = tmp_path / "s.csv"
    link.symlink_to(tmp_path / "nowhere.csv")
    monkeypatch.setattr(Predictor, "predict_rows", lambda *a, **k: pytest.fail("predicted"))
    assert predict(data, "a", tmp_path / "out", "--submission", str(link)) == 2
    assert capsys.readouterr().err == (f"error: --submission: {link} exists (a link); pass "
                                       f"--force to overwrite it\n")


def test_a_space_file_that_is_not_a_file_says_what_it_is(tmp_path):
    from scrollsam.config import load_config
    from scrollsam.errors import ConfigError
    from scrollsam.sweep.space import load_space

    with pytest.raises(ConfigError, match=r"^expected a space file, got a device or other "
                                          r"special file \(/dev/null\)$"):
        load_space("/dev/null", load_config(None, []))


def test_an_out_that_is_a_link_to_nowhere_or_lies_under_a_file_is_refused_before_any_work(
        data, tmp_path, capsys, monkeypatch):
    """Before: FileExistsError / NotADirectoryError tracebacks after the whole prediction, and
    RuntimeError for a link loop (QA)."""
    from scrollsam.infer.predict import Predictor

    (tmp_path / "dang").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(Predictor, "predict_rows", lambda *a, **k: pytest.fail("predicted"))
    for out, said in (("dang", "is a symbolic link to nowhere"), ("loopA", "symbolic link loop"),
                      ("afile/sub", "is a file, so")):
        capsys.readouterr()
        assert predict(data, "a", tmp_path / out) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("error: --out: ") and said in err and err.count("\n") == 1, err


def test_synth_writes_a_fragment_named_near_255_bytes(tmp_path):
    """Before: its temp folder's name (.NAME.tmp-PID) was over 255 bytes: Errno 36."""
    from scrollsam.data.synthetic import write_fragment

    name = "K" * 250
    write_fragment(tmp_path / name, height=32, width=32, depth=4)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_second_prediction_into_a_busy_out_is_refused(data, tmp_path, capsys, monkeypatch):
    """Before: two predictions into one --out both ended well, their files mixed (QA: one
    fragment's prob.png beside another's mask.png, overlay.png and metrics.json)."""
    import os

    from scrollsam.infer.out_lock import OutLock
    from scrollsam.infer.predict import Predictor

    out = tmp_path / "deep" / "out"
    held = OutLock.take(out)  # another prediction, still running
    real = Predictor.predict_rows
    monkeypatch.setattr(Predictor, "predict_rows", lambda *a, **k: pytest.fail("predicted"))
    try:
        assert predict(data, "a", out) == 2
        assert capsys.readouterr().err == (f"error: --out is in use by pid {os.getpid()} "
                                           f"({out})\n")
    finally:
        held.release()
    assert not (tmp_path / "deep").exists()  # the folders it made, empty, are gone
    monkeypatch.setattr(Predictor, "predict_rows", real)
    assert predict(data, "a", out) == 0
    assert not (out / ".scrollsam-predict.lock").exists() and (out / "mask.png").is_file()
    (tmp_path / "victim.txt").write_text("mine")  # a lock file is never written through a link
    (out / ".scrollsam-predict.lock").symlink_to(tmp_path / "victim.txt")
    assert predict(data, "a", out) == 2
    assert (tmp_path / "victim.txt").read_text() == "mine"
    assert "is a symbolic link; remove it" in capsys.readouterr().err


def test_a_prediction_into_a_fragment_folder_of_a_busy_out_is_refused(data, tmp_path, capsys):
    """Before: `--fragment a --fragment b --out P` locked P only, so it cleaned and wrote P/a
    while `--fragment a --out P/a` (its own lock in P/a) was writing there too."""
    import os

    from scrollsam.infer.out_lock import OutLock

    out = tmp_path / "P"
    held = OutLock.take(out / "a")  # a single-fragment prediction into P/a, still running
    try:
        assert main(["predict", "--run", str(data / "run"), "--fragment", str(data / "a"),
                     "--fragment", str(data / "b"), "--out", str(out), "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (f"error: --out is in use by pid {os.getpid()} "
                                           f"({out / 'a'})\n")
        assert sorted(p.name for p in out.rglob("*")) == [".scrollsam-predict.lock", "a"]
    finally:
        held.release()
    assert not out.exists()
    assert main(["predict", "--run", str(data / "run"), "--fragment", str(data / "a"),
                 "--fragment", str(data / "b"), "--out", str(out), "--device", "cpu"]) == 0
    assert not list(out.rglob(".scrollsam-predict.lock"))
    assert (out / "a" / "mask.png").is_file() and (out / "b" / "mask.png").is_file()


def test_a_prediction_of_many_fragments_holds_two_folder_locks_at_a_time(data, tmp_path,
                                                                         monkeypatch):
    """Each OUT/<id> is locked while it is written: locking them all for the whole prediction
    held one open file per fragment (a thousand segments in one call pass `ulimit -n` 1024)."""
    import os

    from scrollsam.infer import pipeline

    real, seen = pipeline._predict_one, []

    def counting(*args, **kwargs):
        fds = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
        seen.append(sorted(Path(f).parent.name for f in fds
                           if f.endswith(".scrollsam-predict.lock")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_predict_one", counting)
    out = tmp_path / "P"
    assert main(["predict", "--run", str(data / "run"), "--fragment", str(data / "a"),
                 "--fragment", str(data / "b"), "--out", str(out), "--device", "cpu"]) == 0
    assert seen == [["P", "a"], ["P", "b"]]


def test_an_interrupt_while_writing_leaves_the_earlier_prediction_whole(data, tmp_path,
                                                                         monkeypatch):
    """Before: a Ctrl-C after prob.png was rewritten left the new prob.png beside the old
    mask.png, overlay.png and metrics.json (QA: of another model), and in a new folder a
    prob.png and mask.png that looked finished."""
    import scrollsam.infer.outputs as outputs

    out = tmp_path / "out"
    assert predict(data, "a", out, "--save-tif") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = outputs.write_png

    def interrupted(path, image):
        if ".mask." in Path(path).name:
            raise KeyboardInterrupt
        return real(path, image)

    monkeypatch.setattr(outputs, "write_png", interrupted)
    assert predict(data, "b", out) == 130  # the CLI's Ctrl-C
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staged file either
    assert predict(data, "b", tmp_path / "new") == 130
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_signals_during_publishing_wait_until_the_set_is_in_place(tmp_path, monkeypatch):
    import os
    import signal

    import scrollsam.infer.publish as publish

    staging = publish.Staging()
    for name in ("prob.png", "mask.png"):
        staging.path(tmp_path / name).write_text(name)
    (tmp_path / "old.json").write_text("old")
    real = os.replace

    def replace(src, dst):  # a Ctrl-C arrives right after the first rename
        real(src, dst)
        if Path(dst).name == "prob.png":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(publish.os, "replace", replace)
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *a: seen.append(
        sorted(p.name for p in tmp_path.iterdir())))
    try:
        staging.publish(remove=[tmp_path / "old.json"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [["mask.png", "prob.png"]]  # handled once, with the whole set in place


def test_a_killed_predictions_staged_and_temp_files_go_with_the_next_one(data, tmp_path):
    out = tmp_path / "out"
    assert predict(data, "a", out) == 0
    left = [".prob.staged-1a2b3c4d.png", ".metrics.tmp-00ff00ff.json", ".predict-prob.npy",
            "..prediction.staged-0123abcd.json"]
    for name in left:
        (out / name).write_text("x")
    (out / ".mine.tmp-1a2b3c4d.png").write_text("not a prediction's")
    assert predict(data, "a", out) == 0
    names = {p.name for p in out.iterdir()}
    assert not names & set(left) and ".mine.tmp-1a2b3c4d.png" in names


def test_a_folder_without_a_record_loses_only_what_its_format_writes(data, tmp_path, capsys):
    """Review: the rule for folders predicted before .prediction.json counted all eight names as
    the earlier prediction's, so the user's summary.json and prob_preview.png beside an old PNG
    prediction were removed."""
    out = tmp_path / "out"
    assert predict(data, "a", out) == 0
    (out / ".prediction.json").unlink()  # as a folder predicted before the record
    (out / "summary.json").write_text("mine")
    (out / "prob_preview.png").write_text("mine")
    assert predict(data, "b", out) == 0  # a's metrics.json goes, the user's files stay
    names = {p.name for p in out.iterdir()}
    assert {"summary.json", "prob_preview.png"} <= names and "metrics.json" not in names


def test_a_store_without_its_settings_is_not_replaced_without_restart(data, tmp_path, capsys):
    """Review: an OME-Zarr store whose .predict folder was gone was deleted and rebuilt with
    other settings, silently."""
    import shutil

    out = tmp_path / "out"
    assert predict(data, "a", out, "--format", "zarr") == 0
    shutil.rmtree(out / ".predict")
    before = sorted(p.name for p in (out / "prob.ome.zarr").rglob("*"))
    capsys.readouterr()
    assert predict(data, "a", out, "--format", "zarr", "--tile", "32") == 2
    assert "whose settings are unknown (.predict/settings.json is missing); pass --restart" in (
        capsys.readouterr().err)
    assert sorted(p.name for p in (out / "prob.ome.zarr").rglob("*")) == before
    assert predict(data, "a", out, "--format", "zarr", "--tile", "32", "--restart") == 0


def test_the_temp_files_of_staged_writes_are_stale_names_too(tmp_path):
    """Review: a kill inside a staged write leaves atomic_path's temp of the staged name
    (..prob.staged-X.tmp-Y.png), which the pattern missed."""
    from scrollsam.infer.publish import remove_stale_temps

    names = ["..prob.staged-1a2b3c4d.tmp-00ff00ff.png", "...prediction.staged-0123abcd.tmp-"
             "00000000.json", ".overlay.tmp-1a2b3c4d.png", "..prediction.tmp-01234567.json"]
    for name in [*names, ".mine.tmp-1a2b3c4d.png", "prob.png"]:
        (tmp_path / name).write_text("x")
    assert remove_stale_temps(tmp_path) == sorted(names)
