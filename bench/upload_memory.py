"""Peak memory of one hostile upload: an ~11 kB 1-bit PNG that claims 100 Mpx (the archive pixel limit).

    python -m bench.upload_memory

Each measurement runs in a fresh process and reports the growth of its peak RSS (``ru_maxrss``) over
the decode and the content hash the engine takes of every uploaded image (an RGB copy). Baseline: the
archive decoder under ``max_image_pixels`` (what uploads used before); against it, the upload decoder
under ``max_upload_pixels``, which refuses the file from its header. A large JPEG photo is measured
too: the upload decoder decodes it at a reduced scale.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

PROBE = r"""
import resource, sys
from PIL import Image
from search.archives.decode import UploadDecoder, content_hash, decode_image
from search.core.errors import BadInput
from tests.archives import bomb_png

Image.MAX_IMAGE_PIXELS = None  # Pillow's own warning ceiling is not what is measured
kind, which = sys.argv[1], sys.argv[2]
data = bomb_png(10_000, 10_000) if kind == "bomb" else open(kind, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if which == "archive":
        image = decode_image(data, "upload", 100_000_000)
    else:
        image = UploadDecoder(4096 * 4096, 2)(data, "upload")
    content_hash(image)
    outcome = f"decoded {image.size[0]}x{image.size[1]}"
except BadInput as exc:
    outcome = "refused"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{len(data)} {(after - before) / 1024:.1f} {outcome}")
"""


def measure(kind: str, which: str) -> tuple[int, float, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, kind, which], capture_output=True, text=True, check=True)
    size, mib, outcome = out.stdout.split(maxsplit=2)
    return int(size), float(mib), outcome.strip()


def main() -> None:
    photo = Path(tempfile.mkdtemp()) / "photo.jpg"
    Image.new("RGB", (8000, 6000), "purple").save(photo, quality=90)
    for kind, label in (("bomb", "1-bit PNG claiming 10000x10000"), (str(photo), "8000x6000 JPEG photo")):
        size, base, base_outcome = measure(kind, "archive")
        _, new, new_outcome = measure(kind, "upload")
        print(f"{label} ({size / 1000:.1f} kB):")
        print(f"  archive decoder (baseline): +{base:.1f} MiB peak RSS, {base_outcome}")
        print(f"  upload decoder:             +{new:.1f} MiB peak RSS, {new_outcome}")
        print(f"  ratio upload/baseline: {new / base if base else float('nan'):.3f}")


if __name__ == "__main__":
    main()
