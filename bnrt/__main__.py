import os
import sys

# `python -m` puts the working folder first on sys.path: every module imported later (by bnrt, torch,
# onnxscript) could come from there. Code from the working folder runs only with the user's consent
# (--arch, --trust-code), which bnrt.io.load grants for the one import it is given for.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from bnrt.cli import main  # noqa: E402

raise SystemExit(main())
