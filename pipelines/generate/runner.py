"""The Ray side of batch generation: read and prepare the input, then stream it through the actor pool.

    from pipelines.generate.runner import prepare_input, generation_stream
    prepared = prepare_input(cfg, spec, model)                 # on the driver (small) or in Ray Data tasks
    for batch in generation_stream(cfg, prepared, plan, pending, model): ...   # output rows, chunk order

Small inputs (<= driver_max_bytes) are read, prepared and ordered on the driver, so the actors are Ray's
first work; bigger ones are read and prepared by Ray Data tasks and ordered by a Ray Data sort. Rows
reach the actors ordered by (chunk, prompt length) and the driver in order, so it can commit early.
Does not: start Ray (pipelines.runtime.ensure_ray, called by run), or commit anything (commit.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.util.annotations import RayDeprecationWarning

from pipelines.generate.config import GenerateConfig
from pipelines.generate.io import input_bytes, list_input_files, read_input_local
from pipelines.generate.plan import InputSpec, Plan, pending_selector, select_pending
from pipelines.generate.predictor import GenerationPredictor
from pipelines.generate.prepare import prepare_batch
from pipelines.runtime import is_local

LOCAL_PREPARE_ROWS = 8192  # rows per prepare_batch call on the driver


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint as the run sees it (resolved once on the driver)."""
    local_dir: str  # a local copy (the path itself for local checkpoints)
    checkpoint_id: str
    tokenizer_id: str
    block_size: int


@dataclass
class PreparedInput:
    """Prepared rows (see prepare.prepare_batch): tables on the driver, or a materialized Ray Dataset."""
    local_blocks: list[pa.Table] | None = None
    dataset: ray.data.Dataset | None = None

    def ids_table(self) -> pa.Table:
        """_id, _hash and _n of every prepared row (what the plan is made of)."""
        cols = ["_id", "_hash", "_n"]
        if self.local_blocks is not None:
            parts = [t.select(cols) for t in self.local_blocks]
        else:
            assert self.dataset is not None
            parts = [ray.get(r) for r in self.dataset.select_columns(cols).to_arrow_refs()]
        parts = [t for t in parts if t.num_rows]
        if parts:
            return pa.concat_tables(parts)
        return pa.table({"_id": pa.array([], pa.string()), "_hash": pa.array([], pa.string()),
                         "_n": pa.array([], pa.int32())})


def read_input(uri: str, input_format: str = "auto") -> ray.data.Dataset:
    """A Ray Dataset over the input files (Parquet, JSONL or CSV; any fsspec URL)."""
    fs, files, fmt = list_input_files(uri, input_format)
    filesystem = None if is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    # about one block per 32 MiB (Ray's default splits even a small file into many tiny blocks, each
    # a task later on); never fewer blocks than files
    try:
        total = sum(int(fs.size(f) or 0) for f in files)
    except Exception:
        total = 0
    blocks = max(len(files), min(1000, -(-total // (32 << 20))))
    # partitioning=None: a `dt=...` directory must not add columns (ids hash the row's own columns)
    kw = dict(filesystem=filesystem, partitioning=None, override_num_blocks=blocks)
    if fmt == "parquet":
        return ray.data.read_parquet(files, **kw)
    if fmt == "jsonl":
        # the Arrow JSON reader (lines=False) reads JSON Lines and keeps JSON types ("007" stays a string;
        # the pandas reader behind lines=True would turn it into 7)
        return ray.data.read_json(files, file_extensions=None, **kw)
    return ray.data.read_csv(files, file_extensions=None, **kw)


def prepare_input(cfg: GenerateConfig, spec: InputSpec, model: ModelInfo) -> PreparedInput:
    """Read the input and turn its rows into prompt rows: here for small inputs, in Ray Data tasks otherwise."""
    prep_kw = dict(ckpt_dir=model.local_dir, id_column=spec.id_column, template=spec.template,
                   max_field_chars=cfg.max_field_chars, param_columns=spec.param_columns,
                   sampling=dict(cfg.sampling), seed=cfg.seed, block_size=model.block_size)
    if input_bytes(cfg.input, cfg.input_format) <= cfg.driver_max_bytes:
        # small input: read and prepare right here; Ray's first work is the generation itself
        table = read_input_local(cfg.input, cfg.input_format)
        step = LOCAL_PREPARE_ROWS
        return PreparedInput(local_blocks=[prepare_batch(table.slice(i, step), **prep_kw)
                                           for i in range(0, table.num_rows, step)])
    ds = read_input(cfg.input, cfg.input_format).map_batches(
        prepare_batch, batch_format="pyarrow", zero_copy_batch=False, fn_kwargs=prep_kw).materialize()
    return PreparedInput(dataset=ds)


def _work(cfg: GenerateConfig, prepared: PreparedInput, plan: Plan, pending: list[int]) -> ray.data.Dataset:
    """The rows of the pending chunks, ordered by (chunk, prompt length), in blocks of two batches."""
    sel = pending_selector(plan, pending)
    # two batches per block (= per actor task): actors share the work and a block's outputs reach the
    # driver, which commits the chunks they complete, soon after it was generated
    rows_per_block = cfg.batch_size * 2
    if prepared.local_blocks is not None:
        # small job: order the rows on the driver (one pass, no shuffle tasks)
        parts = [select_pending(t, **sel) for t in prepared.local_blocks]
        table = pa.concat_tables(parts, promote_options="default").sort_by([("_chunk", "ascending"),
                                                                              ("_plen", "ascending")])
        return ray.data.from_arrow([table.slice(i, rows_per_block)
                                    for i in range(0, table.num_rows, rows_per_block)])
    # big job: Ray Data sort by (chunk, prompt length); the sort's output blocks = its input blocks
    assert prepared.dataset is not None
    n_rows = sum(plan["chunks"][i]["ids"] for i in pending)
    n_blocks = max(2 * cfg.concurrency, min(2000, -(-n_rows // rows_per_block)))
    return (prepared.dataset.map_batches(select_pending, batch_format="pyarrow", zero_copy_batch=False,
                                         fn_kwargs=sel)
            .repartition(n_blocks).sort(["_chunk", "_plen"]))


def generation_stream(cfg: GenerateConfig, prepared: PreparedInput, plan: Plan, pending: list[int],
                      model: ModelInfo) -> Iterator[pa.Table]:
    """Output rows (with _chunk) of the pending chunks from an actor pool of GenerationPredictor, in order."""
    work = _work(cfg, prepared, plan, pending)
    # Bounded restarts/retries (Ray Data's own default is unlimited, which turns a deterministic crash
    # into a hang). Ray 2.60 has no named map_batches parameter for them; the generic
    # **ray_remote_args path still works but is deprecated (removal announced for Ray 2.64).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        out = work.map_batches(
            GenerationPredictor,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=False,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            fn_constructor_kwargs=dict(
                checkpoint=cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                torch_threads=cfg.torch_threads, quality=cfg.quality, pid_dir=cfg.testing.pid_dir,
                debug_delay_s=cfg.testing.debug_delay_s, keep_columns=list(cfg.keep_columns),
                checkpoint_id=model.checkpoint_id, tokenizer_id=model.tokenizer_id),
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )
    ctx = out.context
    ctx.execution_options.preserve_order = True  # chunks reach the driver in order -> early commits
    ctx.enable_progress_bars = bool(cfg.progress)
    yield from out.iter_batches(batch_format="pyarrow", batch_size=None)
