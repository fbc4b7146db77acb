"""The container image every msif component runs in.

`IMAGE` is read once, when the component modules are imported: set `MSIF_IMAGE` before the
import (that is what `msif pipeline compile --image IMG` does) to build components and a
compiled pipeline that run in another image. The default names no real registry (`.invalid`
never resolves, RFC 2606): build and push the image from `images/Dockerfile` and compile
with `--image` before running on a cluster.
"""

import os

from msif.version import __version__

IMAGE_ENV = "MSIF_IMAGE"
DEFAULT_IMAGE = f"registry.invalid/msif:{__version__}"
IMAGE = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
