"""Checkpoints that cannot execute code on load, written atomically.

A checkpoint is one NumPy ``.npz`` archive (a zip of ``.npy`` files), read with
``allow_pickle=False``, so loading it never runs code. It holds:

- every leaf of the parameter pytree and of the optimizer state (any optax
  state: Adam's ``count``, ``mu`` and ``nu``, momentum's ``trace``, ...), one
  ``.npy`` member per leaf, named ``params.0``, ``params.1``, ..., in the order
  of ``jax.tree_util.tree_flatten``;
- a JSON document in the member ``__metadata__`` (stored as bytes, uint8) with
  the format name and version, the step, the PRNG key data and its
  implementation, for each tree its structure (``str(treedef)``) and for each
  leaf its tree path (``jax.tree_util.keystr``), shape, dtype and SHA-256
  digest, and your own JSON metadata (the run's config, the epoch, the history).

Writing goes to a temporary file in the same folder, which is flushed, synced
and then renamed over the target with ``os.replace``: a reader (or a run that
is killed mid-write) sees the old checkpoint or the new one, never half of one.

Loading checks everything against templates of the trees you expect (for
example freshly initialized parameters and ``optimizer.init(params)``): the
structure, every path, shape and dtype, and every digest. Any difference
raises :class:`CheckpointError` with a one-line message that says what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "fnbp-checkpoint"
VERSION = 1
_METADATA = "__metadata__"
_TREES = ("params", "opt_state")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
      params: the parameter pytree, with the template's structure.
      opt_state: the optimizer state pytree, with the template's structure.
      step: the number of optimizer steps taken.
      key: the PRNG key that was saved (typed or raw, as it was), or ``None``.
      metadata: the JSON metadata passed to :func:`save_checkpoint`.
    """

    params: Any
    opt_state: Any
    step: int
    key: jax.Array | None
    metadata: dict


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _storable(array: np.ndarray) -> np.ndarray:
    """The array itself, or its bits as unsigned integers for non-NumPy dtypes.

    ``.npy`` knows only NumPy's own dtypes; bfloat16 and the float8 types are
    stored as their bits (uint16, uint8) and viewed back on load.
    """
    if array.dtype.kind in "biufc":
        return array
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def _encode_key(key: Any) -> dict | None:
    if key is None:
        return None
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return {
            "typed": True,
            "impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist(),
        }
    return {"typed": False, "impl": None, "data": np.asarray(key).tolist(), "dtype": str(key.dtype)}


