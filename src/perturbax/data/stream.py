"""Cells on disk: expression rows read on demand, and a background reader that prefetches them.

``from_anndata(read_h5ad(path, backed="r"), ..., on_disk=True)`` keeps the labels, times and
covariates in memory (small) and leaves ``X`` in the file as a :class:`DiskCells`: indexing it
gives another lazy view, ``np.asarray`` of a view reads its rows. ``fit`` then streams: it draws
each step's cells exactly as in memory (the same seed gives the same fit), reads their rows ahead
with :class:`Prefetch` and never holds more than a few steps of cells.

Reader: anndata's own backed reader, ``anndata.io.sparse_dataset`` over the file's ``X`` group
(h5py for ``.h5ad``, zarr for ``.zarr``), which reads only the requested rows of a CSR matrix
(``indptr`` -> the slices of ``data``/``indices``); dense ``X`` is read by row selection of the
array. It keeps no copy of the matrix and needs no extra dependency (a loader library such as
torch's ``DataLoader`` would add one and duplicate the sampling, which must stay that of ``fit``).
CSC files are refused (a row of CSC touches every column: rewrite the file as CSR).

Fast path for ``.h5ad`` (:class:`_MappedCSR`): anndata reads a random set of CSR rows with one
HDF5 call per row and array, ~30 us per row: 8 ms for the 256 rows of an ELBO step, as long as
the step itself. Where ``data`` and ``indices`` are stored uncompressed (anndata's default), their
bytes sit at known offsets of the file (one per HDF5 chunk), so the rows are gathered with one
vectorised read of a memory map of the file per 1,024 rows (~4x faster; each map is closed after
its read, so the pages read do not stay in the process's memory). Compressed or unusual layouts
keep anndata's reader.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["DiskCells", "Prefetch", "on_disk", "read_obs", "dense_bytes", "available_memory", "stream_plan",
           "output_plan"]


class _Source:
    """One open matrix of a file (``.h5ad``: HDF5, ``.zarr``: a zarr store), read under a lock."""

    def __init__(self, path: str | Path, key: str = "X"):
        import anndata as ad

        self.path = str(path)
        if Path(self.path).suffix == ".zarr" or Path(self.path).is_dir():
            import zarr

            self._file, self._hdf5 = zarr.open_group(self.path, mode="r"), False
        else:
            import h5py

            self._file, self._hdf5 = h5py.File(self.path, "r"), True
        if key not in self._file:
            raise KeyError(f"{self.path} has no matrix {key!r}; write the expression to X.")
        elem = self._file[key]
        encoding = elem.attrs.get("encoding-type", "array")
        if encoding == "csc_matrix":
            raise ValueError(
                f"X of {self.path} is stored CSC, which cannot be read by cells; rewrite it as CSR: "
                f"`adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)`."
            )
        self.sparse = encoding == "csr_matrix"
        self.mat = ad.io.sparse_dataset(elem) if self.sparse else elem
        self.mapped = _MappedCSR.attempt(self.path, elem) if self.sparse and self._hdf5 else None
        self.shape = tuple(int(s) for s in self.mat.shape)
        self.lock = threading.Lock()
        self._row_sums: np.ndarray | None = None

    def read(self, rows: np.ndarray):
        """Rows ``rows`` (sorted, distinct) as they are stored (CSR or dense)."""
        with self.lock:
            if self.mapped is not None:
                return self.mapped.rows(rows)
            if self.sparse:
                return self.mat[rows]
            return self.mat.oindex[rows] if hasattr(self.mat, "oindex") else self.mat[rows]

    def dense(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 rows (any order, repeats allowed)."""
        uniq, inv = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        block = self.read(uniq) if uniq.size else np.zeros((0, self.shape[1]), np.float32)
        block = block[inv.reshape(-1)]  # (reordered while sparse: cheaper than dense rows)
        return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)

    def blocks(self, rows: np.ndarray, size: int = 16384) -> Iterator[tuple[int, Any]]:
        """``(offset, block)`` over ``rows`` in pieces of ``size`` cells, as stored (CSR: sparse)."""
        for a in range(0, rows.size, size):
            part = rows[a : a + size]
            if part.size and part[-1] - part[0] + 1 == part.size:  # a contiguous run: one slice
                with self.lock:
                    block = self.mat[int(part[0]) : int(part[-1]) + 1]
            else:
                uniq, inv = np.unique(part, return_inverse=True)
                block = self.read(uniq)[inv.reshape(-1)]
            yield a, (sp.csr_matrix(block, dtype=np.float32) if sp.issparse(block) else np.asarray(block, np.float32))

    def row_sums(self) -> np.ndarray:
        """Total of every row of the file (computed once, in one sequential pass)."""
        if self._row_sums is None:
            out = np.empty(self.shape[0], np.float32)
            for a, block in self.blocks(np.arange(self.shape[0])):
                out[a : a + block.shape[0]] = np.asarray(block.sum(axis=1)).reshape(-1)
            self._row_sums = out
        return self._row_sums


