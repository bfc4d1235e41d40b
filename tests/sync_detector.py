"""Count the places where code on a GPU would wait for the device, on a CPU-only machine.

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports them; a CPU has nothing to wait for, so
:class:`SyncCounter` marks what would live on the device instead: the tensors it is given (the
model's parameters and buffers, the embeddings), the result of every
``.to(device, non_blocking=True)`` (scrollsam's way to move a tensor to the device without
waiting; a copy here, as it would be on a GPU) and, as ops run, every tensor computed from a
marked one ("taint", tracked by a ``TorchDispatchMode`` below autograd, so backward counts too).
It then counts, on marked tensors only, so host-side work such as prompt sampling is free:

* ``reads``: ops whose result depends on device values on the host: ``.item()``, ``float()``,
  ``bool()`` (``_local_scalar_dense``, ``is_nonzero``), ``nonzero``, ``masked_select``,
  boolean-mask indexing, ``unique``, ``equal``, ``repeat_interleave`` without ``output_size``;
* ``copies``: ``.cpu()``, ``.numpy()`` and ``.tolist()``, the code's ways to bring a device
  tensor to the host (``.to("cpu")`` cannot be told from a move to the device here);
* ``uploads``: ``torch.tensor`` / ``torch.as_tensor`` of host data (numbers, lists, arrays,
  unmarked tensors) with a ``device`` named: on a GPU a copy from pageable host memory that
  waits for the device (``set_sync_debug_mode`` reports it). Host code names no device, so
  every such call counts (code that bound ``torch.tensor`` to a name of its own goes unseen).

Tensors made from nothing on the device (``torch.zeros(..., device=dev)``) are not marked: a
read of those alone goes unseen. For code that runs wholly on the device (the encoder, the
decoder) ``SyncCounter(everything=True)`` counts every tensor as marked, host-made ones too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
         aten.masked_select.default, aten.equal.default, aten._unique.default,
         aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
            aten._index_put_impl_.default}
COPIES = ("cpu", "numpy", "tolist")
FROM_HOST_DATA = ("tensor", "as_tensor")  # torch factories of host data


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter(device_tensors) as c: ...``, then ``c.counts`` ("reads", "copies",
    "uploads") and ``c.where`` (what each was)."""

    def __init__(self, device_tensors: Iterable[torch.Tensor] = (), *,
                 everything: bool = False) -> None:
        super().__init__()
        self.everything = everything
        self.marked = WeakTensorKeyDictionary()
        for t in device_tensors:
            self.marked[t] = True
        self.counts: Counter[str] = Counter()
        self.where: list[str] = []
        self._saved: dict[str, object] = {}

    def _is_marked(self, values: object) -> bool:
        if self.everything:
            return True
        flat, _ = tree_flatten(values)
        return any(isinstance(v, torch.Tensor) and v in self.marked for v in flat)

    def _count(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        self.where.append(f"{kind}: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        marked = self._is_marked((args, kwargs))
        if marked and func in READS:
            self._count("reads", str(func))
        if marked and func in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self._count("reads", f"{func} with a boolean mask")
        if marked and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._count("reads", str(func))
        out = func(*args, **kwargs)
        if marked:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.marked[t] = True
        return out

    def __enter__(self) -> SyncCounter:
        for name in COPIES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._copy_counter(name, original))
        self._saved["to"] = torch.Tensor.to
        torch.Tensor.to = self._device_mover(torch.Tensor.to)
        self._factories = {name: getattr(torch, name) for name in FROM_HOST_DATA}
        for name, original in self._factories.items():
            setattr(torch, name, self._upload_counter(name, original))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        for name, original in self._factories.items():
            setattr(torch, name, original)

    def _copy_counter(self, name: str, original):
        counter = self

        def counted(t: torch.Tensor, *args, **kwargs):
            if not counter.everything and t not in counter.marked:
                return original(t, *args, **kwargs)
            counter._count("copies", f".{name}() of {list(t.shape)}")
            out = original(t, *args, **kwargs)
            if isinstance(out, torch.Tensor):  # on the host now: a fresh, unmarked tensor
                out = out.clone()
                counter.marked.pop(out, None)
            return out

        return counted

    def _upload_counter(self, name: str, original):
        counter = self

        def made(data, *args, **kwargs):
            out = original(data, *args, **kwargs)
            on_host = not isinstance(data, torch.Tensor) or not counter._is_marked(data)
            if kwargs.get("device") is not None and on_host:
                counter._count("uploads", f"torch.{name} of host data on the device")
                counter.marked[out] = True
            return out

        return made

    def _device_mover(self, original):
        counter = self

        def to(t: torch.Tensor, *args, **kwargs):
            out = original(t, *args, **kwargs)
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is None or not non_blocking:
                return out  # a dtype change, or host code: marked or not as its input
            if out is t:  # a move to the device: a new tensor there, as on a GPU
                out = t.clone()
            counter.marked[out] = True
            return out

        return to
