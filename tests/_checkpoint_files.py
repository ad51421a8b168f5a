"""Editing a saved checkpoint (an .npz zip) member by member, to test how loading refuses it."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np


def rewrite_members(path, target, change):
    """Write ``path``'s members to ``target`` through ``change(name, bytes) -> bytes``.

    Every member is read before anything is written, so ``target`` may be ``path``.
    """
    with zipfile.ZipFile(path) as source:
        content = {name: change(name, source.read(name)) for name in source.namelist()}
    with zipfile.ZipFile(target, "w") as out:
        for name, data in content.items():
            out.writestr(name, data)


def edit_metadata(path, target, edit):
    """Like :func:`rewrite_members`, with ``edit(meta)`` changing the JSON metadata in place."""

    def change(name, content):
        if name != "__metadata__.npy":
            return content
        meta = json.loads(np.load(io.BytesIO(content)).tobytes())
        edit(meta)
        buffer = io.BytesIO()
        np.save(buffer, np.frombuffer(json.dumps(meta).encode(), np.uint8))
        return buffer.getvalue()

    rewrite_members(path, target, change)