class _MappedCSR:
    """The rows of a CSR matrix stored uncompressed in an HDF5 file, gathered from a memory map.

    Holds ``indptr`` (8 bytes per cell) and, per array (``data``, ``indices``), the file offset of
    every HDF5 chunk of ``chunk`` elements (one offset for a contiguous array): element ``i`` lies
    at ``offset[i // chunk] + (i % chunk) * itemsize``. Built by :meth:`attempt`, which returns
    ``None`` for any layout this does not cover (filters, unallocated chunks, foreign byte order, a
    user block)."""

    def __init__(self, path: str, indptr: np.ndarray, arrays: dict[str, tuple[np.dtype, int, np.ndarray]],
                 n_cols: int):
        self.path, self.indptr, self.arrays, self.n_cols = path, indptr, arrays, n_cols
        self._fh = open(path, "rb")  # noqa: SIM115 -- kept for the life of the reader

    @classmethod
    def attempt(cls, path: str, group) -> _MappedCSR | None:
        import h5py

        try:
            if group.file.id.get_create_plist().get_userblock():  # (addresses would be off by its size)
                return None
            arrays = {}
            for key in ("data", "indices"):
                d = group[key]
                if (not isinstance(d, h5py.Dataset) or d.ndim != 1 or d.dtype.kind not in "iuf" or not d.dtype.isnative
                        or d.id.get_create_plist().get_nfilters() != 0):
                    return None
                size = d.dtype.itemsize
                if d.chunks is None:
                    offset = d.id.get_offset()
                    if offset is None:  # not allocated (empty) or compact
                        return None
                    chunk, offsets = max(1, d.shape[0]), np.array([offset], np.int64)
                else:
                    chunk = int(d.chunks[0])
                    table: list[tuple[int, int]] = []
                    if hasattr(d.id, "chunk_iter"):
                        d.id.chunk_iter(lambda info: table.append((info.chunk_offset[0], info.byte_offset)))
                    else:
                        for i in range(d.id.get_num_chunks()):
                            info = d.id.get_chunk_info(i)
                            table.append((info.chunk_offset[0], info.byte_offset))
                    if len(table) != -(-d.shape[0] // chunk):  # a chunk never written: fill values, not bytes
                        return None
                    t = np.array(sorted(table), dtype=np.int64).reshape(-1, 2)
                    offsets = t[:, 1]
                arrays[key] = (d.dtype, chunk, offsets)
            indptr = np.asarray(group["indptr"][:], dtype=np.int64)
            n_cols = int(group.attrs["shape"][1])
        except (KeyError, AttributeError, ValueError, TypeError, OSError):
            return None
        return cls(path, indptr, arrays, n_cols)

    #: Rows read through one memory map.
    MAP_ROWS = 1024

    @staticmethod
    def _gather(mm, dtype: np.dtype, chunk: int, offsets: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Elements ``pos`` of the array whose chunks start at byte ``offsets`` of the map ``mm``."""
        size = dtype.itemsize
        first = offsets[pos // chunk]  # byte offset of each element's chunk
        shifts = np.unique(offsets % size) if offsets.size > 1 else offsets % size  # chunks may start at any byte
        values = np.empty(pos.size, dtype)
        for shift in shifts.tolist():
            view = np.frombuffer(mm, dtype=dtype, offset=shift, count=(len(mm) - shift) // size)
            sel = slice(None) if shifts.size == 1 else (first % size == shift)
            values[sel] = view[(first[sel] - shift) // size + pos[sel] % chunk]  # a copy: the map can close
            del view
        return values

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows ``rows`` (any order) as a CSR matrix of the stored dtype."""
        import mmap

        rows = np.asarray(rows, dtype=np.int64)
        start, stop = self.indptr[rows], self.indptr[rows + 1]
        lengths = stop - start
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        pos = np.repeat(start - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)  # element numbers
        out = {key: np.empty(pos.size, dtype) for key, (dtype, _, _) in self.arrays.items()}
        # one map per MAP_ROWS rows: the pages a read touches (and the kernel maps around them) count
        # in the process's memory until the map closes
        for a in range(0, rows.size, self.MAP_ROWS):
            part = slice(int(indptr[a]), int(indptr[min(a + self.MAP_ROWS, rows.size)]))
            with mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if hasattr(mm, "madvise"):  # scattered rows: no read-ahead around them
                    mm.madvise(mmap.MADV_RANDOM)
                for key, (dtype, chunk, offsets) in self.arrays.items():
                    out[key][part] = self._gather(mm, dtype, chunk, offsets, pos[part])
        return sp.csr_matrix((out["data"], out["indices"], indptr), shape=(rows.size, self.n_cols))


class DiskCells:
    """Rows of an on-disk expression matrix (a lazy view; shape ``(n_cells, n_genes)``).

    ``view[idx]`` is another view (no data read); ``np.asarray(view)`` reads its rows (dense
    float32); ``view.sum(axis=1)`` gives row totals; :meth:`blocks` iterates over the rows in
    pieces for checks."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, source: _Source, rows: np.ndarray | None = None):
        self._source = source
        self._rows = np.arange(source.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)

    @classmethod
    def open(cls, path: str | Path, obs_names: Iterable[str] | None = None) -> DiskCells:
        """The cells of the ``X`` of an ``.h5ad`` file or ``.zarr`` store: all of them, or those
        named ``obs_names`` (in that order; e.g. a view of a backed AnnData)."""
        src = _Source(path)
        if obs_names is None:
            return cls(src)
        import anndata as ad
        import pandas as pd

        obs = src._file["obs"]
        index = pd.Index(np.asarray(ad.io.read_elem(obs[obs.attrs["_index"]])).astype(str))
        rows = index.get_indexer(pd.Index(list(obs_names)).astype(str))
        if (rows < 0).any() or not index.is_unique:
            raise ValueError(f"The cells of {src.path} cannot be found by name; make obs_names unique and re-write the file.")
        return cls(src, rows)

    @property
    def path(self) -> str:
        return self._source.path

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._rows.size), self._source.shape[1])

    def __len__(self) -> int:
        return int(self._rows.size)

    def __getitem__(self, key) -> DiskCells:
        if isinstance(key, tuple):
            raise TypeError("Cells on disk are indexed by rows only (select genes after reading the rows).")
        return DiskCells(self._source, np.atleast_1d(self._rows[key]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._source.dense(self._rows)
        return out if dtype is None else out.astype(dtype, copy=False)

    def sum(self, axis=None):
        if axis not in (1, -1):
            raise ValueError("DiskCells.sum supports axis=1 (cell totals) only.")
        return self._source.row_sums()[self._rows][:, None]

    def copy(self) -> DiskCells:
        return self  # immutable

    def blocks(self, size: int = 16384) -> Iterator[tuple[int, Any]]:
        """``(offset, rows)`` pieces of ``size`` cells, as stored (CSR: scipy sparse)."""
        return self._source.blocks(self._rows, size)


def read_obs(path: str | Path):
    """An AnnData with the ``obs`` and ``var`` of an ``.h5ad`` file or ``.zarr`` store and no ``X``
    (for ``from_anndata(read_obs(path), ..., on_disk=path)``)."""
    import anndata as ad

    f = _Source(path)._file
    return ad.AnnData(obs=ad.io.read_elem(f["obs"]), var=ad.io.read_elem(f["var"]))


def on_disk(obj) -> bool:
    """Whether ``obj`` (a :class:`~perturbax.data.PerturbationData` or a matrix) holds its cells on disk."""
    return isinstance(getattr(obj, "X", obj), DiskCells)


def dense_bytes(n_cells: int, n_genes: int) -> int:
    """Bytes of the dense float32 matrix a fit holds in memory for ``n_cells`` cells."""
    return int(n_cells) * int(n_genes) * 4


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``, else the free
    physical pages), or ``None`` where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


#: In memory a fit holds the file's matrix, a dense host copy of the training cells and the device
#: copy (on CPU, host memory again): about this many times the dense size.
MEMORY_FACTOR = 2.5


def _too_big(need: float, free: int | None) -> bool:
    """The rule of every automatic in-memory vs streamed choice: stream when ``need`` bytes exceed
    half the available memory (never where that cannot be read)."""
    return free is not None and need > 0.5 * free


def _free_text(free: int | None) -> str:
    return "available memory unknown" if free is None else f"{free / 2**30:.1f} GB available"


def stream_plan(n_cells: int, n_genes: int, stream: bool | None = None, available: int | None = None) -> tuple[bool, str]:
    """Whether to stream cells from disk (``stream=None``: when ``MEMORY_FACTOR`` x the dense size
    exceeds half the available memory; in memory where that cannot be read), and a line that says
    which and why."""
    need = MEMORY_FACTOR * dense_bytes(n_cells, n_genes)
    free = available_memory() if available is None else int(available)
    size = f"{n_cells} cells x {n_genes} genes (~{need / 2**30:.1f} GB in memory; {_free_text(free)})"
    if stream is None:
        choice = _too_big(need, free)
        why = "chosen from the size; " + ("--no-stream to load it" if choice else "--stream to read from disk")
    else:
        choice, why = bool(stream), "as asked"
    return choice, f"Data: {size}: {'streamed from disk' if choice else 'in memory'} ({why})."


def output_plan(n_cells: int, n_genes: int, need: float, stream: bool | None = None, available: int | None = None,
                chunk_cells: int | None = None) -> tuple[bool, str]:
    """Whether to write ``n_cells`` predicted cells x ``n_genes`` genes to the output file in chunks
    (``stream=None``: when ``need``, the bytes of the prediction built in memory, exceeds half the
    available memory -- the rule of :func:`stream_plan`), and a line that says which and why."""
    free = available_memory() if available is None else int(available)
    size = f"{n_cells} cells x {n_genes} genes (~{need / 2**30:.1f} GB in memory; {_free_text(free)})"
    if stream is None:
        choice = _too_big(need, free)
        why = "chosen from the size; " + ("--no-stream-output to build it in memory" if choice
                                          else "--stream-output to write it in chunks")
    else:
        choice, why = bool(stream), "as asked"
    how = f"written in chunks of about {chunk_cells} cells" if choice and chunk_cells else (
        "written in chunks" if choice else "built in memory")
    return choice, f"Output: {size}: {how} ({why})."


class _Failure(tuple):
    """An error of the producer thread, handed to the consumer."""


class Prefetch:
    """``(a, fn(a))`` for each ``a`` of ``args``, in order, computed by a background thread up to
    ``depth`` items ahead of the consumer (reading from disk while the device computes). An error in
    ``fn`` is raised by ``next``; :meth:`close` stops the thread (call it when leaving early)."""

    def __init__(self, fn: Callable[[Any], Any], args: Iterable[Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, list(args)), daemon=True, name="perturbax-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, fn, args) -> None:
        try:
            for a in args:
                if self._stop.is_set() or not self._put((a, fn(a))):
                    return
        except BaseException as err:  # handed to the consumer
            self._put(_Failure((err,)))

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise StopIteration from None
        if isinstance(item, _Failure):
            raise item[0]
        return item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
