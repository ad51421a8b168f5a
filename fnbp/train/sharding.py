"""Training on several devices and hosts with JAX's own sharding.

Nothing here is per-device Python code. A :class:`jax.sharding.Mesh` names the
devices' axes, a :class:`~jax.sharding.NamedSharding` with a
:class:`~jax.sharding.PartitionSpec` says how each array is laid out over
them, and ``jax.jit`` with ``in_shardings``/``out_shardings`` compiles one
program that XLA partitions (GSPMD): the hand-written backward functions run
unchanged on each device's part of the batch, and the collectives they need
(the all-reduce of the parameter cotangents, which the notes write as one sum
over the examples, V^T Z for MM, eq. 7.65 batched as 7.84) are inserted by
the compiler.

Two layouts, on a mesh made by :func:`make_mesh`:

- data parallel, mesh axes ``("data",)``: the example axis of every batch is
  split over ``"data"`` (``PartitionSpec("data")``) and the parameters and
  optimizer state are replicated (``PartitionSpec()``). Each device computes
  the forward and backward pass of batch/devices examples; the mean loss
  J = (1/n) sum_i J^(i) (eq. 7.2) and its gradient are the sums of the
  devices' parts, so the step equals the single-device step up to the order
  of floating-point additions.
- FSDP-style sharded parameters, mesh axes ``("data", "fsdp")``: the batch is
  split over both axes (every device still sees different examples), and
  every parameter with at least ``min_shard_size`` elements is split over
  ``"fsdp"`` along its largest axis that divides evenly (W of shape (n, m)
  with n >= m: ``PartitionSpec("fsdp", None)``); smaller ones (biases) stay
  replicated. The optimizer state (Adam's mu and nu have the parameters'
  shapes) follows the same rule, so each device stores 1/fsdp of the large
  parameters and of their optimizer state; XLA gathers a weight where a
  matmul needs it and reduce-scatters its cotangent.

Several hosts: :func:`initialize_distributed` joins the processes with
``jax.distributed.initialize`` (before anything else touches JAX); a mesh
then spans the devices of every process, every process runs the same
program on the same host data (:func:`put` hands each device its slice),
and a single process needs none of it.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
"""The mesh axis the example axis of a batch is split over."""

FSDP_AXIS = "fsdp"
"""The mesh axis large parameters are split over (FSDP-style)."""

MIN_SHARD_SIZE = 2**14
"""Parameters with fewer elements than this stay replicated on an FSDP mesh."""


# --- processes ----------------------------------------------------------------------


DEFAULT_TIMEOUT = 60
"""Seconds :func:`initialize_distributed` waits for the processes to join, by default."""


def check_distributed_arguments(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[str, int] | None:
    """Check :func:`initialize_distributed`'s arguments without touching JAX or the network.

    ``coordinator_address`` is ``"host:port"`` (an IPv6 host in brackets,
    ``"[::1]:1234"``) with a port in 1 .. 65535; ``timeout`` a positive
    number of seconds. Messages name the argument at fault in backticks.

    Returns:
      ``(host, port)`` of the address, or None when none is given.

    Raises:
      TypeError: an address that is not a string.
      ValueError: a malformed address, a process count or id out of range,
        a timeout that is not a positive finite number.
    """
    fn = "initialize_distributed"
    if (
        not isinstance(timeout, (int, float, np.integer, np.floating))
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"{fn}: `timeout` must be a positive number of seconds, got {timeout!r}")
    address = None
    if coordinator_address is not None:
        address = _parse_address(fn, coordinator_address)
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(
                f"{fn}: `process_id` {process_id} needs `num_processes` > {process_id}"
            )
        return address
    if (
        not isinstance(num_processes, (int, np.integer))
        or isinstance(num_processes, bool)
        or num_processes < 1
    ):
        raise ValueError(f"{fn}: `num_processes` must be a positive int, got {num_processes!r}")
    if address is None:
        raise ValueError(
            f"{fn}: {num_processes} processes need a `coordinator_address` "
            f"'host:port' (the address of process 0)"
        )
    if (
        not isinstance(process_id, (int, np.integer))
        or isinstance(process_id, bool)
        or not 0 <= process_id < num_processes
    ):
        raise ValueError(
            f"{fn}: `process_id` must be an int in [0, {num_processes}), got {process_id!r}"
        )
    return address


def _parse_address(fn: str, address: Any) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"`` or ``"[v6 host]:port"``, or fnbp's error."""
    if not isinstance(address, str):
        raise TypeError(
            f"{fn}: `coordinator_address` must be a string 'host:port', got "
            f"{type(address).__name__}"
        )
    example = "e.g. 'localhost:1234' or '10.0.0.1:1234'"
    if ":" not in address:
        raise ValueError(
            f"{fn}: `coordinator_address` {address!r} has no port; pass 'host:port', {example}"
        )
    if address.startswith("["):
        close = address.find("]")
        if close < 0 or address[close + 1 : close + 2] != ":":
            raise ValueError(
                f"{fn}: `coordinator_address` {address!r}: an IPv6 host in "
                f"brackets is followed by ':port', e.g. '[::1]:1234'"
            )
        host, port_text = address[1:close], address[close + 2 :]
    else:
        host, port_text = address.rsplit(":", 1)
        if ":" in host:
            raise ValueError(
                f"{fn}: `coordinator_address` {address!r}: write an IPv6 host "
                f"in brackets, e.g. '[{host}]:{port_text}'"
            )
    if not host.strip() or host != host.strip() or any(c.isspace() for c in host):
        raise ValueError(
            f"{fn}: `coordinator_address` {address!r} has "
            f"{'no host' if not host.strip() else 'spaces in its host'}; pass "
            f"'host:port', {example}"
        )
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(
            f"{fn}: `coordinator_address` {address!r}: the port "
            f"{port_text!r} is not a number; pass 'host:port', {example}"
        )
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(
            f"{fn}: `coordinator_address` {address!r}: the port {port} is outside 1 .. 65535"
        )
    return host, port


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_timeout: Callable[[str], Any] | None = None,
) -> int:
    """Join a multi-process (multi-host) run, or stay a single process.

    With ``num_processes`` > 1 this calls ``jax.distributed.initialize``
    (which must come before any JAX computation or ``jax.devices()`` call in
    the process): every process runs the same program and sees the devices
    of all of them in ``jax.devices()``. With ``num_processes`` None or 1 it
    does nothing and the process runs alone, so the same script works on one
    machine and on many. Calling it again once initialized does nothing.

    Waiting is bounded by ``timeout`` seconds, in two parts:

    - every process but process 0 first waits for the coordinator's port to
      accept a connection (process 0 opens it); if it does not within
      ``timeout``, :class:`TimeoutError` is raised;
    - then all processes register with the coordinator, which returns once
      all ``num_processes`` have. JAX cannot be stopped while it waits there,
      and ends the process itself (a fatal error of its runtime) at its own
      deadline; so when the processes have not all joined by ``timeout``,
      ``on_timeout(message)`` is called from a watchdog thread with the
      one-line message, and by default writes it to standard error and ends
      the process with exit status 2 (``os._exit``).

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable from
        every process (required when ``num_processes`` > 1); an IPv6 host in
        brackets, ``"[::1]:1234"``.
      num_processes: the number of processes, usually one per host.
      process_id: this process' number in 0 .. num_processes - 1.
      timeout: seconds to wait for the coordinator and the other processes
        (default :data:`DEFAULT_TIMEOUT`, 60).
      on_timeout: what to do when the processes have not all joined after
        ``timeout`` (called with the message, in another thread; it should
        end the process, which JAX does soon after anyway).

    Returns:
      The number of processes now running (``jax.process_count()``, or 1).

    Raises:
      TypeError: an address that is not a string.
      ValueError: a malformed address, inconsistent arguments, or
        ``jax.distributed.initialize`` failing (the backend already in use,
        the port taken).
      TimeoutError: the coordinator did not answer within ``timeout``.
    """
    # jax.distributed.is_initialized is newer than some JAX versions fnbp supports
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return jax.process_count()
    address = check_distributed_arguments(coordinator_address, num_processes, process_id, timeout)
    if num_processes is None or num_processes == 1:
        return 1
    # checked: several processes need an address and an id
    assert address is not None and coordinator_address is not None and process_id is not None
    deadline = time.monotonic() + timeout
    if process_id != 0:
        _wait_for_port(coordinator_address, address, deadline, timeout)
    message = (
        f"initialize_distributed: the {num_processes} processes did not all join the "
        f"coordinator {coordinator_address} (`coordinator_address`) within "
        f"{timeout:g} s (`timeout`); start every process with the same "
        f"`coordinator_address` and `num_processes` and its own `process_id`, or "
        f"pass a larger `timeout`"
    )
    joined = threading.Event()
    watchdog = threading.Thread(
        target=_watch,
        args=(joined, deadline, message, on_timeout or _exit_with),
        name="fnbp-initialize-distributed-watchdog",
        daemon=True,
    )
    watchdog.start()
    # JAX's own deadline (which ends the process) after the watchdog's
    remaining = max(deadline - time.monotonic(), 0.0)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=int(num_processes),
            process_id=int(process_id),
            initialization_timeout=int(math.ceil(remaining)) + 30,
        )
    except (RuntimeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ValueError(
            f"initialize_distributed: jax.distributed.initialize failed: {message}"
        ) from error
    finally:
        joined.set()
    return jax.process_count()


def _wait_for_port(text: str, address: tuple[str, int], deadline: float, timeout: float) -> None:
    """Until ``deadline``, try to connect to the coordinator's port; TimeoutError if never."""
    host, port = address
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(min(left, 2.0), 0.05)):
                return
        except socket.gaierror as error:
            raise ValueError(
                f"initialize_distributed: the host {host!r} of "
                f"`coordinator_address` {text} is unknown "
                f"({error.strerror or error}); pass the address of process 0"
            ) from error
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"initialize_distributed: nothing answers at the coordinator "
                f"{text} (`coordinator_address`) after {timeout:g} s "
                f"(`timeout`); start process 0 with the same "
                f"`coordinator_address`, check the host and the port, or pass a "
                f"larger `timeout`"
            )
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


