"""Runs the model for one scheduled step: owns the KV cache, turns the step's rows into packed
kernel inputs, replays CUDA graphs for decode (plain, or cascade attention when the rows share
enough prefix blocks), and samples the next tokens, which it hands back as a SampledTokens still
on its way to the host (async scheduling launches the next step first)."""

import time

import numpy as np
import torch

from minivllm.engine.attention import AttentionMetadata
from minivllm.engine.config import MAX_CACHE_SLOTS, Config
from minivllm.engine.qwen3 import Qwen3ForCausalLM
from minivllm.engine.sampler import sample
from minivllm.engine.scheduler import ScheduledStep
from minivllm.engine.sequence import PENDING, Sequence
from minivllm.engine.step_profile import StepRecord
from minivllm.engine.tensor_parallel import TPGroup
from minivllm.kernels.cascade_attention import cascade_config

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Row counts the LM head runs at: a step's sampled rows are padded up to the next one. cuBLAS
# picks (and lazily loads) a kernel per M, and a kernel's first load holds the host for tens of
# milliseconds; with a few Ms, all met at start (_warm_logits), no step pays it. Steps of 16 rows
# past 16 keep the padding under 16 rows, where the 8B's LM head at 512 rows would be compute-bound.
LOGITS_ROWS = (1, 2, 4, 8, *range(16, 513, 16))


def logits_rows(rows: int) -> int:
    """The LOGITS_ROWS entry a step of `rows` sampled rows runs its LM head at; `rows` itself past the last."""
    return next((r for r in LOGITS_ROWS if r >= rows), rows)


class SampledTokens:
    """One step's sampled token ids (int64 on the device, one per sampled row), copied to pinned
    host memory behind the step's work; result() waits for that copy alone, so a later step
    already launched keeps the device busy meanwhile."""

    def __init__(self, tokens: torch.Tensor, tp: TPGroup):
        self.tp, self.done = tp, None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = tokens

    def result(self) -> list[int]:
        if self.done is not None:
            self.tp.wait_event(self.done)
        return self.host.tolist()


