"""prepare's safety: it replaces only folders it built, keeps the tones of 16-bit and other image modes, turns
photos upright by their EXIF orientation, and rejects names that are not UTF-8 and links to nothing instead of
failing."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, PrepareConfig
from pipeline.data.prepare import _swap_in, check_out, prepare
from pipeline.data.prepared import MARKER
from pipeline.data.shards import ShardReader

REPO = Path(__file__).parents[1]


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--workers", "1", *args],
                          check=False, capture_output=True, text=True, cwd=cwd)


def _snapshot(folder: Path) -> dict[str, str | None]:
    """Every entry under `folder` (hidden ones included) with its bytes' hash, None for a folder."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _save(img: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def _tree(root: Path, train: Image.Image, name: str = "x.png", **kwargs) -> Path:
    """An ImageFolder tree: `train` as train/a/`name`, and a small grey image to validate on."""
    _save(train, root / "train" / "a" / name, **kwargs)
    _save(Image.new("RGB", (16, 16), (128, 128, 128)), root / "val" / "a" / "v.png")
    return root


def _prepared(out: Path, src: str) -> tuple[np.ndarray, dict[str, str]]:
    """Pixels of the prepared copy of `src` and its manifest row."""
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f) if r["path"] == src)
    with Image.open(io.BytesIO(ShardReader(out).read(row["shard"], int(row["offset"]), int(row["size"])))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64), row


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for split in ("train", "val"):
        for i in range(2):
            _save(Image.new("RGB", (20, 16), (40 * i, 100, 200)), root / split / "a" / f"{i}.jpg", quality=90)
    return root


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A folder prepare did not build: files, a hidden file and a subfolder."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me\n")
    (folder / ".hidden").write_bytes(bytes(range(256)))
    (folder / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 not really a photo")
    return folder


@pytest.mark.slow
def test_cli_refuses_an_out_folder_it_did_not_build(small_tree: Path, user_folder: Path, tmp_path: Path):
    before, around = _snapshot(user_folder), sorted(p.name for p in tmp_path.iterdir())
    run = _cli("--source", "imagefolder", "--root", str(small_tree), "--out", str(user_folder))
    assert run.returncode == 2, run.stderr
    assert f"error: out: got '{user_folder.resolve()}'" in run.stderr
    assert f"prepare did not write (no {MARKER})" in run.stderr and "an empty folder" in run.stderr
    assert _snapshot(user_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == around  # no staging folder either: refused before work


@pytest.mark.slow
def test_cli_refuses_a_file_and_a_path_that_resolves_onto_a_user_folder(small_tree: Path, user_folder: Path):
    before = _snapshot(user_folder)
    for out, found in ((user_folder / "notes.txt", "found a file"),
                       (user_folder / "sub" / "..", f"no {MARKER}")):
        run = _cli("--source", "imagefolder", "--root", str(small_tree), "--out", str(out))
        assert run.returncode == 2 and found in run.stderr and str(out.resolve()) in run.stderr
    assert _snapshot(user_folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("out,found", [(".", "the working folder"), ("..", "a parent of the working folder")])
def test_cli_refuses_the_working_folder_and_its_parents(tmp_path: Path, out: str, found: str):
    checkout = tmp_path / "checkout"
    (checkout / ".git" / "objects").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / "train.py").write_text("print('hi')\n")
    (checkout / MARKER).write_text("even a marker does not make the working folder replaceable\n")
    before = _snapshot(tmp_path)
    run = _cli("--source", "builtin", "--out", out, cwd=checkout)
    assert run.returncode == 2 and f"found {found}" in run.stderr, run.stderr
    assert _snapshot(tmp_path) == before


def test_the_filesystem_root_and_the_home_folder_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    home.mkdir()  # empty, so only its being the home folder refuses it
    home = home.resolve()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    with pytest.raises(ConfigError, match="the working folder"):
        check_out(home)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the home folder"):
        check_out(home)
    with pytest.raises(ConfigError, match="a parent of the working folder"):
        check_out(Path("/"))
    check_out(tmp_path / "new")


@pytest.mark.slow
def test_rerun_onto_its_own_output_or_an_empty_folder_is_byte_identical(small_tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    first = _cli("--source", "imagefolder", "--root", str(small_tree), "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = _snapshot(out)
    assert MARKER in before
    assert [p for p in before if p.endswith(".tar")] == ["shards/train-00000.tar", "shards/val-00000.tar"]
    again = _cli("--source", "imagefolder", "--root", str(small_tree), "--out", str(out), "--workers", "2")  # last wins
    assert again.returncode == 0, again.stderr
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # the old copy was deleted


def test_the_swap_checks_again(user_folder: Path, tmp_path: Path):
    """`out` may have been filled while the images were converted: the swap itself refuses to replace it."""
    built = tmp_path / "built"
    built.mkdir()
    (built / MARKER).write_text("new\n")
    before = _snapshot(user_folder)
    with pytest.raises(ConfigError, match=f"no {MARKER}"):
        _swap_in(built, user_folder.resolve())
    assert _snapshot(user_folder) == before and (built / MARKER).is_file()


def test_a_16_bit_gradient_keeps_its_tones(tmp_path: Path):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    root = _tree(tmp_path / "src", Image.fromarray(gradient))
    with Image.open(root / "train" / "a" / "x.png") as img:
        assert img.mode == "I;16"  # what Pillow reads back from a 16-bit grey PNG
    out = tmp_path / "out"
    prepare(PrepareConfig(source="imagefolder", root=str(root), out=str(out), resize=32), workers=1)
    pixels, _ = _prepared(out, "train/a/x.png")
    assert abs(pixels.mean() - 127.5) < 1.5
    assert pixels[:, :2].mean() < 12 and pixels[:, -2:].mean() > 243  # still black to white, left to right


RED, BLUE = (220, 30, 30), (30, 30, 220)


def _halves(mode: str) -> Image.Image:
    """Left half red, right half blue, in `mode`."""
    img = Image.new("RGB", (32, 32), BLUE)
    img.paste(RED, (0, 0, 16, 32))
    return img.convert(mode)


GREY = np.asarray(_halves("L"), dtype=np.float64)
MODES = {  # an image in each mode, the file it is saved as, and what its 8-bit RGB reading is (None: Pillow's)
    "RGBA": (_halves("RGBA"), "x.png", None),
    "P": (_halves("P"), "x.png", None),
    "CMYK": (_halves("CMYK"), "x.tif", None),
    "L": (_halves("L"), "x.png", None),
    "1": (_halves("1"), "x.png", None),
    "LA": (_halves("LA"), "x.png", None),
    "I": (Image.fromarray(GREY.astype(np.int32) * 257), "x.tif", GREY),  # 0..65535
    "F": (Image.fromarray((GREY / 255).astype(np.float32)), "x.tif", GREY),  # 0..1
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_keeps_its_colours(tmp_path: Path, mode: str):
    img, name, grey = MODES[mode]
    root = _tree(tmp_path / "src", img, name)
    with Image.open(root / "train" / "a" / name) as saved:
        assert saved.mode == mode
        expected = np.asarray(saved.convert("RGB"), dtype=np.float64) if grey is None else grey[..., None]
    out = tmp_path / "out"
    prepare(PrepareConfig(source="imagefolder", root=str(root), out=str(out), resize=16), workers=1)
    pixels, _ = _prepared(out, f"train/a/{name}")
    for cols in (slice(0, 6), slice(10, 16)):  # each half, away from the middle where they blur into each other
        source = expected[:, cols.start * 2:cols.stop * 2].mean((0, 1))
        assert np.abs(pixels[:, cols].mean((0, 1)) - source).max() < 8, (cols, source)


@pytest.mark.parametrize("orientation,band", [(1, "top"), (3, "bottom"), (6, "right"), (8, "left")])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, band: str):
    stored = Image.new("RGB", (160, 96), BLUE)  # landscape as stored; 6 and 8 make it portrait
    stored.paste(RED, (0, 0, 160, 24))  # a red band along the stored top edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    root = _tree(tmp_path / "src", stored, "photo.jpg", quality=95, exif=exif)
    out = tmp_path / "out"
    prepare(PrepareConfig(source="imagefolder", root=str(root), out=str(out), resize=24), workers=1)
    pixels, row = _prepared(out, "train/a/photo.jpg")
    turned = orientation in (6, 8)
    assert (int(row["orig_width"]), int(row["orig_height"])) == ((96, 160) if turned else (160, 96))
    assert pixels.shape[:2] == ((40, 24) if turned else (24, 40))  # (rows, columns): short side 24, upright
    edges = {"top": pixels[:2], "bottom": pixels[-2:], "left": pixels[:, :2], "right": pixels[:, -2:]}
    for edge, strip in edges.items():
        red = strip[..., 0].mean() > 150 and strip[..., 2].mean() < 100
        assert red == (edge == band), edge


@pytest.mark.slow
def test_a_dangling_symlink_is_rejected_and_counted_not_fatal(small_tree: Path, tmp_path: Path):
    (small_tree / "train" / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (small_tree / "train" / "a" / "linked.jpg").symlink_to(small_tree / "val" / "a" / "0.jpg")
    out = tmp_path / "out"
    run = _cli("--source", "imagefolder", "--root", str(small_tree), "--out", str(out))
    assert run.returncode == 0 and "1 rejected" in run.stderr, run.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejected"] == [{"path": "train/a/gone.jpg", "reason": "unreadable file: broken symbolic link"}]
    assert stats["counts"]["train"]["images"] == 3  # the link that resolves is read like any file


@pytest.mark.slow
def test_names_that_are_not_utf8_are_rejected_not_fatal(tmp_path: Path):
    good = io.BytesIO()
    Image.new("RGB", (20, 16), (90, 120, 150)).save(good, "JPEG")
    root = os.fsencode(tmp_path / "src")
    files = [b"train/a/0.jpg", b"train/a/bad\xff.jpg", b"train/a/sub\xfe/1.jpg", b"train/b\xff/0.jpg",
             b"train/caf\xc3\xa9/0.jpg", b"val/a/0.jpg"]
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(good.getvalue())
    out = tmp_path / "out"
    run = _cli("--source", "imagefolder", "--root", str(tmp_path / "src"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    stats = json.loads((out / "stats.json").read_bytes().decode("utf-8"))
    assert {r["path"]: r["reason"] for r in stats["rejected"]} == {
        "train/a/bad\\xff.jpg": "file name is not valid UTF-8",
        "train/a/sub\\xfe": "folder name is not valid UTF-8",  # one entry for the folder and all it holds
        "train/b\\xff": "folder name is not valid UTF-8",
    }
    rows = list(csv.DictReader(io.StringIO((out / "manifest.csv").read_bytes().decode("utf-8"))))
    assert [r["path"] for r in rows] == ["train/a/0.jpg", "train/café/0.jpg", "val/a/0.jpg"]


@pytest.mark.slow
def test_market1501_names_that_are_not_utf8_are_rejected(tmp_path: Path):
    good = io.BytesIO()
    Image.new("RGB", (16, 32), (90, 120, 150)).save(good, "JPEG")
    root = os.fsencode(tmp_path / "m")
    for rel in (b"bounding_box_train/0002_c1s1_000451_00.jpg", b"bounding_box_train/0002_c1s1_000452_00\xff.jpg",
                b"bounding_box_train/old\xff/0003_c1s1_000100_00.jpg", b"query/0002_c2s1_000300_00.jpg",
                b"bounding_box_test/0002_c3s1_000400_00.jpg"):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(good.getvalue())
    out = tmp_path / "out"
    run = _cli("--source", "market1501", "--root", str(tmp_path / "m"), "--out", str(out), "--resize", "16")
    assert run.returncode == 0, run.stderr
    stats = json.loads((out / "stats.json").read_bytes().decode("utf-8"))
    assert {r["path"]: r["reason"] for r in stats["rejected"]} == {
        "bounding_box_train/0002_c1s1_000452_00\\xff.jpg": "file name is not valid UTF-8",
        "bounding_box_train/old\\xff": "folder name is not valid UTF-8",
    }
    assert stats["counts"]["train"]["images"] == 1
    (out / "manifest.csv").read_bytes().decode("utf-8")
