"""The sha256 of a (large) file, computed once per (path, size, mtime) and remembered in a small
JSON file next to the converted-model cache, so a GGUF file is read in full only once."""

import hashlib
import json
import os
import pathlib
import tempfile

INDEX = "sha256-index.json"


def _index(root: pathlib.Path) -> dict:
    try:
        return json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | os.PathLike, root: pathlib.Path) -> str:
    """Hex sha256 of the file at `path`; remembered under `root` by (absolute path, size,
    mtime_ns), so an edited file is hashed again and an unchanged one is not."""
    path = pathlib.Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    known = _index(root)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:  # best effort: a read-only cache only costs a rehash next time
        root.mkdir(parents=True, exist_ok=True)
        known = {**_index(root), key: value}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-sha256-", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, root / INDEX)
    except OSError:
        pass
    return value