def _watch(
    joined: threading.Event, deadline: float, message: str, on_timeout: Callable[[str], Any]
) -> None:
    if not joined.wait(max(deadline - time.monotonic(), 0.0)):
        on_timeout(message)


def _exit_with(message: str) -> None:
    """Write ``message`` on standard error and end the process with exit status 2."""
    try:
        os.write(2, (message + "\n").encode("utf-8", "replace"))
    finally:
        os._exit(2)


# --- meshes -------------------------------------------------------------------------


def make_mesh(devices: int | None = None, *, fsdp: int = 1) -> Mesh:
    """A device mesh for data-parallel training, optionally with sharded parameters.

    Args:
      devices: how many devices the mesh spans (default: all of them,
        ``jax.device_count()``, every local device of every process). With
        several processes it must be a multiple of the process count, and
        each process contributes the same number of its local devices.
      fsdp: the size of the ``"fsdp"`` axis; 1 (default) gives the
        data-parallel mesh ``("data",)``, > 1 the mesh ``("data", "fsdp")``
        of shape (devices // fsdp, fsdp). ``fsdp=devices`` shards the large
        parameters over every device.

    Returns:
      A :class:`jax.sharding.Mesh`.

    Raises:
      ValueError: more devices than are present, or ``fsdp`` not dividing
        ``devices``.
    """
    present = jax.devices()
    if devices is None:
        devices = len(present)
    if not isinstance(devices, (int, np.integer)) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"make_mesh: `devices` must be a positive int, got {devices!r}")
    devices = int(devices)
    if devices > len(present):
        are = "device is" if len(present) == 1 else "devices are"
        raise ValueError(
            f"make_mesh: `devices` {devices}: only {len(present)} {are} present "
            f"({_device_summary(present)}); pass `devices` {len(present)} or "
            f"fewer"
        )
    if not isinstance(fsdp, (int, np.integer)) or isinstance(fsdp, bool) or fsdp < 1:
        raise ValueError(f"make_mesh: `fsdp` must be a positive int, got {fsdp!r}")
    if devices % fsdp:
        raise ValueError(
            f"make_mesh: `fsdp` {fsdp} does not divide `devices` {devices}; "
            f"the devices form a ({devices} // fsdp) x fsdp mesh, so pass an "
            f"`fsdp` that divides {devices}"
        )
    chosen = _pick_devices(present, devices)
    if fsdp == 1:
        return Mesh(np.array(chosen), (DATA_AXIS,))
    return Mesh(np.array(chosen).reshape(devices // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def _pick_devices(present: list[Any], count: int) -> list[Any]:
    """``count`` devices, the same number from every process."""
    processes = sorted({device.process_index for device in present})
    if len(processes) == 1:
        return present[:count]
    if count % len(processes):
        raise ValueError(
            f"make_mesh: `devices` {count} do not split evenly over the "
            f"{len(processes)} processes; pass a multiple of {len(processes)}"
        )
    per_process = count // len(processes)
    return [
        device
        for p in processes
        for device in [d for d in present if d.process_index == p][:per_process]
    ]


def _device_summary(devices: list[Any]) -> str:
    kinds: dict[str, int] = {}
    for device in devices:
        kinds[device.platform] = kinds.get(device.platform, 0) + 1
    return ", ".join(f"{count} {platform}" for platform, count in kinds.items())


def check_mesh(fn: str, mesh: Any) -> Mesh:
    """``mesh`` itself, after checking that its axes are ``"data"`` and maybe ``"fsdp"``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{fn}: mesh must be a jax.sharding.Mesh (from fnbp.make_mesh), "
            f"got {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    if names not in ((DATA_AXIS,), (DATA_AXIS, FSDP_AXIS)):
        raise ValueError(
            f"{fn}: the mesh axes must be ('data',) or ('data', 'fsdp'), got "
            f"{names}; make the mesh with fnbp.make_mesh(devices, fsdp=...)"
        )
    return mesh


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the example axis is split over: all of them."""
    return tuple(mesh.axis_names)


def batch_split(mesh: Mesh) -> int:
    """Into how many parts a batch is split: the number of devices of the mesh."""
    return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """``PartitionSpec("data")``, or ``PartitionSpec(("data", "fsdp"))`` on an FSDP mesh."""
    axes = batch_axes(mesh)
    return PartitionSpec(axes[0] if len(axes) == 1 else axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: its first (example) axis split over the mesh."""
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device: ``PartitionSpec()``."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(fn: str, mesh: Mesh, batch_size: int, argument: str | None = None) -> None:
    """Raise ValueError unless ``batch_size`` examples split evenly over ``mesh``.

    Every device takes an equal part of each batch, so the number of devices
    must divide the batch size. ``argument`` names the argument that set the
    batch size (``"batch_size"``); the message then names it in backticks, as
    every library message does, for a caller (the command line) to map it to
    its own words. Without it the message speaks of "a batch of N examples".
    """
    split = batch_split(mesh)
    if batch_size % split:
        lower = batch_size - batch_size % split
        suggestion = f"{lower} or {lower + split}" if lower else f"{split}"
        subject, remedy = (
            f"a batch of {batch_size} examples",
            f"a batch of a multiple of {split} examples ({suggestion})",
        )
        if argument is not None:
            subject, remedy = (
                f"`{argument}` {batch_size}",
                f"a `{argument}` that is a multiple of {split} ({suggestion})",
            )
        raise ValueError(
            f"{fn}: {subject} does not split evenly over the {split} devices "
            f"of the mesh {_mesh_text(mesh)}, each of which takes an equal part "
            f"of every batch; pass {remedy} or fewer `devices`"
        )


def _mesh_text(mesh: Mesh) -> str:
    return "(" + ", ".join(f"{name}={size}" for name, size in mesh.shape.items()) + ")"


# --- parameters ---------------------------------------------------------------------


def param_spec(
    shape: tuple[int, ...], mesh: Mesh, min_shard_size: int = MIN_SHARD_SIZE
) -> PartitionSpec:
    """Where a parameter (or optimizer-state leaf) of this shape lives.

    Replicated (``PartitionSpec()``) on a data-parallel mesh. On an FSDP mesh
    a leaf of at least ``min_shard_size`` elements is split over ``"fsdp"``
    along its largest axis whose length ``"fsdp"`` divides (the first such
    axis on a tie); smaller leaves, and leaves with no such axis, are
    replicated. The rule depends on the shape alone, so Adam's mu and nu are
    laid out exactly like their parameters.
    """
    if FSDP_AXIS not in mesh.axis_names:
        return PartitionSpec()
    parts = mesh.shape[FSDP_AXIS]
    shape = tuple(int(d) for d in shape)
    if parts == 1 or math.prod(shape) < min_shard_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % parts == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return PartitionSpec(*([None] * axis + [FSDP_AXIS]))


def param_shardings(tree: Any, mesh: Mesh, min_shard_size: int = MIN_SHARD_SIZE) -> Any:
    """A pytree like ``tree`` (of arrays or ShapeDtypeStructs) of NamedShardings.

    Each leaf's sharding is ``NamedSharding(mesh, param_spec(leaf.shape, ...))``.
    """
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, param_spec(np.shape(leaf), mesh, min_shard_size)), tree
    )


# --- placing data -------------------------------------------------------------------


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """The global array with value ``x`` laid out by ``sharding``.

    ``x`` is the whole value (a NumPy array, or a jax.Array already placed
    anywhere); with several processes every process passes the same value and
    only its own devices' slices are copied to them. An array already laid out
    by ``sharding`` is returned as it is.
    """
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if jax.process_count() == 1 or not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
            )
    value = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def put_tree(tree: Any, shardings: Any) -> Any:
    """:func:`put` for every leaf of ``tree`` with the matching leaf of ``shardings``."""
    return jax.tree_util.tree_map(put, tree, shardings)


def shard_batch(mesh: Mesh, x: Any) -> jax.Array:
    """``x`` with its example axis split over the mesh (checked to split evenly)."""
    check_mesh("shard_batch", mesh)
    check_batch("shard_batch", mesh, int(np.shape(x)[0]))
    return put(x, batch_sharding(mesh))


def shard_params(params: Any, mesh: Mesh, min_shard_size: int = MIN_SHARD_SIZE) -> Any:
    """``params`` (or an optimizer state) laid out by :func:`param_shardings`."""
    check_mesh("shard_params", mesh)
    return put_tree(params, param_shardings(params, mesh, min_shard_size))


def to_host(tree: Any) -> Any:
    """Every leaf as a whole NumPy array on this host (to save or print it).

    With several processes, leaves split over other processes' devices are
    gathered with ``jax.experimental.multihost_utils.process_allgather``; every
    process must then call this together.
    """
    from jax.experimental import multihost_utils

    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.is_fully_replicated:
                return np.asarray(leaf.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree_util.tree_map(one, tree)


def describe(mesh: Mesh) -> str:
    """A one-line description, e.g. ``"8 cpu devices, mesh (data=4, fsdp=2)"``."""
    devices = list(mesh.devices.flat)
    return f"{_device_summary(devices)} devices, mesh {_mesh_text(mesh)}"
