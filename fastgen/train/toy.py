"""A toy dataset for trying the trainer: 16x16 coloured shapes, one class per shape, as PNG files.

    python -m fastgen.train.toy data/shapes [--per-class 16] [--size 16]
    fastgen train configs/train/dit_shapes.toml

Writes ``root/<class>/<i>.png`` plus a caption ``<i>.txt`` ("a red circle"): a red circle, a green
square, a blue triangle and a yellow cross at random sizes and positions on a dark background.
The tests train on it (tests/test_train_e2e.py).
"""

from __future__ import annotations

import argparse
import os

import torch

COLOURS = {"red_circle": (220, 40, 40), "green_square": (40, 200, 60), "blue_triangle": (50, 70, 230),
           "yellow_cross": (230, 210, 40)}


def make_shapes_folder(root, per_class: int = 16, size: int = 16, seed: int = 0, sizes=None, captions=True):
    """``root/<class>/<i>.png``: one coloured shape per class on a dark background (+ captions).

    ``sizes``: optional list of (width, height) cycled over the images (for bucketing)."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    for name, rgb in COLOURS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)] if sizes else (size, size)
            im = Image.new("RGB", (w, h), (20, 20, 30))
            d = ImageDraw.Draw(im)
            s = min(w, h)
            r = int(s * (0.25 + 0.1 * torch.rand((), generator=g).item()))
            cx = int(w / 2 + (torch.rand((), generator=g).item() - 0.5) * (w - 2 * r) * 0.5)
            cy = int(h / 2 + (torch.rand((), generator=g).item() - 0.5) * (h - 2 * r) * 0.5)
            box = (cx - r, cy - r, cx + r, cy + r)
            if name == "red_circle":
                d.ellipse(box, fill=rgb)
            elif name == "green_square":
                d.rectangle(box, fill=rgb)
            elif name == "blue_triangle":
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
            else:
                d.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=rgb)
                d.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=rgb)
            path = os.path.join(root, name, f"{i:03d}.png")
            im.save(path)
            if captions:
                with open(path[:-4] + ".txt", "w") as fh:
                    fh.write(f"a {name.replace('_', ' ')}")
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastgen.train.toy", description=__doc__.splitlines()[0])
    p.add_argument("root", help="output folder")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_shapes_folder(a.root, a.per_class, a.size, a.seed)
    print(f"wrote {a.per_class * len(COLOURS)} images of {len(COLOURS)} classes to {a.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