def _decode_key(path: str, record: Any) -> jax.Array | None:
    if record is None:
        return None
    try:
        if record["typed"]:
            data = jnp.asarray(np.asarray(record["data"], dtype=np.uint32))
            return jax.random.wrap_key_data(data, impl=record["impl"])
        return jnp.asarray(np.asarray(record["data"], dtype=record["dtype"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path}: its PRNG key record is unreadable ({error}); the file is corrupted"
        ) from error


def save_checkpoint(
    path: str | os.PathLike,
    params: Any,
    opt_state: Any,
    *,
    step: int,
    key: jax.Array | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, fsync, ``os.replace``).

    Args:
      path: the file to write (by convention ending in ``.npz``); its folder
        must exist. An existing file is replaced only once the new one is
        complete.
      params: the parameter pytree (arrays as leaves).
      opt_state: the optimizer state pytree, e.g. ``optimizer.init(params)``
        after some updates.
      step: the number of optimizer steps taken, an int >= 0.
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``) to save.
      metadata: anything JSON-serializable (config, epoch, history).

    Raises:
      TypeError: metadata that JSON cannot represent.
      ValueError: a negative step.
    """
    path = os.fspath(path)
    if int(step) != step or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    arrays: dict[str, np.ndarray] = {}
    trees: dict[str, Any] = {}
    for tree_name, tree in zip(_TREES, (params, opt_state), strict=True):
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        records = []
        for i, (leaf_path, leaf) in enumerate(leaves_with_paths):
            array = np.asarray(leaf)
            name = f"{tree_name}.{i}"
            stored = _storable(array)
            arrays[name] = stored
            records.append(
                {
                    "name": name,
                    "path": jax.tree_util.keystr(leaf_path),
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "sha256": _digest(stored),
                }
            )
        trees[tree_name] = {"treedef": str(treedef), "leaves": records}
    document = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "key": _encode_key(key),
        "trees": trees,
        "metadata": dict(metadata or {}),
    }
    try:
        encoded = json.dumps(document, allow_nan=True, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise TypeError(f"save_checkpoint: metadata must be JSON-serializable ({error})") from error
    arrays[_METADATA] = np.frombuffer(encoded, dtype=np.uint8)
    atomic_write(path, lambda handle: np.savez(handle, allow_pickle=True, **arrays))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file so that readers see the old content or the new, never half.

    ``write(handle)`` fills a new temporary file in the same folder (created
    with the usual permissions, 0o666 less the umask); the file is flushed and
    synced to disk and then renamed over ``path`` with ``os.replace``, which is
    atomic. On any error the temporary file is removed and ``path`` is left as
    it was.

    Args:
      path: the file to write; its folder must exist.
      write: a function that writes the content to a binary file handle.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        temporary = os.path.join(
            directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        )
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - a 32-bit random name collided
            continue
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:  # never written, or its folder is gone: the first error is the one
            pass
        raise


def _open(path: str) -> tuple[Any, dict]:
    """Open the archive and parse its metadata; the caller closes the archive."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint: no such file: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path} is a folder, not a checkpoint file")
    from fnbp.train.data_files import not_a_regular_file

    problem = not_a_regular_file(path)  # a named pipe would block the read, a device never end
    if problem is not None:
        raise CheckpointError(f"checkpoint: {problem}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint {path} is not a readable .npz archive; it is "
            f"corrupted or not an fnbp checkpoint ({error})"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(
            f"checkpoint {path} is a single .npy array, not an fnbp checkpoint archive"
        )
    try:
        if _METADATA not in archive.files:
            raise CheckpointError(
                f"checkpoint {path} has no {_METADATA} entry; it was "
                f"not written by fnbp.save_checkpoint"
            )
        raw = _read_member(path, archive, _METADATA)
        try:
            document = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"checkpoint {path}: its metadata is not valid JSON "
                f"({error}); the file is corrupted"
            ) from error
        found = document.get("format") if isinstance(document, dict) else None
        if found != FORMAT:
            raise CheckpointError(f"checkpoint {path} is not an fnbp checkpoint (format {found!r})")
        if document.get("version") != VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version "
                f"{document.get('version')!r}; this fnbp reads version "
                f"{VERSION}"
            )
        for field in ("step", "key", "trees", "metadata"):
            if field not in document:
                raise CheckpointError(
                    f"checkpoint {path}: its metadata lacks {field!r}; the file is corrupted"
                )
    except BaseException:
        archive.close()
        raise
    return archive, document


