"""`scrollsam predict` never writes into, or over, the fragments it reads.

Each refusal comes before any work (no model loaded, nothing written), exit code 2, one line;
every file of every input fragment is unchanged afterwards. Tiny model, small fragments.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from infer_helpers import make_run

from scrollsam.cli import main
from scrollsam.data.convert import convert_fragment
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import InputError
from scrollsam.infer.out_safety import check_clear_of_inputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    write_fragment(root / "src" / "a", height=40, width=36, depth=6, seed=11)
    write_fragment(root / "src" / "b", height=36, width=40, depth=6, seed=12)
    make_run(root / "run", "data.input=ir", best=0.4, image_size=32)
    return root


@pytest.fixture
def vic(data, tmp_path):
    """Fresh copies of fragments a and b in ``tmp_path/vic``."""
    for name in ("a", "b"):
        shutil.copytree(data / "src" / name, tmp_path / "vic" / name, symlinks=True)
    return tmp_path / "vic"


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (links followed) and its MD5."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def predict(data: Path, *args: str) -> int:
    return main(["predict", "--run", str(data / "run"), "--device", "cpu", *args])


def refused(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err
    return err[0]


@pytest.mark.parametrize("fmt", ["png", "zarr"])
@pytest.mark.parametrize("case, out, words", [
    # before: mask.png of both fragments became the prediction
    ("parent_of_several", "vic", ["must differ from the fragment folder", "a's outputs",
                                   "into its own folder"]),
    ("the_fragment", "vic/a", ["must differ from the fragment folder", "into its own folder"]),
    ("inside_the_fragment", "vic/a/pred", ["must lie outside", "inside its own folder"]),
    ("several_into_one_fragment", "vic/a", ["must lie outside", "inside its own folder"]),
    ("inside_the_other_fragment", "vic/b/pred", ["must lie outside",
                                                 "inside fragment b's folder"]),
])
def test_out_in_a_fragment_folder_is_refused_before_any_work(data, vic, capsys, fmt, case, out,
                                                             words):
    frags = ["vic/a", "vic/b"] if case in ("parent_of_several", "several_into_one_fragment",
                                           "inside_the_other_fragment") else ["vic/a"]
    before = {f: digest(vic.parent / f) for f in ("vic/a", "vic/b")}
    root = vic.parent
    args = [x for f in frags for x in ("--fragment", str(root / f))]
    code = predict(data, *args, "--out", str(root / out), "--format", fmt)
    refused(capsys, code, "--out:", *words)
    assert {f: digest(root / f) for f in before} == before
    assert not (root / "vic/a/pred").exists() and not (root / "vic/b/pred").exists()


def test_symlinks_are_followed_to_the_fragment(data, vic, tmp_path, capsys):
    before = digest(vic / "a")
    (tmp_path / "link").symlink_to(vic / "a", target_is_directory=True)
    code = predict(data, "--fragment", str(vic / "a"), "--out", str(tmp_path / "link"))
    refused(capsys, code, "--out: must differ from the fragment folder")
    # the fragment given through the link, the output as the real folder
    code = predict(data, "--fragment", str(tmp_path / "link"), "--out", str(vic / "a" / "x"))
    refused(capsys, code, "--out: must lie outside")
    assert digest(vic / "a") == before


def test_out_inside_a_volume_folder_kept_elsewhere_is_refused(data, vic, tmp_path, capsys):
    volume = tmp_path / "volumes" / "a"
    shutil.move(vic / "a" / "surface_volume", volume)
    (vic / "a" / "surface_volume").symlink_to(volume, target_is_directory=True)
    before = digest(volume)
    code = predict(data, "--fragment", str(vic / "a"), "--out", str(volume))
    refused(capsys, code, "--out: must lie outside", "inside its own volume")
    assert digest(volume) == before and not (volume / "prob.tif").exists()


def test_out_that_holds_a_fragment_file_through_a_link_is_refused(data, vic, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    shutil.move(vic / "a" / "mask.png", out / "mask.png")  # the fragment's mask lives in out
    (vic / "a" / "mask.png").symlink_to(out / "mask.png")
    before = digest(vic / "a")
    code = predict(data, "--fragment", str(vic / "a"), "--out", str(out))
    refused(capsys, code, "--out: must not hold", "its own mask.png", str(out / "mask.png"))
    assert digest(vic / "a") == before


def test_submission_inside_a_fragment_or_on_its_file_is_refused(data, vic, tmp_path, capsys):
    before = digest(vic / "a")
    out = str(tmp_path / "pred")
    code = predict(data, "--fragment", str(vic / "a"), "--out", out, "--submission",
                   str(vic / "a" / "submission.csv"))
    refused(capsys, code, "--submission: must lie outside", "fragment a's folder")
    elsewhere = tmp_path / "labels.png"
    shutil.move(vic / "a" / "inklabels.png", elsewhere)
    (vic / "a" / "inklabels.png").symlink_to(elsewhere)
    code = predict(data, "--fragment", str(vic / "a"), "--out", out, "--submission",
                   str(elsewhere), "--force")
    refused(capsys, code, "--submission: would overwrite", "a's inklabels.png")
    assert digest(vic / "a") == before and not (tmp_path / "pred").exists()


def test_out_beside_one_fragment_still_works_and_leaves_it_whole(data, vic, capsys):
    before = digest(vic / "a")
    assert predict(data, "--fragment", str(vic / "a"), "--out", str(vic)) == 0
    assert digest(vic / "a") == before
    assert (vic / "mask.png").is_file() and (vic / "prob.png").is_file()


def relayout(folder: Path, layout: str) -> None:
    """Turn the Kaggle fragment ``folder`` (TIFF slices) into ``layout``: ``kaggle`` or
    ``segment`` names, ``tiff`` or ``zarr`` volume, e.g. ``segment-zarr``."""
    names, volume = layout.split("-")
    if volume == "zarr":
        copy = folder.with_name(folder.name + ".zarr-copy")
        convert_fragment(folder, copy)
        shutil.rmtree(folder)
        copy.rename(folder)
    if names == "segment":
        for stem in ("mask", "inklabels"):
            (folder / f"{stem}.png").rename(folder / f"{folder.name}_{stem}.png")
        old = "surface_volume.zarr" if volume == "zarr" else "surface_volume"
        (folder / old).rename(folder / old.replace("surface_volume", "layers"))
    Fragment(folder).close()  # still a fragment folder


@pytest.mark.parametrize("layout", ["kaggle-tiff", "segment-tiff", "kaggle-zarr",
                                    "segment-zarr"])
def test_out_in_a_fragment_folder_not_predicted_is_refused(data, vic, tmp_path, capsys,
                                                            layout):
    # Before: a copy of a (convert keeps folder names) predicted into vic, or into vic/a,
    # replaced the original a's mask.png with the prediction's; only inputs were compared.
    relayout(vic / "a", layout)
    relayout(vic / "b", layout)
    for name in ("a", "b"):
        shutil.copytree(data / "src" / name, tmp_path / "copy" / name)
    before = {name: digest(vic / name) for name in ("a", "b")}
    copies = [x for name in ("a", "b") for x in ("--fragment", str(tmp_path / "copy" / name))]
    volume = "layers" if layout.startswith("segment") else "surface_volume"
    volume += ".zarr" if layout.endswith("zarr") else "/"
    for args, out, where, host in [
            (copies[:2], vic / "a", "into", "a"),  # OUT is the original's folder
            (copies, vic, "into", "a"),  # OUT/a is
            (copies[:2], vic / "b" / "pred", "inside", "b"),
            (copies, vic / "b" / "pred", "inside", "b")]:
        code = predict(data, *args, "--out", str(out))
        refused(capsys, code, "--out: must lie outside every fragment folder, predicted or not",
                f"would be written {where} fragment folder {vic / host}, which holds {volume}",
                f"({out if args == copies[:2] else out / 'a'})")
    assert {name: digest(vic / name) for name in ("a", "b")} == before
    assert not (vic / "b" / "pred").exists()


@pytest.mark.parametrize("layout", ["kaggle-tiff", "segment-zarr"])
def test_submission_in_a_fragment_folder_not_predicted_is_refused(data, vic, tmp_path, capsys,
                                                                  layout):
    # Before: --submission OTHER/mask.png --force replaced fragment OTHER's mask with a CSV.
    relayout(vic / "b", layout)
    before = digest(vic / "b")
    mask = vic / "b" / ("mask.png" if layout.startswith("kaggle") else "b_mask.png")
    volume = "surface_volume/" if layout.startswith("kaggle") else "layers.zarr"
    code = predict(data, "--fragment", str(vic / "a"), "--out", str(tmp_path / "pred"),
                   "--submission", str(mask), "--force")
    refused(capsys, code, "--submission: must lie outside every fragment folder",
            f"inside fragment folder {vic / 'b'}, which holds {volume} ({mask})")
    assert digest(vic / "b") == before and not (tmp_path / "pred").exists()


def fake_fragment(folder: Path) -> SimpleNamespace:
    """What the --out check reads of a segment-layout fragment of 65 slices (nothing on disk)."""
    return SimpleNamespace(
        id=folder.name, path=folder, volume_path=folder / "layers",
        slice_paths=[folder / "layers" / f"{z:02d}.tif" for z in range(65)],
        mask_path=folder / f"{folder.name}_mask.png",
        labels_path=folder / f"{folder.name}_inklabels.png", ir_path=None)


def test_the_out_check_of_many_fragments_takes_well_under_a_second_each(tmp_path):
    # Before: every output folder against every fragment's 69 paths, each tested with
    # `folder in path.parents`: 50 fragments took 10 s, 200 took 138 s, 300 would take minutes.
    # Now about linear: 300 fragments in a fraction of a second; 30 s leaves room for a busy CPU.
    frags = [fake_fragment(tmp_path / "segments" / f"2023{i:06d}") for i in range(300)]

    def too_slow(*_: object) -> None:
        raise TimeoutError("the --out check of 300 fragments took over 30 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        check_clear_of_inputs(frags, tmp_path / "preds", tmp_path / "submission.csv")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(InputError, match="inside fragment 2023000299's folder"):
        check_clear_of_inputs(frags, frags[-1].path / "pred", None)  # still checked


def test_a_folder_counts_as_a_fragment_only_with_a_real_volume(tmp_path):
    # Before: any layers/ or surface_volume/ folder, or anything named like a store, made its
    # parent a fragment: a Python project with a layers/ package refused every run dir in it.
    from scrollsam.data.fragment_hosts import fragment_holding

    project = tmp_path / "project"
    (project / "layers").mkdir(parents=True)
    (project / "layers" / "__init__.py").write_text("")
    (project / "surface_volume.zarr").write_text("not a store")
    assert fragment_holding(project / "runs" / "x") is None
    (project / "layers" / "00.tif").write_bytes(b"")
    assert fragment_holding(project / "runs" / "x") == (project.resolve(), "layers/")
    store = tmp_path / "frag" / "layers.zarr"
    store.mkdir(parents=True)
    assert fragment_holding(tmp_path / "frag" / "out") is None
    (store / "zarr.json").write_text("{}")
    assert fragment_holding(tmp_path / "frag" / "out") == ((tmp_path / "frag").resolve(),
                                                           "layers.zarr")
