"""The embedded datasets, generated from a seed (no download).

`shapes`: one of up to ten shape kinds (the class) drawn at a random position, scale, tilt and colour on a
noisy, cluttered background, so the class lives in a local spatial structure a spatial head can find and
not in the global colour statistics. The shape stands out by luminance (dark on a light patch, light on a
dark one): drawn in any colour, as the clutter is, it was no more visible than the clutter, and a ResNet18
trained on 800 such images for 375 steps fitted them (56 % train top-1) and stayed at chance on val.
`persons`: Market-1501-style pedestrian crops whose identity is a set of clothing attributes, seen by several
cameras that change background, light and tint.
Both write ordinary image trees (ImageFolder and Market-1501 layouts) that the regular sources prepare.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..config import BuiltinDataConfig

RADIUS = (0.25, 0.4)
"""A shape's radius as a share of the image side: at 0.16-0.3 a RandomResizedCrop of 8 % of the area
mostly cut beside the shape."""

SHAPES = ("disc", "square", "triangle", "cross", "ring", "hbars", "vbars", "diamond", "star", "ell")


def _outline(kind: str) -> list[list[tuple[float, float]]]:
    """Polygons of a shape in unit coordinates (centre 0, radius about 1)."""
    if kind == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if kind == "diamond":
        return [[(0, -1), (1, 0), (0, 1), (-1, 0)]]
    if kind == "triangle":
        return [[(0, -1), (0.95, 0.8), (-0.95, 0.8)]]
    if kind == "cross":
        w = 0.3
        return [[(-w, -1), (w, -1), (w, 1), (-w, 1)], [(-1, -w), (1, -w), (1, w), (-1, w)]]
    if kind == "hbars":
        return [[(-1, y - 0.18), (1, y - 0.18), (1, y + 0.18), (-1, y + 0.18)] for y in (-0.75, 0, 0.75)]
    if kind == "vbars":
        return [[(x - 0.18, -1), (x + 0.18, -1), (x + 0.18, 1), (x - 0.18, 1)] for x in (-0.75, 0, 0.75)]
    if kind == "star":
        return [[(math.sin(a) * r, -math.cos(a) * r)
                 for k in range(10) for a, r in [(k * math.pi / 5, 1.0 if k % 2 == 0 else 0.42)]]]
    if kind == "ell":
        return [[(-0.8, -1), (-0.25, -1), (-0.25, 0.45), (0.8, 0.45), (0.8, 1), (-0.8, 1)]]
    raise KeyError(kind)


def _background(rng: np.random.Generator, w: int, h: int, base: np.ndarray | None = None,
                clutter: float = 1.0) -> Image.Image:
    """A smooth colour gradient with thin random clutter lines and dots (how many: `clutter` × 4-9 and
    × 3-7)."""
    c0 = rng.uniform(30, 225, 3) if base is None else base
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 0, 255)
    t = np.linspace(0, 1, h)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, w)[None, :, None]
    arr = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3))
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(round(clutter * rng.integers(4, 10))):
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(1, 3)))
    for _ in range(round(clutter * rng.integers(3, 8))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, max(1.0, w / 40))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return img


def _noise(rng: np.random.Generator, img: Image.Image, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_shape(kind: str, size: int, rng: np.random.Generator, clutter: float = 1.0) -> Image.Image:
    """One `size`×`size` image of `kind` at a random place, scale, tilt and colour on clutter."""
    img = _background(rng, size, size, clutter=clutter)
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(RADIUS[0], RADIUS[1]) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    tilt = math.radians(rng.uniform(-15, 15))
    sx, sy = radius * rng.uniform(0.85, 1.15), radius * rng.uniform(0.85, 1.15)
    local = np.asarray(img, dtype=np.float32)[int(cy - radius):int(cy + radius), int(cx - radius):int(cx + radius)]
    dark = local.mean() > 127  # the shape contrasts in luminance with what lies under it: dark on light, light on dark
    colour = tuple(rng.integers(0, 64, 3).tolist() if dark else rng.integers(192, 256, 3).tolist())
    if kind in ("disc", "ring"):
        box = [cx - sx, cy - sy, cx + sx, cy + sy]
        if kind == "disc":
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
    else:
        cos, sin = math.cos(tilt), math.sin(tilt)
        for poly in _outline(kind):
            pts = [(cx + sx * (x * cos - y * sin), cy + sy * (x * sin + y * cos)) for x, y in poly]
            draw.polygon(pts, fill=colour)
    return _noise(rng, img, clutter * rng.uniform(4, 14))


def write_shapes(root: Path, cfg: BuiltinDataConfig) -> None:
    """`root/{train,val}/<shape>/<i>.png`: the built-in classification set in ImageFolder layout."""
    for split_id, (split, per_class) in enumerate((("train", cfg.train_per_class), ("val", cfg.val_per_class))):
        for label, kind in enumerate(SHAPES[: cfg.num_classes]):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([cfg.seed, split_id, label, i])
                draw_shape(kind, cfg.image_size, rng, cfg.clutter).save(folder / f"{i:05d}.png", compress_level=1)


def _person(rng_id: np.random.Generator, rng: np.random.Generator, w: int, h: int,
            camera_bg: np.ndarray, camera_gain: np.ndarray) -> Image.Image:
    """A pedestrian crop: identity attributes come from `rng_id`, pose and framing from `rng`."""
    shirt = rng_id.integers(0, 256, 3)
    trousers = rng_id.integers(0, 200, 3)
    skin = np.array([224, 172, 140]) * rng_id.uniform(0.5, 1.05)
    hair = rng_id.integers(0, 120, 3)
    pattern = int(rng_id.integers(0, 3))  # 0 plain, 1 stripes, 2 two-tone
    bag = int(rng_id.integers(0, 3))  # 0 none, 1 left, 2 right
    bag_colour = rng_id.integers(0, 256, 3)
    build = rng_id.uniform(0.8, 1.1)

    img = _background(rng, w, h, base=camera_bg + rng.uniform(-15, 15, 3))
    draw = ImageDraw.Draw(img)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    top = rng.uniform(0.02, 0.08) * h
    scale = h * rng.uniform(0.85, 0.95)
    bw = w * 0.3 * build

    def col(c: np.ndarray) -> tuple[int, ...]:
        return tuple(np.clip(c, 0, 255).astype(int).tolist())

    head_r = scale * 0.07
    hy = top + head_r
    draw.ellipse([cx - head_r, hy - head_r, cx + head_r, hy + head_r], fill=col(skin))
    draw.chord([cx - head_r, hy - head_r, cx + head_r, hy + head_r], 180, 360, fill=col(hair))
    t0, t1 = hy + head_r, top + scale * 0.52
    draw.rectangle([cx - bw, t0, cx + bw, t1], fill=col(shirt))
    if pattern == 1:
        for y in np.arange(t0 + 2, t1, max(3.0, (t1 - t0) / 6)):
            draw.line([(cx - bw, y), (cx + bw, y)], fill=col(255 - shirt), width=2)
    elif pattern == 2:
        draw.rectangle([cx, t0, cx + bw, t1], fill=col(shirt[::-1]))
    spread = rng.uniform(0.0, 0.35) * bw
    leg_w = bw * 0.45
    for side in (-1, 1):
        x = cx + side * bw * 0.5
        draw.polygon([(x - leg_w, t1), (x + leg_w, t1), (x + side * spread + leg_w * 0.8, top + scale),
                      (x + side * spread - leg_w * 0.8, top + scale)], fill=col(trousers))
    if bag:
        bx = cx - bw * 1.5 if bag == 1 else cx + bw * 0.9
        draw.rectangle([bx, t0 + (t1 - t0) * 0.4, bx + bw * 0.6, t1 + (t1 - t0) * 0.2], fill=col(bag_colour))
    arr = np.asarray(img, dtype=np.float32) * camera_gain
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return _noise(rng, img, rng.uniform(3, 8))


def write_persons(root: Path, cfg: BuiltinDataConfig) -> None:
    """`root/{bounding_box_train,bounding_box_test,query}/PPPP_cCs1_FFFFFF_00.jpg`: Market-1501 layout.

    Each identity is seen by 2 or more cameras; the gallery also holds junk (`-1`, background with body
    fragments) and distractors (`0000`, people who are nobody's match), as in Market-1501.
    """
    rng = np.random.default_rng([cfg.seed, 100])
    h, w = cfg.image_size, max(8, cfg.image_size // 2)
    cams = np.arange(1, cfg.cameras + 1)
    cam_bg = rng.uniform(40, 215, (cfg.cameras + 1, 3))
    cam_gain = rng.uniform(0.75, 1.2, (cfg.cameras + 1, 3))
    pids = np.sort(rng.choice(np.arange(1, 1502), cfg.train_ids + cfg.test_ids, replace=False))
    order = rng.permutation(len(pids))
    train_pids = set(pids[order[: cfg.train_ids]].tolist())
    frame = 0

    def save(folder: str, pid: int, cam: int, img: Image.Image) -> None:
        nonlocal frame
        frame += 1
        tag = "-1" if pid < 0 else f"{pid:04d}"
        path = root / folder / f"{tag}_c{cam}s1_{frame:06d}_00.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95)

    def shot(pid_seed: int, cam: int) -> Image.Image:
        return _person(np.random.default_rng([cfg.seed, 200, pid_seed]), rng, w, h, cam_bg[cam], cam_gain[cam])

    for pid in pids.tolist():
        seen = np.sort(rng.choice(cams, int(rng.integers(2, cfg.cameras + 1)), replace=False)).tolist()
        if pid in train_pids:
            for k in range(cfg.images_per_id):
                cam = seen[k % len(seen)]
                save("bounding_box_train", pid, cam, shot(pid, cam))
            continue
        for cam in seen:
            save("query", pid, cam, shot(pid, cam))
        for k in range(cfg.images_per_id):
            cam = seen[k % len(seen)]
            save("bounding_box_test", pid, cam, shot(pid, cam))
    for k in range(cfg.distractors):
        cam = int(rng.choice(cams))
        save("bounding_box_test", 0, cam, shot(10_000 + k, cam))
    for _ in range(cfg.junk):
        cam = int(rng.choice(cams))
        img = _background(rng, w, h, base=cam_bg[cam])
        draw = ImageDraw.Draw(img)
        y = rng.uniform(0, h * 0.7)
        draw.rectangle([rng.uniform(0, w / 2), y, rng.uniform(w / 2, w), y + rng.uniform(5, h / 3)],
                       fill=tuple(rng.integers(0, 256, 3).tolist()))
        save("bounding_box_test", -1, cam, _noise(rng, img, 6))
