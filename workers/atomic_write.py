"""Writing a small cache file so that a reader sees the old content or the new, never half.

Worker caches in the data dir (checksums, manifests) are read by other worker processes while
one may be writing them, and a crash can come at any byte. The text goes to a temporary file
in the same folder, which is then renamed over the target (atomic within one file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