class ModelRunner:
    def __init__(self, config: Config, model: Qwen3ForCausalLM, dtype: torch.dtype):
        self.config, self.model, self.dtype = config, model, dtype
        self.device = config.device
        self.block_size = config.kvcache_block_size
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        if config.num_kvcache_blocks == -1:
            # Each rank sizes its own cache; the schedule is shared, so all take the smallest.
            config.num_kvcache_blocks = model.tp.min(self._blocks_that_fit())
        config.check_cache_holds_one_sequence()
        a = model.args
        # One allocation, (2, layers, blocks, block_size, kv_heads, head_dim): layer i reads [0, i], [1, i].
        self.kv_cache = torch.empty(
            2, a.num_layers, config.num_kvcache_blocks, self.block_size, model.num_kv_heads, a.head_dim, dtype=dtype, device=self.device
        )
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(a.num_layers)]
        # (batch rows, cascade) -> (graph, its static inputs and output)
        self.graphs: dict[tuple[int, bool], tuple] = {}
        self.cascade_steps = 0  # decode steps that took cascade attention
        # Two pinned decode input buffers, used in turn: under async scheduling the host packs a
        # step while the copy of the one before may still be queued.
        self._packed: list[torch.Tensor | None] = [None, None]
        self._packed_turn = 0
        # The last launched step's sampled tokens, on the device, and the row each sequence's sits
        # in: the next step reads a token the host does not know yet from here.
        self.sampled = torch.zeros(config.max_num_seqs, dtype=torch.int32, device=self.device)
        self.sampled_row: dict[int, int] = {}
        if self.device.type == "cuda" and not config.enforce_eager and model.backend.cuda_graphs:
            self._capture_decode_graphs()
        if self.device.type == "cuda":
            self._warm_logits()

    def _block_bytes(self) -> int:
        a = self.model.args
        return 2 * a.num_layers * self.block_size * self.model.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8

    def _blocks_that_fit(self) -> int:
        """Blocks for what is left of gpu_memory_utilization x total memory once the weights and
        the largest prefill's activations are in; on the CPU, cpu_kvcache_bytes worth. At most
        MAX_CACHE_SLOTS tokens' worth, whatever the memory."""
        if self.device.type != "cuda":
            budget = self.config.cpu_kvcache_bytes
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._dry_run_prefill()
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_reserved(self.device)
            budget = total * self.config.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated(self.device)
        return max(1, min(int(budget) // self._block_bytes(), MAX_CACHE_SLOTS // self.block_size))

    @torch.inference_mode()
    def _dry_run_prefill(self) -> None:
        """The biggest prefill a step can hold, with writes to a one-block cache skipped, to measure
        peak activation memory."""
        c, a = self.config, self.model.args
        longest = min(c.max_model_len, c.max_num_batched_tokens)
        lens = [longest] * max(1, min(c.max_num_seqs, c.max_num_batched_tokens // longest))
        tokens = sum(lens)
        cache = torch.empty(1, self.block_size, self.model.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
        cu = torch.tensor([0, *lens], device=self.device).cumsum(0).to(torch.int32)
        meta = AttentionMetadata(
            True, torch.full((tokens,), -1, dtype=torch.int32, device=self.device), cu, cu, max(lens), max(lens)
        )
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        self.model.compute_logits(self.model(ids, pos, [(cache, cache)] * a.num_layers, meta)[cu[1:] - 1])
        self.model.tp.wait(self.device)

    def _to_device(self, values, dtype) -> torch.Tensor:
        """Host values (lists or numpy arrays) as a `dtype` tensor on the device, copied from pinned
        memory without blocking the host; pinned after building, since torch refuses to pin a
        tensor made from numpy."""
        t = torch.as_tensor(values, dtype=dtype)
        return (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """int32 (len(seqs), max_blocks_per_seq) on the device, -1 padded: the decode kernel takes
        max_model_len as every row's bound, which a table this wide holds."""
        width = self.max_blocks_per_seq
        return self._to_device([s.block_table + [-1] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _input_sources(self, seqs: list[Sequence], ids: list[int], positions: list[int]) -> list[int] | None:
        """For each input token, the row of self.sampled holding it when the host does not know it
        yet (PENDING), else -1; None when every id is known."""
        if PENDING not in ids:
            return None
        src = [-1] * len(ids)
        for i, (token, seq) in enumerate(zip(ids, seqs, strict=True)):
            if token == PENDING:
                if seq.seq_id not in self.sampled_row:
                    raise RuntimeError(f"sequence {seq.seq_id}'s token at position {positions[i]} is pending but the last step did not sample it")
                src[i] = self.sampled_row[seq.seq_id]
        return src

    def _resolve_ids(self, ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """ids with each PENDING one replaced by the device's sampled token its src row names."""
        return torch.where(src >= 0, self.sampled[src.clamp_min(0)].to(ids.dtype), ids)

    def prepare_chunks(self, step: ScheduledStep):
        """(ids, positions, meta, rows to sample) for a step with prefill chunks: row i computes
        tokens [starts[i], starts[i] + num_new[i]) of its sequence. Rows of one new token (decode
        rows riding along, or a chunk of one) come first and attend as decode rows over their
        paged context (meta.decode_rows); the other rows follow, their keys spanning the sequence
        up to the chunk's end, read from the paged cache when any of them has KV there already
        (a cached prefix or an earlier chunk). Rows to sample are in step order."""
        order = sorted(range(len(step.seqs)), key=lambda i: step.num_new[i] != 1)  # stable
        singles = [i for i in order if step.num_new[i] == 1]
        chunks = order[len(singles) :]
        ids, owners, positions, slots, first = [], [], [], [], {}
        for i in order:
            seq, start, n = step.seqs[i], step.starts[i], step.num_new[i]
            first[i] = len(ids)
            ids += seq.token_ids[start : start + n]
            owners += [seq] * n
            pos = np.arange(start, start + n)
            positions.append(pos)
            slots.append(np.asarray(seq.block_table, dtype=np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size)
        cu_q, cu_k = [0], [0]
        for i in chunks:
            cu_q.append(cu_q[-1] + step.num_new[i])
            cu_k.append(cu_k[-1] + step.starts[i] + step.num_new[i])
        paged = any(step.starts[i] for i in chunks)
        # One table for both parts, a row slice each.
        tables = self._block_tables([step.seqs[i] for i in order]) if singles or paged else None
        d = len(singles)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._to_device(np.concatenate(slots), torch.int32),
            cu_seqlens_q=self._to_device(cu_q, torch.int32),
            cu_seqlens_k=self._to_device(cu_k, torch.int32),
            max_seqlen_q=max((step.num_new[i] for i in chunks), default=0),
            max_seqlen_k=max((b - a for a, b in zip(cu_k, cu_k[1:], strict=False)), default=0),
            block_tables=tables[d:] if paged else None,
            decode_rows=d,
            context_lens=self._to_device([step.starts[i] + 1 for i in singles], torch.int32) if d else None,
            # As in the decode graphs: the kernel's config and split count then depend on the row
            # count alone, so a step meets no variant the graphs' capture did not compile.
            max_context_len=self.config.max_model_len if d else 0,
            decode_block_tables=tables[:d] if d else None,
        )
        positions = np.concatenate(positions)
        src = self._input_sources(owners, ids, positions)
        input_ids = self._to_device(ids, torch.long)
        if src is not None:
            input_ids = self._resolve_ids(input_ids, self._to_device(src, torch.long))
        last = [first[i] + step.num_new[i] - 1 for i in range(len(step.seqs)) if step.samples[i]]
        return input_ids, self._to_device(positions, torch.long), meta, self._to_device(last, torch.long)

    def pack_decode(self, seqs: list[Sequence], positions: list[int], rows: int) -> torch.Tensor:
        """A decode step's host inputs, row i the token at positions[i] of seqs[i] (whose context
        it completes), in one int32 buffer of `rows` >= len(seqs) rows, so that one
        copy moves them: [ids (rows), id sources (rows), context_lens (rows), block tables (rows x
        max_blocks_per_seq), shared tokens (1)], padding rows holding token 0, source -1, context 0
        and a table of -1; the last entry is shared_tokens' count for these rows.
        An id the host does not know yet (PENDING) has as source the row of self.sampled holding
        it. Pinned on a GPU. Calls alternate between two buffers: by the time a buffer is reused,
        two steps on, the host has waited for the tokens of the step that copied it last."""
        width = self.max_blocks_per_seq
        size = rows * (3 + width) + 1
        self._packed_turn ^= 1
        buffer = self._packed[self._packed_turn]
        if buffer is None or buffer.shape[0] < size:
            buffer = self._packed[self._packed_turn] = torch.empty(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        flat = []
        for seq in seqs:
            flat += seq.block_table
            flat += [-1] * (width - len(seq.block_table))
        packed = buffer[:size].numpy()
        pad = [0] * (rows - len(seqs))
        ids = [s.token_ids[p] for s, p in zip(seqs, positions, strict=True)]
        src = self._input_sources(seqs, ids, positions) or [-1] * len(seqs)
        packed[: 3 * rows] = [max(t, 0) for t in ids] + pad + src + [-1] * len(pad) + [p + 1 for p in positions] + pad
        packed[3 * rows : -1] = flat + [-1] * (len(pad) * width)
        # Only a runner that may take the cascade compares the tables (a numpy pass over them).
        tables = packed[3 * rows : 3 * rows + len(seqs) * width].reshape(len(seqs), width)
        packed[-1] = self.shared_tokens(tables, positions) if self.config.cascade_attention else 0
        return buffer[:size]

    def shared_tokens(self, tables: np.ndarray, positions: list[int]) -> int:
        """Tokens of the leading blocks that every row of `tables` (int (rows, max_blocks), one
        row per sequence) holds with the same ids, as the prefix cache shares one prompt; only
        blocks that every row had filled before this step (below its position's block) count.
        0 for fewer than two rows."""
        if len(tables) < 2:
            return 0
        same = (tables == tables[0]).all(axis=0) & (tables[0] >= 0)
        blocks = len(same) if same.all() else int(same.argmin())
        return min(blocks, min(positions) // self.block_size) * self.block_size

    def takes_cascade(self, rows: int, shared: int) -> bool:
        """Whether a decode step of `rows` rows sharing `shared` tokens gains from cascade
        attention, by the device's cascade config (its table, else its heuristic)."""
        if not self.config.cascade_attention or shared == 0:
            return False
        a = self.model.args
        c = cascade_config(self.device, self.dtype, a.head_dim, self.block_size, rows, self.model.num_heads, self.model.num_kv_heads, self.config.max_model_len)
        return rows >= c.min_rows and shared >= c.min_shared

    def decode_inputs(self, packed: torch.Tensor, rows: int, max_context_len: int, cascade: bool = False):
        """(ids, positions, meta) on the device from a pack_decode buffer already there. Each row's
        id (when pending), position and cache slot follow from the buffer, so they are computed
        here, inside the CUDA graph, not on the host; padding rows get slot -1. With `cascade`,
        meta carries the buffer's shared-token count for cascade attention."""
        ids = self._resolve_ids(packed[:rows], packed[rows : 2 * rows])
        context_lens = packed[2 * rows : 3 * rows]
        block_tables = packed[3 * rows : -1].view(rows, self.max_blocks_per_seq)
        positions = (context_lens - 1).clamp_min(0)
        blocks = block_tables.gather(1, (positions // self.block_size).long()[:, None]).squeeze(1)
        slots = torch.where(context_lens > 0, blocks * self.block_size + positions % self.block_size, -1)
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=slots, context_lens=context_lens, max_context_len=max_context_len, block_tables=block_tables,
            shared_len=packed[-1:] if cascade else None, max_shared_len=max_context_len if cascade else 0,
        )
        return ids, positions, meta

    @torch.inference_mode()
    def launch(self, step: ScheduledStep, record: StepRecord | None = None) -> SampledTokens | None:
        """Queue `step` on the device and the sampling of each sampled row's next token; None when
        no row samples. `record` gets the host time spent building the inputs (prepare_s) and
        queuing the rest (launch_s)."""
        start = time.perf_counter()
        if step.is_decode:
            # Row i is the attention grid's program i of each kv head: with the longest contexts
            # first, the last programs to start are the shortest, not a long one that runs on
            # alone while the rest of the device idles. The step is reordered in place, so its
            # tokens come back in the order postprocess reads them.
            step.longest_first()
            batch = len(step.seqs)
            graph_rows = next((b for b in GRAPH_BATCH_SIZES if b >= batch and (b, False) in self.graphs), None)
            packed = self.pack_decode(step.seqs, step.starts, graph_rows or batch)
            # Cascade where it gains and, when graphs run, where a cascade graph was captured.
            cascade = self.takes_cascade(batch, int(packed[-1])) and (graph_rows is None or (graph_rows, True) in self.graphs)
            self.cascade_steps += cascade
            prepared = time.perf_counter()
            hidden = self._decode(packed, batch, graph_rows, max(step.starts) + 1, cascade)
        else:
            ids, positions, meta, last = self.prepare_chunks(step)
            prepared = time.perf_counter()
            hidden = self.model(ids, positions, self.kv_caches, meta)[last]
        seqs = step.sampled_seqs
        sampled = None
        if seqs:
            sampled = self._sample(hidden, seqs)
        if record is not None:
            record.prepare_s, record.launch_s = prepared - start, time.perf_counter() - prepared
        return sampled

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """Sample the next token of each of `seqs`, row i of `hidden` (rows past len(seqs), if any,
        are padding) being seqs[i]'s last hidden state."""
        rows = logits_rows(len(seqs))
        if hidden.shape[0] < rows:  # prefill and eager decode steps bring their rows alone
            hidden = torch.cat([hidden, hidden[-1:].expand(rows - hidden.shape[0], -1)])
        logits = self.model.compute_logits(hidden[:rows])[: len(seqs)]
        # The host knows every row's sampling parameters, so the sampler skips what no row needs
        # (sampling when all are greedy, the filters when none filters) without a sync.
        temps = top_ks = top_ps = min_ps = None
        if any(s.temperature > 0 for s in seqs):
            temps = self._to_device([s.temperature for s in seqs], torch.float32)
        # A top_k past the vocabulary keeps every token: clamped, any int fits the device's int64.
        vocab = self.model.args.vocab_size
        top_k_max = min(max(s.top_k for s in seqs), vocab)
        if top_k_max > 0:
            top_ks = self._to_device([min(s.top_k, vocab) for s in seqs], torch.long)
        if any(s.top_p < 1 for s in seqs):
            top_ps = self._to_device([s.top_p for s in seqs], torch.float32)
        if any(s.min_p > 0 for s in seqs):
            min_ps = self._to_device([s.min_p for s in seqs], torch.float32)
        sampled = sample(
            logits, temps, top_ks, top_ps, backend=self.model.backend, min_ps=min_ps,
            top_k_max=top_k_max, top_p_without_top_k=any(s.top_p < 1 and s.top_k == 0 for s in seqs),
        )
        # Ranks sample from the same logits but with their own random streams: rank 0's choice holds.
        tokens = self.model.tp.broadcast_tensor(sampled)
        if self.config.async_scheduling:
            self.sampled[: len(seqs)].copy_(tokens)
            self.sampled_row = {s.seq_id: row for row, s in enumerate(seqs)}
        return SampledTokens(tokens, self.model.tp)

    def _decode(self, packed: torch.Tensor, batch: int, graph_rows: int | None, max_context_len: int, cascade: bool) -> torch.Tensor:
        """Hidden states of a decode step's `batch` rows, then any padding rows: the captured
        graph of `graph_rows` rows (with cascade attention or without) replayed over the packed
        inputs, all its rows, or the model run eagerly over `batch` rows when no graph fits."""
        if graph_rows is None:
            ids, positions, meta = self.decode_inputs(packed.to(self.device, non_blocking=True), batch, max_context_len, cascade)
            return self.model(ids, positions, self.kv_caches, meta)
        graph, io = self.graphs[graph_rows, cascade]
        io["packed"].copy_(packed, non_blocking=True)
        graph.replay()
        return io["hidden"]

    @torch.inference_mode()
    def _warm_logits(self) -> None:
        """Run the LM head once at every LOGITS_ROWS count a step can sample, so that cuBLAS has
        chosen and loaded each one's kernel before the first request."""
        top = logits_rows(self.config.max_num_seqs)
        hidden = torch.zeros(top, self.model.args.hidden_size, dtype=self.dtype, device=self.device)
        for rows in LOGITS_ROWS:
            if rows <= top:
                self.model.compute_logits(hidden[:rows])
        self.model.tp.wait(self.device)

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """One graph per batch size bucket up to max_num_seqs, and a cascade-attention one for each
        bucket large enough to take the cascade; each reads its inputs from one static packed
        buffer (pack_decode) and computes positions and slots itself (decode_inputs)."""
        top = min(self.config.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= top] or [1]
        pool = None
        for size in reversed(sizes):
            for cascade in (False, True) if self.takes_cascade(size, self.config.max_model_len) else (False,):
                io = {"packed": self.pack_decode([], [], size).to(self.device)}
                # max_context_len is fixed at max_model_len so the kernel's split count does not depend on the batch.
                ids, positions, meta = self.decode_inputs(io["packed"], size, self.config.max_model_len, cascade)
                self.model(ids, positions, self.kv_caches, meta)  # warm-up: compile outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    ids, positions, meta = self.decode_inputs(io["packed"], size, self.config.max_model_len, cascade)
                    io["hidden"] = self.model(ids, positions, self.kv_caches, meta)
                pool = graph.pool()
                self.graphs[size, cascade] = (graph, io)
        self.model.tp.wait(self.device)
