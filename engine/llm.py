"""The user-facing engine: LLM(model, **config).generate(prompts, sampling_params)."""

import time
from dataclasses import fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import parallel
from engine.config import Config
from engine.loader import load_model_args, load_weights
from engine.model_runner import ModelRunner
from engine.qwen3 import ModelArgs, Qwen3ForCausalLM
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.step_profile import StepRecord

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class LLM:
    """A Qwen3 checkpoint directory served by our kernels (or the PyTorch references).

    `config` takes the fields of engine.config.Config: max_num_batched_tokens, max_num_seqs,
    max_model_len, gpu_memory_utilization, kvcache_block_size, num_kvcache_blocks, enforce_eager,
    tensor_parallel_size, dtype, device, attention_backend, cpu_kvcache_bytes.
    After generate(), `step_records` holds one engine.step_profile.StepRecord per step it ran.

    tensor_parallel_size N > 1 shards the model over N ranks (engine/parallel.py): under a
    launcher every rank's script builds its LLM and calls generate() alike, and rank 0's inputs
    count; otherwise this process is rank 0 and spawns the other N - 1. close() stops them; an
    error in any rank reaches the caller of the call that met it.
    """

    def __init__(self, model: str, **config):
        known = {f.name for f in fields(Config)} - {"model"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown config {unknown}; expected some of {sorted(known)}")
        self.config = Config(str(model), **config)
        size, launched = self.config.tensor_parallel_size, parallel.launcher_rank()
        args = load_model_args(model)
        parallel.check_shardable(args.num_heads, args.num_kv_heads, args.intermediate_size, args.attention_bias, size)
        self.workers = None
        if launched is not None and size > 1:
            rank, world, local = launched
            if world != size:
                raise ValueError(f"tensor_parallel_size is {size} but the launcher started {world} ranks")
        else:
            rank, local = 0, 0
            if size > 1:
                if torch.distributed.is_initialized():
                    raise RuntimeError("another tensor-parallel LLM is open in this process; close() it first")
                self.workers = parallel.Workers(size, str(model), config)
        if self.config.device.type == "cuda" and size > 1:
            self.config.device = torch.device("cuda", local)
            torch.cuda.set_device(self.config.device)
        try:
            self.tp = parallel.init_group(rank, size, self.config.device, self.workers.check if self.workers else None)
            self._build(model, args)
        except Exception as e:
            raise self._failed(e) from e

    def _build(self, model: str, args: ModelArgs) -> None:
        self.dtype = self.config.dtype or args.torch_dtype
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.config.device):
                self.model = Qwen3ForCausalLM(args, self.config.attention_backend, self.tp)
        finally:
            torch.set_default_dtype(torch.float32)
        load_weights(self.model, model)
        self.model.eval()
        self.eos_token_ids = set(args.eos_token_ids)
        self.tokenizer = None
        if any((Path(model) / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            if self.tokenizer.eos_token_id is not None:
                self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(self.config, self.model, self.dtype)
        self.scheduler = Scheduler(self.config)
        self.step_records: list[StepRecord] = []

    def _failed(self, cause: Exception) -> Exception:
        """What to raise after `cause` on rank 0: a spawned worker's own error when one failed.
        The workers are stopped and the group left, so the LLM is closed."""
        if self.workers is None:
            return cause
        workers, self.workers = self.workers, None
        error = workers.failure(cause)
        self._leave_group(failed=True)
        return error

    def close(self) -> None:
        """Stop the spawned workers and leave the process group; a tensor-parallel LLM cannot
        generate after (a one-rank LLM holds nothing to release)."""
        if self.workers is not None:
            self.tp.broadcast_object(("stop", None))
            self.workers.stop()
            self.workers = None
        self._leave_group()

    def _leave_group(self, failed: bool = False) -> None:
        if getattr(self, "tp", parallel.TPGroup()).size > 1:
            parallel.leave_group(failed)
            self.tp = parallel.TPGroup(size=0)

    def serve(self) -> None:
        """A spawned worker's loop: run rank 0's generate calls until it says stop."""
        while True:
            command, requests = self.tp.broadcast_object()
            if command == "stop":
                return
            self._run([Sequence(ids, params, self.config.kvcache_block_size) for ids, params in requests], use_tqdm=False)

    def _sequence(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompts: a text prompt needs a tokenizer, and this checkpoint has none; pass token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.model.args.vocab_size for t in token_ids):
                raise ValueError(f"prompts: token ids must be ints in [0, {self.model.args.vocab_size})")
        if not token_ids:
            raise ValueError("prompts: a prompt is empty")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompts: a prompt of {len(token_ids)} tokens leaves no room to generate within max_model_len "
                f"({self.config.max_model_len})"
            )
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        return Sequence(token_ids, params, self.config.kvcache_block_size)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Generate for every prompt (strings or token-id lists); one {"text", "token_ids"} per prompt,
        in input order. "text" is None when the checkpoint has no tokenizer."""
        if self.tp.size == 0:
            raise RuntimeError("this LLM was closed")
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
        # Every request is checked before any runs, so bad input never leaves work half done.
        seqs = [self._sequence(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]
        try:
            if self.tp.size > 1:
                # Rank 0's requests are the ones every rank runs.
                requests = self.tp.broadcast_object(("generate", [(s.token_ids, sp) for s, sp in zip(seqs, sampling_params, strict=True)]))[1]
                seqs = [Sequence(ids, sp, self.config.kvcache_block_size) for ids, sp in requests]
            self._run(seqs, use_tqdm and self.tp.rank == 0)
        except Exception as e:
            raise self._failed(e) from e
        return [
            {
                "text": self.tokenizer.decode(s.completion_token_ids, skip_special_tokens=True) if self.tokenizer else None,
                "token_ids": s.completion_token_ids,
            }
            for s in seqs
        ]

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        """Schedule and run steps until every sequence of `seqs` is finished."""
        for seq in seqs:
            self.scheduler.add(seq)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        self.step_records = []  # the last call's steps only
        while not self.scheduler.is_finished():
            start = time.perf_counter()
            batch, is_prefill = self.scheduler.schedule()
            tokens = sum(len(s) - s.num_cached_tokens for s in batch) if is_prefill else len(batch)
            record = StepRecord(is_prefill, len(batch), tokens, sum(len(s) for s in batch), schedule_s=time.perf_counter() - start)
            sampled = self.runner.run(batch, is_prefill, record)
            done_running = time.perf_counter()
            finished = self.scheduler.postprocess(batch, sampled, self.eos_token_ids)
            record.postprocess_s = time.perf_counter() - done_running
            self.step_records.append(record)
            rate = tokens / (time.perf_counter() - start)
            prefill_tps, decode_tps = (rate, decode_tps) if is_prefill else (prefill_tps, rate)
            bar.set_postfix(prefill=f"{prefill_tps:.0f} tok/s", decode=f"{decode_tps:.0f} tok/s")
            bar.update(len(finished))
        bar.close()
