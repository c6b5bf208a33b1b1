"""Weight sync Megatron -> inference engines, from the converter's streamed Hugging Face buckets.

``WeightSync.sync(model, version)`` is collective over the trainer's ranks (``export_hf`` is);
global rank 0 talks to the engines. Every route runs the same sequence on every server:
pause -> flush_cache -> [begin_weight_update] -> send -> [end_weight_update] -> continue, and sets
the weight version that every later sample carries.

Routes:
- ``distributed``: a fresh process group of 1 + (GPUs of all servers) (``/init_weights_update_group``,
  once), then per bucket ``/update_weights_from_distributed`` with names/dtypes/shapes while rank 0
  broadcasts each tensor. NCCL on clusters; gloo against the local engine (tested here).
- ``disk``: an HF checkpoint written by ``save_hf_checkpoint`` and ``/update_weights_from_disk``.
- ``tensor``: colocated servers, ``/update_weights_from_tensor`` with one ForkingPickler payload per
  server TP rank (CUDA IPC handles: same node and GPU only; cannot run on CPU machines, so only the
  payload format is tested here).
- ``inprocess``: a ``LocalEngine`` object living in the trainer process.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time
from dataclasses import dataclass

import torch

from megatron_vespo.rollout.client import ControlError, EngineControl

ROUTES = ("distributed", "disk", "tensor", "inprocess")
# files an engine needs besides the weights to load an HF directory
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "tokenizer.model", "generation_config.json", "chat_template.jinja")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# torch.multiprocessing.reductions.reduce_tensor: the CUDA rebuild's argument naming the device
_CUDA_REBUILD_DEVICE_ARG = 6


def _reduce_cuda_tensor_by_uuid(tensor: torch.Tensor):
    """torch's CUDA-IPC reduction of ``tensor`` with its device named by UUID instead of index: a
    server started with other CUDA_VISIBLE_DEVICES numbers the GPUs differently. SGLang's receiver
    takes an index or a UUID (srt/utils/patch_torch.py, applied before every rank deserialises)."""
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if not tensor.is_cuda:
        return rebuild, args
    if rebuild is not reductions.rebuild_cuda_tensor or args[_CUDA_REBUILD_DEVICE_ARG] != tensor.device.index:
        raise RuntimeError("torch's CUDA tensor reduction changed shape (expected rebuild_cuda_tensor with the "
                           f"device index at argument {_CUDA_REBUILD_DEVICE_ARG}); the tensor route cannot name "
                           "the device by UUID")
    uuid = str(torch.cuda.get_device_properties(tensor.device.index).uuid)
    return rebuild, (*args[:_CUDA_REBUILD_DEVICE_ARG], uuid, *args[_CUDA_REBUILD_DEVICE_ARG + 1:])


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)`` (ForkingPickler,
    base64), CUDA devices named by UUID. Each call is one set of CUDA-IPC handles, counted once by
    torch's producer-side reference counting: one call per receiving process."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    for tensor_type in {type(t) for _, t in named_tensors} | {torch.Tensor}:
        pickler.dispatch_table[tensor_type] = _reduce_cuda_tensor_by_uuid
    pickler.dump(named_tensors)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def tensor_route_bodies(bucket, tp_sizes: list[int], version: str | None) -> list[dict]:
    """One ``/update_weights_from_tensor`` body per server: SGLang's TP rank r loads entry r of
    ``serialized_named_tensors`` (srt/managers/tp_worker.py: deserialize_own_rank), so a server of
    TP size t gets t separate serialisations (one handle set per process)."""
    bodies = []
    for tp in tp_sizes:
        body = {"serialized_named_tensors": [serialize_named_tensors(bucket) for _ in range(tp)],
                "flush_cache": version is not None}
        if version is not None:
            body["weight_version"] = version
        bodies.append(body)
    return bodies


@dataclass
class SyncReport:
    version: str
    route: str
    buckets: int
    bytes: int
    seconds: float


class WeightSync:
    def __init__(self, route: str, m, *, control: EngineControl | None = None, engine=None,
                 bucket_bytes: int = 512 * 2**20, dtype: torch.dtype = torch.bfloat16, hf_config: dict | None = None,
                 disk_dir: str | None = None, side_files_from: str | None = None,
                 master_address: str = "127.0.0.1", master_port: int = 0, backend: str = "nccl",
                 group_name: str = "megatron_vespo_weights", pause_mode: str = "abort"):
        if route not in ROUTES:
            raise ValueError(f"weight sync route must be one of {ROUTES}, got {route!r}")
        # only global rank 0 talks to the engines; the other ranks just take part in the export
        if route == "inprocess" and engine is None and self._rank() == 0:
            raise ValueError("the inprocess route needs the LocalEngine object (engine=...)")
        if route != "inprocess" and control is None and self._rank() == 0:
            raise ValueError(f"the {route} route needs EngineControl over the server URLs (control=...)")
        if route == "disk" and (disk_dir is None or hf_config is None):
            raise ValueError("the disk route needs disk_dir and hf_config (the model's config.json)")
        self.route, self.m, self.control, self.engine = route, m, control, engine
        self.bucket_bytes, self.dtype, self.hf_config = bucket_bytes, dtype, hf_config
        self.disk_dir, self.side_files_from = disk_dir, side_files_from
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.group_name, self.pause_mode = group_name, pause_mode
        self._tp_sizes: list[int] | None = None  # each server's TP size (tensor route)
        self._group = None
        self._session = False  # a /begin_weight_update is outstanding
        self._previous_dir = None

    @staticmethod
    def _rank() -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def sync(self, model, version: str) -> SyncReport | None:
        """Send ``model`` (this rank's chunk or chunk list) to the engines as ``version``.
        Collective over trainer ranks; returns the report on rank 0, None elsewhere."""
        from megatron_vespo.convert.export import export_hf, save_hf_checkpoint

        rank = self._rank()
        start = time.perf_counter()
        sent = {"buckets": 0, "bytes": 0}

        def buckets():
            for bucket in export_hf(model, self.m, bucket_bytes=self.bucket_bytes, dst=0, dtype=self.dtype):
                if rank == 0:
                    sent["buckets"] += 1
                    sent["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        if self.route == "inprocess":
            if rank == 0:  # the same sequence as over HTTP: the engine holds no batch while updating
                self.engine.pause(self.pause_mode)
                self.engine.flush_cache()
            try:
                for bucket in buckets():
                    if rank == 0 and bucket:
                        self.engine.update_from_named_tensors(bucket)
                if rank == 0:
                    self.engine.set_weight_version(version)
            finally:
                if rank == 0:
                    self.engine.resume()
        elif self.route == "disk":
            target = os.path.join(self.disk_dir, f"weights-{version}")
            self._on_servers(self._prepare_servers)
            failure = None
            try:
                save_hf_checkpoint(model, self.m, target, self.hf_config, bucket_bytes=self.bucket_bytes,
                                   dtype=self.dtype)
                if rank == 0:
                    self._copy_side_files(target)
                    self.control.update_weights_from_disk(os.path.abspath(target), version)
            except BaseException as err:
                failure = err
            self._finish(failure, session=False)
            if rank == 0:
                sent["bytes"] = sum(os.path.getsize(os.path.join(target, f)) for f in os.listdir(target)
                                    if f.endswith(".safetensors"))
                if self._previous_dir and self._previous_dir != target:
                    shutil.rmtree(self._previous_dir, ignore_errors=True)  # keep one copy on disk
                self._previous_dir = target
        else:
            self._on_servers(self._open_update)
            failure = None
            previous = None
            for bucket in buckets():  # every rank drains the export (it is collective), even after a failure
                if rank != 0 or failure is not None:
                    continue
                try:  # the version goes with the last bucket: tag it once the generator is exhausted
                    if previous is not None:
                        self._send(previous, None)
                    previous = bucket
                except BaseException as err:
                    failure = err
            if rank == 0 and failure is None and previous is not None:
                try:
                    self._send(previous, version)
                except BaseException as err:
                    failure = err
            self._finish(failure, session=True)
        if rank != 0:
            return None
        return SyncReport(version, self.route, sent["buckets"], sent["bytes"], time.perf_counter() - start)

    # -- steps ----------------------------------------------------------------------------------

    def _on_servers(self, step) -> None:
        """Run ``step`` on rank 0 and make every rank raise if it failed (before the collective
        export starts, so no rank waits for one that has given up); rank 0 resumes the servers
        first, so a failed sync never leaves them paused."""
        failure = None
        if self._rank() == 0:
            try:
                step()
            except BaseException as err:
                failure = err
        self._finish(failure, session=self.route in ("distributed", "tensor"), release=failure is not None)

    def _finish(self, failure: BaseException | None, session: bool, release: bool = True) -> None:
        """Rank 0 resumes the servers (when ``release``) whatever happened; then every rank raises
        if rank 0 failed (its first error wins over one from resuming)."""
        if self._rank() == 0 and release:
            try:
                self._release_servers(session)
            except ControlError as err:
                failure = failure or err
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from megatron_vespo import comm

            message = comm.broadcast_object(message)
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"weight sync failed on rank 0: {message}")

    def _prepare_servers(self):
        self.control.pause(self.pause_mode)
        self.control.flush_cache()

    def _open_update(self):
        self._prepare_servers()
        self._session = True
        self.control.begin_weight_update()
        if self.route == "distributed" and self._group is None:
            self._init_group()
        if self.route == "tensor" and self._tp_sizes is None:
            self._tp_sizes = [int(info.get("tp_size", 1) or 1) for info in
                              self.control.call("/server_info", method="GET", check_success=False)]

    def _release_servers(self, session: bool) -> None:
        """End the update session (when one was asked for) and resume generation on every server,
        whatever happened before; a failure here is reported after both were tried."""
        errors = []
        if session and self._session:
            self._session = False
            try:
                self.control.end_weight_update()
            except ControlError as err:
                errors.append(err)
        try:
            self.control.resume()
        except ControlError as err:
            errors.append(err)
        if errors:
            raise errors[0]

    def _copy_side_files(self, target):
        if not self.side_files_from:
            return
        for name in _SIDE_FILES:
            source = os.path.join(self.side_files_from, name)
            if os.path.exists(source):
                shutil.copy2(source, os.path.join(target, name))

    def _server_world_sizes(self) -> list[int]:
        """Weight-update group ranks per server. SGLang joins every worker of a server as
        ``rank_offset + tp_rank`` (model_runner_components/weight_updater.py), so a server takes
        tp_size ranks; pipeline stages would share them and data-parallel replicas are refused
        (tokenizer_control_mixin.py asserts dp_size == 1): such servers are an error here, named
        before anything is sent."""
        sizes = []
        infos = self.control.call("/server_info", method="GET", check_success=False)
        for url, info in zip(self.control.urls, infos):
            tp, pp, dp = (int(info.get(key, 1) or 1) for key in ("tp_size", "pp_size", "dp_size"))
            if pp > 1 or dp > 1:
                raise ValueError(
                    f"{url}: the distributed weight-sync route needs servers with pp_size = dp_size = 1, this one "
                    f"has pp_size {pp}, dp_size {dp} (SGLang {info.get('version', '?')} joins each worker as "
                    f"rank_offset + tp_rank: pipeline stages would take the same ranks, and data-parallel "
                    f"replicas are refused); use rollout.weight_sync = disk, or one server per replica")
            sizes.append(tp)
        return sizes

    def _init_group(self):
        from megatron_vespo.comm import StandaloneGroup

        sizes = self._server_world_sizes()
        world = 1 + sum(sizes)
        port = self.master_port or _free_port()
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        bodies = [{"master_address": self.master_address, "master_port": port, "rank_offset": off,
                   "world_size": world, "group_name": self.group_name, "backend": self.backend}
                  for off in offsets]
        errors = []

        def ask_servers():  # they block in the rendezvous until this process joins it
            try:
                self.control.call("/init_weights_update_group", bodies=bodies)
            except ControlError as err:
                errors.append(err)

        thread = threading.Thread(target=ask_servers, daemon=True)
        thread.start()
        group = StandaloneGroup(self.master_address, port, 0, world, backend=self.backend, group_name=self.group_name)
        thread.join()
        if errors:
            raise errors[0]
        self._group = group

    def _send(self, bucket, version):
        if self.route == "distributed":
            body = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                    "flush_cache": version is not None}
            if version is not None:
                body["weight_version"] = version
            errors = []

            def post():  # the servers answer only after receiving every tensor of the bucket
                try:
                    self.control.call("/update_weights_from_distributed", body)
                except ControlError as err:
                    errors.append(err)

            thread = threading.Thread(target=post, daemon=True)
            thread.start()
            device = "cuda" if self.backend == "nccl" else "cpu"
            for _, tensor in bucket:
                self._group.broadcast_(tensor.to(device).contiguous(), src=0)
            thread.join()
            if errors:
                raise errors[0]
        else:  # tensor: per server, one serialisation per TP rank, each rank loads its own entry
            device = "cuda" if torch.cuda.is_available() else "cpu"
            on_device = [(n, t.to(device)) for n, t in bucket]
            self.control.call("/update_weights_from_tensor", bodies=tensor_route_bodies(on_device, self._tp_sizes, version))

    def close(self):
        """Tell the servers to drop the weight-update group (distributed route)."""
        if self._group is not None and self._rank() == 0:
            try:
                self.control.call("/destroy_weights_update_group", {"group_name": self.group_name})
            except ControlError:
                pass
            self._group = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
