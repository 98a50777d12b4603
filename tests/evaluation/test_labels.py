"""Labelled data (``--data``): odd files, unreadable CSVs, and duplicate or conflicting listings are one
DataError naming the file (or one warning with the count), never a traceback or a double count."""

from __future__ import annotations

import csv
import os
import warnings

import pytest
from PIL import Image

from i2p.evaluation.labels import DataError, discover


def image(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)
    return str(path)


def write_csv(path, rows, header=("path", "label")) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_data_is_a_clear_error(kind: str, tmp_path) -> None:
    if kind == "fifo":
        src = tmp_path / "data"
        os.mkfifo(src)
    else:
        src = "/dev/null"
    with pytest.raises(DataError, match=f"^{src}: not a folder or a regular file"):
        discover(src)


def test_a_csv_field_over_the_limit_names_file_and_line(tmp_path) -> None:
    image(tmp_path / "a.png")
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.png,real\n" + "x" * 200_000 + ",fake\n")
    with pytest.raises(
        DataError, match=r"m\.csv, near line 3: not a readable CSV row .*field larger than field limit"
    ):
        discover(path)
    path.write_text("path,label\na.png,re\x00al\n")
    with pytest.raises(DataError, match=r"m\.csv, (near )?line \d: "):
        discover(path)


@pytest.mark.parametrize(
    "data",
    [
        b"path,label\na.png,real\n\xff\xfe.png,fake\n",
        b"\xff\xfepath,label\n",
        b"path,label\n" + "é".encode("latin-1") + b".png,real\n",
    ],
)
def test_a_non_utf8_csv_names_the_file(data: bytes, tmp_path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{path}, near line \d+: not UTF-8 text"):
        discover(path)


def test_one_file_labelled_real_and_fake_is_an_error_naming_it(tmp_path) -> None:
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    for rows in (
        [("a.png", "real"), ("b.png", "real"), ("a.png", "fake")],
        [("./a.png", "0"), ("sub/../a.png", "1")],
    ):
        (tmp_path / "sub").mkdir(exist_ok=True)
        path = write_csv(tmp_path / "m.csv", rows)
        with pytest.raises(
            DataError,
            match=r"1 file\(s\) labelled both real and fake: .*a\.png \(real\) and .*a\.png \(fake\)",
        ):
            discover(path)


def test_a_symlink_into_the_other_class_folder_is_a_conflict(tmp_path) -> None:
    image(tmp_path / "d" / "0_real" / "a.png")
    image(tmp_path / "d" / "1_fake" / "b.png")
    os.symlink(tmp_path / "d" / "0_real" / "a.png", tmp_path / "d" / "1_fake" / "a_link.png")
    with pytest.raises(DataError, match="labelled both real and fake"):
        discover(tmp_path / "d")


def test_exact_duplicates_count_once_with_a_warning_saying_how_many(tmp_path) -> None:
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    rows = [("a.png", "fake"), ("b.png", "real")] * 3 + [("./a.png", "1"), (str(tmp_path / "b.png"), "0")]
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.warns(UserWarning, match="6 duplicate listing"):
        samples = discover(path)
    assert sorted((s.path.name, s.label) for s in samples) == [("a.png", 1), ("b.png", 0)]


def test_a_symlink_to_a_file_of_the_same_class_counts_once(tmp_path) -> None:
    image(tmp_path / "d" / "1_fake" / "a.png")
    image(tmp_path / "d" / "0_real" / "r.png")
    os.symlink(tmp_path / "d" / "1_fake" / "a.png", tmp_path / "d" / "1_fake" / "same.png")
    with pytest.warns(UserWarning, match="1 duplicate listing"):
        assert len(discover(tmp_path / "d")) == 2


def test_no_warning_without_duplicates(tmp_path) -> None:
    image(tmp_path / "a.png")
    path = write_csv(tmp_path / "m.csv", [("a.png", "1")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(discover(path)) == 1


def test_no_readable_validation_image_is_said_naming_the_split(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from i2p.runtime.preprocess import PreprocessSpec
    from i2p.train import data as data_mod
    from i2p.train.checkpoint_scoring import eval_loader, predict
    from i2p.train.config import TrainConfig
    from i2p.train.distributed import Placement

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    samples = [data_mod.Sample(bad, 1, "g")] * 3
    loader = eval_loader(
        samples, PreprocessSpec(size=16), TrainConfig(data=str(tmp_path), batch_size=2, workers=0)
    )
    with pytest.raises(DataError, match=r"^validation split: no image could be read \(3 listed"):
        predict(torch.nn.Flatten(), loader, Placement(torch.device("cpu")), desc="validation split")
