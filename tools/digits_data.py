"""Write the digits test split as an .npz for `bnrt fold --data`: x (N, 1, 8, 8) float32, y labels.

    python -m tools.digits_data [-o build/digits_test.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bnrt.io.save import atomic_path
from models.digits import digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="build/digits_test.npz")
    args = parser.parse_args()
    _, _, x_te, y_te = digits_split()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x_te, y=y_te)
    print(f"wrote {out}: x {x_te.shape} {x_te.dtype}, y {y_te.shape}")


if __name__ == "__main__":
    main()
