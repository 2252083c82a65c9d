"""Runs the model for one scheduled step: owns the KV cache, turns sequences into packed kernel
inputs, replays CUDA graphs for decode, and samples the next tokens."""

import time

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.config import Config
from engine.qwen3 import Qwen3ForCausalLM
from engine.sampler import sample
from engine.sequence import Sequence
from engine.step_profile import StepRecord

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
        self.graphs = {}
        self._packed: torch.Tensor | None = None
        if self.device.type == "cuda" and not config.enforce_eager and model.backend.cuda_graphs:
            self._capture_decode_graphs()

    def _block_bytes(self) -> int:
        a = self.model.args
        return 2 * a.num_layers * self.block_size * self.model.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8

    def _blocks_that_fit(self) -> int:
        """Blocks for what is left of gpu_memory_utilization x total memory once the weights and
        the largest prefill's activations are in; on the CPU, cpu_kvcache_bytes worth."""
        if self.device.type != "cuda":
            return max(1, self.config.cpu_kvcache_bytes // self._block_bytes())
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dry_run_prefill()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated(self.device)
        return max(1, int(budget) // self._block_bytes())

    @torch.inference_mode()
    def _dry_run_prefill(self) -> None:
        """The biggest prefill a step can hold, with writes to a one-block cache skipped, to measure
        peak activation memory."""
        c, a = self.config, self.model.args
        lens = [c.max_model_len] * max(1, min(c.max_num_seqs, c.max_num_batched_tokens // c.max_model_len))
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
        width = max(len(s.block_table) for s in seqs)
        return self._to_device([s.block_table + [-1] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def prepare_prefill(self, seqs: list[Sequence]):
        """Only tokens past each sequence's cached prefix are computed; the keys span the whole
        sequence, read from the paged cache when any prefix was cached."""
        ids, positions, slots, cu_q, cu_k = [], [], [], [0], [0]
        for seq in seqs:
            start = seq.num_cached_tokens
            ids += seq.token_ids[start:]
            pos = np.arange(start, len(seq))
            positions.append(pos)
            slots.append(np.asarray(seq.block_table, dtype=np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size)
            cu_q.append(cu_q[-1] + len(seq) - start)
            cu_k.append(cu_k[-1] + len(seq))
        cached = any(s.num_cached_tokens for s in seqs)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._to_device(np.concatenate(slots), torch.int32),
            cu_seqlens_q=self._to_device(cu_q, torch.int32),
            cu_seqlens_k=self._to_device(cu_k, torch.int32),
            max_seqlen_q=max(b - a for a, b in zip(cu_q, cu_q[1:], strict=False)),
            max_seqlen_k=max(len(s) for s in seqs),
            block_tables=self._block_tables(seqs) if cached else None,
        )
        last = self._to_device([n - 1 for n in cu_q[1:]], torch.long)
        return self._to_device(ids, torch.long), self._to_device(np.concatenate(positions), torch.long), meta, last

    def pack_decode(self, seqs: list[Sequence], rows: int) -> torch.Tensor:
        """A decode step's host inputs in one int32 buffer of `rows` >= len(seqs) rows, so that one
        copy moves them: [ids (rows), context_lens (rows), block tables (rows x max_blocks_per_seq)],
        padding rows holding token 0, context 0 and a table of -1. Pinned on a GPU; each call
        reuses the buffer, which is safe because every step waits for its sampled tokens."""
        width = self.max_blocks_per_seq
        if self._packed is None or self._packed.shape[0] < rows * (2 + width):
            self._packed = torch.empty(rows * (2 + width), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        flat = []
        for seq in seqs:
            flat += seq.block_table
            flat += [-1] * (width - len(seq.block_table))
        packed = self._packed[: rows * (2 + width)].numpy()
        pad = rows - len(seqs)
        packed[: 2 * rows] = [s.last_token for s in seqs] + [0] * pad + [len(s) for s in seqs] + [0] * pad
        packed[2 * rows :] = flat + [-1] * (pad * width)
        return self._packed[: rows * (2 + width)]

    def decode_inputs(self, packed: torch.Tensor, rows: int, max_context_len: int):
        """(ids, positions, meta) on the device from a pack_decode buffer already there. Each row's
        position and cache slot follow from its context length and block table, so they are
        computed here, inside the CUDA graph, not on the host; padding rows get slot -1."""
        ids, context_lens = packed[:rows], packed[rows : 2 * rows]
        block_tables = packed[2 * rows :].view(rows, self.max_blocks_per_seq)
        positions = (context_lens - 1).clamp_min(0)
        blocks = block_tables.gather(1, (positions // self.block_size).long()[:, None]).squeeze(1)
        slots = torch.where(context_lens > 0, blocks * self.block_size + positions % self.block_size, -1)
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=slots, context_lens=context_lens, max_context_len=max_context_len, block_tables=block_tables
        )
        return ids, positions, meta

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, record: StepRecord | None = None) -> list[int]:
        """One step for `seqs`: the next token of each. `record` gets the host time spent building
        the inputs (prepare_s) and the rest, model run to sampled tokens on the host (execute_s)."""
        start = time.perf_counter()
        if is_prefill:
            ids, positions, meta, last = self.prepare_prefill(seqs)
            prepared = time.perf_counter()
            hidden = self.model(ids, positions, self.kv_caches, meta)[last]
        else:
            graph_rows = next((b for b in GRAPH_BATCH_SIZES if b >= len(seqs) and b in self.graphs), None)
            packed = self.pack_decode(seqs, graph_rows or len(seqs))
            prepared = time.perf_counter()
            hidden = self._decode(packed, len(seqs), graph_rows, max(len(s) for s in seqs))
        logits = self.model.compute_logits(hidden)
        # The host knows every row's sampling parameters, so the sampler skips what no row needs
        # (sampling when all are greedy, the vocabulary sort when none filters) without a sync.
        temps = top_ks = top_ps = None
        if any(s.temperature > 0 for s in seqs):
            temps = self._to_device([s.temperature for s in seqs], torch.float32)
        if any(s.top_k > 0 for s in seqs):
            top_ks = self._to_device([s.top_k for s in seqs], torch.long)
        if any(s.top_p < 1 for s in seqs):
            top_ps = self._to_device([s.top_p for s in seqs], torch.float32)
        # Ranks sample from the same logits but with their own random streams: rank 0's choice holds.
        tokens = self.model.tp.to_host(self.model.tp.broadcast_tensor(sample(logits, temps, top_ks, top_ps, backend=self.model.backend)))
        if record is not None:
            record.prepare_s, record.execute_s = prepared - start, time.perf_counter() - prepared
        return tokens

    def _decode(self, packed: torch.Tensor, batch: int, graph_rows: int | None, max_context_len: int) -> torch.Tensor:
        """Hidden states of a decode step's `batch` rows: the captured graph of `graph_rows` rows
        replayed over the packed inputs, or the model run eagerly when no graph fits."""
        if graph_rows is None:
            ids, positions, meta = self.decode_inputs(packed.to(self.device, non_blocking=True), batch, max_context_len)
            return self.model(ids, positions, self.kv_caches, meta)
        graph, io = self.graphs[graph_rows]
        io["packed"].copy_(packed, non_blocking=True)
        graph.replay()
        return io["hidden"][:batch]

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """One graph per batch size bucket up to max_num_seqs, each reading its inputs from one static
        packed buffer (pack_decode) and computing positions and slots itself (decode_inputs)."""
        top = min(self.config.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= top] or [1]
        pool = None
        for size in reversed(sizes):
            io = {"packed": self.pack_decode([], size).to(self.device)}
            # max_context_len is fixed at max_model_len so the kernel's split count does not depend on the batch.
            ids, positions, meta = self.decode_inputs(io["packed"], size, self.config.max_model_len)
            self.model(ids, positions, self.kv_caches, meta)  # warm-up: compile outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                ids, positions, meta = self.decode_inputs(io["packed"], size, self.config.max_model_len)
                io["hidden"] = self.model(ids, positions, self.kv_caches, meta)
            pool = graph.pool()
            self.graphs[size] = (graph, io)
        self.model.tp.wait(self.device)
