"""Layout scan errors, the synthetic writer, verify (--fix) and prepare-val, through the CLI where it matters."""

from __future__ import annotations

import csv
import filecmp
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_check import check_image
from pipeline.data.layout import DataLayoutError, scan_imagenet
from pipeline.data.prep import cli
from pipeline.data.prep.synth import MARKER, write_synthetic_imagenet
from pipeline.data.prep.verify import prepare_val, undo_prepare_val, verify_images


def _jpeg(path: Path, size=(40, 30), colour=(200, 30, 30), mode="RGB", fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode != "CMYK" else (0, 200, 200, 0)).save(path, format=fmt)
    return path


def _layout(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    for split, counts in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for cls, n in counts.items():
            (root / split / cls).mkdir(exist_ok=True)
            for i in range(n):
                _jpeg(root / split / cls / f"{cls}_{i}.JPEG")
    return root


# ---------------------------------------------------------------- scan_imagenet


def test_scan_sorted_and_case_insensitive(tmp_path):
    root = _layout(tmp_path, {"b": 2, "a": 3}, {"a": 1, "b": 1})
    _jpeg(root / "train" / "a" / "upper.JPG")
    _jpeg(root / "train" / "a" / "lower.jpeg")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    index = scan_imagenet(root)
    assert index.classes == ("a", "b")
    assert len(index.train_files) == 7 and index.train_labels == (0,) * 5 + (1,) * 2
    assert list(index.train_files[:5]) == sorted(index.train_files[:5])
    assert index.val_labels == (0, 1)
    assert scan_imagenet(root) == index  # deterministic


@pytest.mark.parametrize(
    "setup, expect",
    [
        (lambda r: r / "nope", ["nope", "does not exist"]),
        (
            lambda r: (_layout(r, {"a": 1}, {"a": 1}), os.rename(r / "train", r / "x"))[0],
            ["train", "missing"],
        ),
        (lambda r: (_layout(r, {"a": 1}, {"a": 1}), os.rename(r / "val", r / "x"))[0], ["val", "missing"]),
        (lambda r: _layout(r, {}, {"a": 1}), ["train", "no class folders"]),
        (lambda r: _layout(r, {"a": 1, "empty_cls": 0}, {"a": 1}), ["empty_cls", "holds no images"]),
        (lambda r: _layout(r, {"a": 1}, {"a": 1, "stray": 1}), ["stray", "not a train class"]),
        (lambda r: _layout(r, {"a": 1}, {"a": 0}), ["'a'", "holds no images"]),
    ],
)
def test_scan_errors_name_the_problem(tmp_path, setup, expect):
    root = setup(tmp_path)
    with pytest.raises(DataLayoutError) as e:
        scan_imagenet(root)
    for word in expect:
        assert word in str(e.value), str(e.value)


def test_scan_flat_val_says_prepare_val(tmp_path):
    root = _layout(tmp_path, {"a": 1}, {})
    _jpeg(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataLayoutError, match="python -m pipeline data prepare-val"):
        scan_imagenet(root)


def test_check_layout_cli(tmp_path, capsys):
    root = _layout(tmp_path / "ok", {"a": 2, "b": 1}, {"a": 1})
    assert cli.main(["check-layout", str(root)]) == 0
    assert "2 classes, 3 train images, 1 val images" in capsys.readouterr().out
    assert cli.main(["check-layout", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- synthetic ImageNet


def test_synth_deterministic_varied_and_atomic(tmp_path, capsys):
    args = ["synth", "--classes", "3", "--train-per-class", "3", "--val-per-class", "2", "--seed", "7"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / MARKER).is_file()
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 15
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)  # same seed, same bytes
    index = scan_imagenet(a)
    assert index.classes == ("n00000000", "n00000001", "n00000002")
    sizes = []
    for f in index.train_files + index.val_files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
    assert all(190 <= min(s) <= 510 and max(s) / min(s) <= 16 / 9 + 0.02 for s in sizes)
    assert len(set(sizes)) > 10 and any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    # Re-running with the same arguments is a no-op; other arguments need --force.
    assert cli.main([*args, "--out", str(a)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main([*args[:-1], "8", "--out", str(a)]) == 2
    assert "--force" in capsys.readouterr().err
    other = write_synthetic_imagenet(a, 2, 1, 1, seed=0, workers=1, force=True)
    assert other["train"] == 2 and len(list(a.rglob("*.JPEG"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_synth_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        write_synthetic_imagenet(tmp_path, 2, 1, 1, seed=0, workers=1)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_synth_interrupted_leaves_nothing(tmp_path, monkeypatch):
    from pipeline.data.prep import synth

    calls = []
    real = synth._write_one

    def failing(task):
        calls.append(task)
        if len(calls) == 3:  # as if Ctrl-C arrived mid-run
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(synth, "_write_one", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_imagenet(tmp_path / "out", 2, 3, 1, seed=0, workers=1)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp folder


def test_synth_classes_learnable_by_colour_alone():
    """A sanity check that class identity is in the pixels: mean hue inside the object differs
    across classes. (Learnability by a ResNet is the lead's end-to-end training test.)"""
    from pipeline.data.prep.synth import _class_style

    hues = [_class_style(c)["hue"] for c in range(10)]
    gaps = [abs(a - b) for i, a in enumerate(hues) for b in hues[i + 1 :]]
    assert min(min(g, 1 - g) for g in gaps) > 0.03
    assert len({_class_style(c)["shape"] for c in range(10)}) == 10


# ---------------------------------------------------------------- verify


@pytest.fixture
def bad_root(tmp_path) -> Path:
    root = _layout(tmp_path / "data", {"a": 2, "b": 2}, {"a": 1, "b": 1})
    good = (root / "train" / "a" / "a_0.JPEG").read_bytes()
    (root / "train" / "a" / "empty.JPEG").write_bytes(b"")
    big = root / "train" / "b" / "big.JPEG"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(big, quality=90)
    (root / "train" / "b" / "truncated.JPEG").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    (root / "val" / "a" / "garbage.JPEG").write_bytes(b"this is not an image at all" * 10)
    _jpeg(root / "val" / "b" / "png_named.JPEG", fmt="PNG")
    _jpeg(root / "train" / "a" / "cmyk.JPEG", mode="CMYK")
    assert check_image(root / "train" / "a" / "a_0.JPEG") is None and good
    return root


EXPECTED = {
    "train/a/empty.JPEG": "empty",
    "train/b/truncated.JPEG": "truncated",
    "val/a/garbage.JPEG": "undecodable",
    "val/b/png_named.JPEG": "png",
    "train/a/cmyk.JPEG": "cmyk",
}


def test_verify_finds_every_planted_file(bad_root, capsys):
    report = verify_images(bad_root, workers=2)
    assert {p.path: p.kind for p in report.problems} == EXPECTED
    assert report.checked == 12 and report.remaining == 5
    assert cli.main(["verify", str(bad_root), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted(EXPECTED)
    assert cli.main(["verify", str(bad_root), "--json", "--workers", "1"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["remaining"] == 5 and {p["path"] for p in data["problems"]} == set(EXPECTED)


def test_verify_fix_repairs_or_quarantines(bad_root, capsys):
    originals = {rel: (bad_root / rel).read_bytes() for rel in EXPECTED}
    assert cli.main(["verify", str(bad_root), "--fix", "--workers", "2"]) == 0
    capsys.readouterr()
    for rel in ("val/b/png_named.JPEG", "train/a/cmyk.JPEG"):  # rewritten in place, as RGB JPEG
        with Image.open(bad_root / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
        assert (bad_root / ".quarantine" / "originals" / rel).read_bytes() == originals[rel]
    for rel in ("train/a/empty.JPEG", "train/b/truncated.JPEG", "val/a/garbage.JPEG"):  # moved, not deleted
        assert not (bad_root / rel).exists()
        assert (bad_root / ".quarantine" / rel).read_bytes() == originals[rel]
    manifest = [json.loads(x) for x in (bad_root / ".quarantine" / "manifest.jsonl").read_text().splitlines()]
    assert {m["path"]: m["action"] for m in manifest} == {
        rel: ("rewritten" if kind in ("png", "cmyk") else "quarantined") for rel, kind in EXPECTED.items()
    }
    assert cli.main(["verify", str(bad_root)]) == 0  # clean now; the quarantine is not scanned
    assert len(scan_imagenet(bad_root).train_files) == 6


# ---------------------------------------------------------------- prepare-val


def _flat_val(tmp_path: Path, n: int = 6) -> tuple[Path, dict[str, str]]:
    val = tmp_path / "val"
    truth = {}
    for i in range(1, n + 1):
        name = f"ILSVRC2012_val_{i:08d}"
        _jpeg(val / f"{name}.JPEG")
        truth[name] = ["n01440764", "n02119789", "n09999999"][i % 3]
    return val, truth


def test_prepare_val_csv_and_undo(tmp_path, capsys):
    val, truth = _flat_val(tmp_path)
    labels = tmp_path / "LOC_val_solution.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for name, wnid in reversed(truth.items()):
            w.writerow([name, f"{wnid} 1 2 30 40 {wnid} 5 6 7 8"])
    before = sorted(p.name for p in val.iterdir())
    assert cli.main(["prepare-val", "--val", str(val), "--labels", str(labels)]) == 0
    assert "moved 6 images into 3 class folders" in capsys.readouterr().out
    for name, wnid in truth.items():
        assert (val / wnid / f"{name}.JPEG").is_file()
    # Twice is refused; undo restores the flat folder exactly.
    assert cli.main(["prepare-val", "--val", str(val), "--labels", str(labels)]) == 2
    assert "already prepared" in capsys.readouterr().err
    assert cli.main(["prepare-val", "--val", str(val), "--undo"]) == 0
    assert sorted(p.name for p in val.iterdir()) == before


def test_prepare_val_devkit_ground_truth(tmp_path):
    val, truth = _flat_val(tmp_path)
    synsets = ["n02119789", "n09999999", "n01440764"]  # the devkit's id order is not sorted
    (tmp_path / "synsets.txt").write_text("\n".join(synsets) + "\n")
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("\n".join(str(synsets.index(w) + 1) for w in truth.values()) + "\n")
    with pytest.raises(DataLayoutError, match="--synsets"):
        prepare_val(val, gt)
    assert prepare_val(val, gt, synsets=tmp_path / "synsets.txt") == (6, 3)
    assert all((val / w / f"{n}.JPEG").is_file() for n, w in truth.items())
    assert undo_prepare_val(val) == 6


def test_prepare_val_refuses_wrong_count(tmp_path):
    val, truth = _flat_val(tmp_path)
    gt = tmp_path / "map.txt"
    gt.write_text("".join(f"{n}.JPEG {w}\n" for n, w in list(truth.items())[:-1]))  # one label short
    with pytest.raises(DataLayoutError, match="6 images but 5 labels"):
        prepare_val(val, gt)
    assert len(list(val.glob("*.JPEG"))) == 6  # nothing moved


def test_prepare_val_rejects_sorted_synsets_for_devkit_ids(tmp_path):
    val, _ = _flat_val(tmp_path, 1)
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"n{i:08d} name\n" for i in range(1000)))
    (tmp_path / "gt.txt").write_text("1\n")
    with pytest.raises(DataLayoutError, match="meta.mat"):
        prepare_val(val, tmp_path / "gt.txt", synsets=tmp_path / "LOC_synset_mapping.txt")
