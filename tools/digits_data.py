"""Write the digits test split as an .npz for `bnrt fold --data`: x (N, 1, 8, 8) float32, y labels;
or, with --images DIR, as 8-bit grayscale PNG files in class folders (DIR/<digit>/<i>.png).

    python -m tools.digits_data [-o build/digits_test.npz] [--images build/digits_png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bnrt.io.save import atomic_path
from models.digits import digits_split


def write_images(x: np.ndarray, y: np.ndarray, root: Path) -> None:
    """Each sample (1, H, W) in [0, 1] as an 8-bit grayscale PNG, ``root/<label>/<index>.png``."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(x, y)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="build/digits_test.npz")
    parser.add_argument("--images", metavar="DIR", help="also write the split as PNG files in class folders")
    args = parser.parse_args()
    _, _, x_te, y_te = digits_split()
    if args.images:
        write_images(x_te, y_te, Path(args.images))
        print(f"wrote {len(y_te)} PNG files under {args.images}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x_te, y=y_te)
    print(f"wrote {out}: x {x_te.shape} {x_te.dtype}, y {y_te.shape}")


if __name__ == "__main__":
    main()