def _read_member(path: str, archive: Any, name: str) -> np.ndarray:
    try:
        return archive[name]
    except KeyError as error:
        raise CheckpointError(
            f"checkpoint {path} lacks the array {name}; the file is corrupted or truncated"
        ) from error
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint {path}: the array {name} is unreadable ({error}); the file is corrupted"
        ) from error


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata saved with a checkpoint, plus its ``step``.

    Reads only the metadata member (the arrays are not checked); use it to
    learn a run's config before building the templates for
    :func:`load_checkpoint`.

    Returns:
      A copy of the metadata dict with ``"step"`` added.

    Raises:
      CheckpointError: a missing, corrupted or foreign file.
    """
    path = os.fspath(path)
    archive, document = _open(path)
    archive.close()
    if not isinstance(document["metadata"], dict):
        raise CheckpointError(
            f"checkpoint {path}: its metadata is not a JSON object; the file is corrupted"
        )
    return {**document["metadata"], "step": document["step"]}


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _restore_tree(path: str, archive: Any, tree_name: str, record: Any, template: Any) -> Any:
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    if not isinstance(record, dict) or "leaves" not in record or "treedef" not in record:
        raise CheckpointError(
            f"checkpoint {path}: the record of {tree_name} is missing "
            f"or malformed; the file is corrupted"
        )
    stored = record["leaves"]
    if record["treedef"] != str(treedef) or len(stored) != len(leaves_with_paths):
        # a corrupted record may hold leaves without a path, or with one that is not a string
        stored_paths = [
            leaf["path"]
            for leaf in stored
            if isinstance(leaf, dict) and isinstance(leaf.get("path"), str)
        ]
        wanted_paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_paths]
        extra = sorted(set(stored_paths) - set(wanted_paths))
        missing = sorted(set(wanted_paths) - set(stored_paths))
        if extra or missing or len(stored) != len(leaves_with_paths):
            detail = (
                f"it has {len(stored)} leaves, {len(leaves_with_paths)} expected"
                + (f"; only in the checkpoint: {', '.join(extra[:3])}" if extra else "")
                + (f"; missing from it: {', '.join(missing[:3])}" if missing else "")
            )
        else:
            detail = (
                f"its structure is {_short(record['treedef'])}, this one is {_short(str(treedef))}"
            )
        raise CheckpointError(
            f"checkpoint {path}: its {tree_name} do not match this "
            f"model/optimizer ({detail}); load it with the model and "
            f"optimizer of the run that wrote it"
        )
    leaves = []
    for (leaf_path, leaf), entry in zip(leaves_with_paths, stored, strict=True):
        where = jax.tree_util.keystr(leaf_path)
        want_shape = tuple(np.shape(leaf))
        want_dtype = jnp.result_type(leaf)
        try:
            name, shape = entry["name"], tuple(entry["shape"])
            dtype, digest = np.dtype(jnp.dtype(entry["dtype"])), entry["sha256"]
        except (KeyError, TypeError) as error:
            raise CheckpointError(
                f"checkpoint {path}: the record of {tree_name}{where} is "
                f"malformed ({error!r}); the file is corrupted"
            ) from error
        if entry.get("path") != where:
            raise CheckpointError(
                f"checkpoint {path}: {tree_name} leaf {entry.get('path')} "
                f"found where {where} was expected; it was written for "
                f"another model or optimizer"
            )
        if shape != want_shape or dtype != want_dtype:
            raise CheckpointError(
                f"checkpoint {path}: {tree_name}{where} has shape "
                f"{shape} and dtype {dtype}, but this model needs "
                f"{want_shape} and {want_dtype}; use the same model, "
                f"sizes and dtype as the run that wrote it"
            )
        array = _read_member(path, archive, name)
        if _digest(array) != digest:
            raise CheckpointError(
                f"checkpoint {path}: the data of {tree_name}{where} "
                f"do not match their SHA-256 digest; the file is corrupted"
            )
        if array.dtype != dtype:
            array = array.view(dtype) if array.dtype.itemsize == dtype.itemsize else array
        if array.shape != shape or array.dtype != dtype:
            raise CheckpointError(
                f"checkpoint {path}: the array {name} has shape "
                f"{array.shape} and dtype {array.dtype} but its record "
                f"says {shape} and {dtype}; the file is corrupted"
            )
        leaves.append(jnp.asarray(array))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_checkpoint(path: str | os.PathLike, params_like: Any, opt_state_like: Any) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Args:
      path: the checkpoint file.
      params_like: a pytree with the structure, shapes and dtypes the saved
        parameters must have (e.g. freshly initialized parameters).
      opt_state_like: the same for the optimizer state (e.g.
        ``optimizer.init(params_like)``).

    Returns:
      The :class:`Checkpoint`, its trees with the templates' structure.

    Raises:
      CheckpointError: a missing, truncated or corrupted file (bad archive,
        bad CRC, bad digest, malformed metadata), a foreign file, or trees that
        do not match the templates (another model, another optimizer, other
        sizes or dtypes). Nothing is returned half-loaded.
    """
    path = os.fspath(path)
    archive, document = _open(path)
    try:
        params = _restore_tree(
            path, archive, "params", document["trees"].get("params"), params_like
        )
        opt_state = _restore_tree(
            path, archive, "opt_state", document["trees"].get("opt_state"), opt_state_like
        )
    except AttributeError as error:
        raise CheckpointError(
            f"checkpoint {path}: its tree records are malformed; the file is corrupted"
        ) from error
    finally:
        archive.close()
    step = document["step"]
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f"checkpoint {path}: its step {step!r} is not an int >= 0; the file is corrupted"
        )
    if not isinstance(document["metadata"], dict):
        raise CheckpointError(
            f"checkpoint {path}: its metadata is not a JSON object; the file is corrupted"
        )
    key = _decode_key(path, document["key"])
    return Checkpoint(params, opt_state, step, key, document["metadata"])
