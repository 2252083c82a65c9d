"""The user-facing engine: LLM(model, **config).generate(prompts, sampling_params)."""

import threading
import time
from dataclasses import fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minivllm.engine.backend import BACKENDS
from minivllm.engine.checkpoint_config import load_generation_defaults, load_model_args
from minivllm.engine.config import Config
from minivllm.engine.loader import load_weights
from minivllm.engine.model_runner import ModelRunner
from minivllm.engine.qwen3 import ModelArgs, Qwen3ForCausalLM
from minivllm.engine.sampling_params import SamplingParams
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence
from minivllm.engine.step_profile import StepRecord, step_annotation
from minivllm.engine.tensor_parallel import TPGroup, check_shardable
from minivllm.engine.tokenizer import Tokenizer
from minivllm.engine.tp_processes import STOP_WAIT_S, Rendezvous, Workers, join_group, launcher_rendezvous, leave_group
from minivllm.kernels.compiles import compiles_so_far, watch_compiles
from minivllm.values import is_int

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class LLM:
    """A Qwen3 checkpoint directory served by our kernels (or the PyTorch references).

    `config` takes the fields of engine.config.Config: max_num_batched_tokens, max_num_seqs,
    max_model_len, gpu_memory_utilization, kvcache_block_size, num_kvcache_blocks, enforce_eager,
    tensor_parallel_size, dtype, device, attention_backend, cpu_kvcache_bytes,
    long_prefill_token_threshold, async_scheduling.
    After generate(), `step_records` holds one engine.step_profile.StepRecord per step it ran.

    tensor_parallel_size N > 1 shards the model over N ranks (minivllm/engine/tensor_parallel.py,
    minivllm/engine/tp_processes.py): under a
    launcher every rank's script builds its LLM and calls generate() alike, and rank 0's inputs
    count; otherwise this process is rank 0 and spawns the other N - 1 (so a script must build it
    under `if __name__ == "__main__":`). close() stops them; an error in any rank reaches the
    caller of the call that met it, and any exception on rank 0, KeyboardInterrupt too, also stops
    them and closes the LLM.
    """

    def __init__(self, model: str, *, rendezvous: Rendezvous | None = None, **config):
        """`rendezvous` is where a spawned worker's LLM joins its group (Workers hands it in);
        otherwise a launcher's environment gives it, or this process is rank 0 of its own group."""
        known = {f.name for f in fields(Config)} - {"model"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown config {unknown}; expected some of {sorted(known)}")
        self.config = Config(str(model), **config)
        size = self.config.tensor_parallel_size
        args = load_model_args(model)
        # A request's unset sampling fields come from here (SamplingParams.resolve).
        self.generation_defaults = load_generation_defaults(model)
        if self.config.max_model_len > args.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.config.max_model_len}) exceeds the checkpoint's max_position_embeddings "
                f"({args.max_position_embeddings})"
            )
        check_shardable(args.num_heads, args.num_kv_heads, args.intermediate_size, args.attention_bias, size)
        self.workers = None
        self.closed = False  # set by close() or a tensor-parallel failure; a closed LLM refuses calls
        # One generate call at a time: the scheduler, the KV cache and the runner's state belong to it.
        self._generate_lock = threading.Lock()
        self._generating_thread: int | None = None
        if size > 1 and rendezvous is None:
            rendezvous = launcher_rendezvous()
        if rendezvous is not None:
            if rendezvous.size != size:
                raise ValueError(f"tensor_parallel_size is {size} but the launcher started {rendezvous.size} ranks")
        elif size > 1:
            if torch.distributed.is_initialized():
                raise RuntimeError("another tensor-parallel LLM is open in this process; close() it first")
            self.workers = Workers(size, str(model), config, serve_rank)
            rendezvous = self.workers.rendezvous
        try:
            if self.config.device.type == "cuda" and size > 1:
                self.config.device = torch.device("cuda", rendezvous.local_rank)
                torch.cuda.set_device(self.config.device)
            if self.workers is not None:
                self.workers.await_join()
            self.tp = join_group(rendezvous, self.config.device, self.workers.check if self.workers else None) if size > 1 else TPGroup()
            self._build(model, args)
        except BaseException as e:
            self._fail(e)
            raise

    def _build(self, model: str, args: ModelArgs) -> None:
        # The tokenizer first: a directory whose tokenizer cannot be read fails before the weights load.
        self.tokenizer = Tokenizer(model) if any((Path(model) / f).is_file() for f in TOKENIZER_FILES) else None
        self.dtype = self.config.dtype or args.torch_dtype
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.config.device):
                self.model = Qwen3ForCausalLM(args, BACKENDS[self.config.attention_backend], self.tp)
        finally:
            torch.set_default_dtype(torch.float32)
        load_weights(self.model, model)
        self.model.eval()
        self.eos_token_ids = set(args.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(self.config, self.model, self.dtype)
        self.scheduler = Scheduler(self.config)
        self.step_records: list[StepRecord] = []
        watch_compiles()  # so a step record can say it paid for compiling a kernel

    def _fail(self, cause: BaseException) -> None:
        """After `cause` (any exception, KeyboardInterrupt too) on rank 0, stop the spawned workers
        and leave the group, so the LLM is closed. Raises a spawned worker's own error, from
        `cause`, when one failed; otherwise returns for the caller to re-raise `cause`."""
        if self.workers is None:
            return
        workers, self.workers = self.workers, None
        error = workers.failure(cause)
        self._leave_group(failed=True)
        if error is not cause:
            raise error from cause

    def close(self) -> None:
        """Stop the spawned workers and leave the process group; a tensor-parallel LLM cannot
        generate after (a one-rank LLM holds nothing to release). A generate call running on
        another thread finishes first: telling the workers to stop mid-call would leave them
        inside it. From inside a generate call on its own thread it raises RuntimeError."""
        if self._generating_thread == threading.get_ident():
            raise RuntimeError("close() was called from inside generate on the same thread: it would wait for that call forever")
        with self._generate_lock:
            self._close()

    def _close(self) -> None:
        if self.workers is not None:
            try:
                self.tp.broadcast_object(("stop", None))
            except BaseException as e:
                self._fail(e)
                raise
            self.workers.stop(STOP_WAIT_S)
            self.workers = None
        self._leave_group()

    def _leave_group(self, failed: bool = False) -> None:
        if getattr(self, "tp", TPGroup()).size > 1:
            leave_group(failed)
            self.tp = TPGroup()
            self.closed = True

    def serve(self) -> None:
        """A spawned worker's loop: run rank 0's generate calls until it says stop."""
        while True:
            command, requests = self.tp.broadcast_object()
            if command == "stop":
                return
            self._run([Sequence(ids, params, self.config.kvcache_block_size) for ids, params in requests], use_tqdm=False)

    @staticmethod
    def _prompt_list(prompts) -> list:
        """`prompts` as a list of prompts: a str or one flat list of token ids is a single prompt,
        as in vLLM; ValueError for anything else, which iterating would silently split up."""
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, list | tuple):
            raise ValueError(
                f"prompts must be a str, a list of token ids, or a list of those, got {type(prompts).__name__}"
            )
        if prompts and not any(isinstance(p, str | list | tuple) for p in prompts):
            return [list(prompts)]  # no element is a prompt, so the list is one prompt's ids
        return list(prompts)

    def _sequence(self, prompt: str | list[int], params: SamplingParams, index: int = 0) -> Sequence:
        """The request for prompt `index` of generate's `prompts`; ValueError naming that prompt
        when it or its sampling parameters cannot run."""
        where = f"prompts[{index}]"
        vocab = self.model.args.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where}: a text prompt needs a tokenizer, and this checkpoint has none; pass token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple):
            token_ids = list(prompt)
        else:
            mixed = " (a list mixing token ids and prompts is neither one prompt nor a list of them)" if isinstance(prompt, int) else ""
            raise ValueError(f"{where}: expected a str or a list of token ids, got {type(prompt).__name__}{mixed}")
        for pos, t in enumerate(token_ids):
            # bool is an int subclass, but True as a token id is a mistake, not token 1.
            if not is_int(t) or not 0 <= t < vocab:
                if isinstance(prompt, str):  # the embedding would index past its rows
                    raise ValueError(f"{where}: the tokenizer encoded it with id {t} at position {pos}, outside the model's vocabulary [0, {vocab}): "
                                     "the checkpoint's tokenizer does not match its model")
                raise ValueError(f"{where}: token ids must be ints in [0, {vocab}), got {t!r} at position {pos}")
        if not token_ids:
            raise ValueError(f"{where}: the prompt is empty")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"{where}: a prompt of {len(token_ids)} tokens leaves no room to generate within max_model_len "
                f"({self.config.max_model_len})"
            )
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        return Sequence(token_ids, params.resolve(self.generation_defaults), self.config.kvcache_block_size)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Generate for every prompt (strings or token-id lists); one {"text", "token_ids", "metrics"}
        per prompt, in input order. A single prompt, a str or one list of token ids, gets a list of
        one. "text" is None when the checkpoint has no tokenizer; "metrics" is the request's
        engine.request_metrics.RequestMetrics (arrival, each token's time, TTFT and ITL,
        preemptions, prefix-cache hits).

        A call that raises part way, KeyboardInterrupt included, drops its requests: their KV
        blocks are freed and the LLM serves the next call as a fresh one would (a tensor-parallel
        LLM is closed instead). Calls from several threads run one after the other, each with its
        own tokens; a call from inside a running call on the same thread raises RuntimeError."""
        if self._generating_thread == threading.get_ident():
            raise RuntimeError("generate is already running on this thread: an LLM runs one generate call at a time, so it cannot be called from inside one")
        with self._generate_lock:
            self._generating_thread = threading.get_ident()
            try:
                return self._generate(prompts, sampling_params, use_tqdm)
            finally:
                self._generating_thread = None

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[dict]:
        """generate()'s work, under its lock."""
        if self.closed:
            raise RuntimeError("this LLM was closed")
        prompts = self._prompt_list(prompts)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
        # Every request is checked before any runs, so bad input never leaves work half done.
        seqs = [self._sequence(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, sampling_params, strict=True))]
        try:
            if self.tp.size > 1:
                # Rank 0's requests are the ones every rank runs.
                requests = self.tp.broadcast_object(("generate", [(s.token_ids, s.sampling_params) for s in seqs]))[1]
                seqs = [Sequence(ids, sp, self.config.kvcache_block_size) for ids, sp in requests]
            self._run(seqs, use_tqdm and self.tp.rank == 0)
        except BaseException as e:
            self.scheduler.abort_all()
            self._fail(e)
            raise
        return [
            {
                "text": self.tokenizer.decode(s.completion_token_ids, skip_special_tokens=True) if self.tokenizer else None,
                "token_ids": s.completion_token_ids,
                "metrics": s.metrics,
            }
            for s in seqs
        ]

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        """Schedule and run steps until every sequence of `seqs` is finished. With async scheduling
        step n + 1 is scheduled and launched before the host waits for step n's tokens, so the
        device never idles through the host's work; otherwise each step's tokens are in before the
        next is planned. Either way the tokens are the same."""
        for seq in seqs:
            self.scheduler.add(seq)
        self.step_records = []  # the last call's steps only
        in_flight = None  # (step, its record, its SampledTokens) launched and not yet postprocessed
        # A context, so an interrupted call closes its bar too.
        with tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
            while in_flight or not self.scheduler.is_finished():
                start = time.perf_counter()
                step = self.scheduler.schedule(in_flight=in_flight is not None)
                launched = None
                if step.seqs:
                    decode, new_tokens = step.is_decode, step.num_tokens
                    context = sum(step.starts) + new_tokens
                    # A decode row's causal pairs are its context: counted again only for prefill steps.
                    pairs = context if decode else sum(n * s + n * (n + 1) // 2 for s, n in zip(step.starts, step.num_new, strict=True))
                    record = StepRecord(not decode, len(step.seqs), new_tokens, context, pairs, schedule_s=time.perf_counter() - start)
                    self.step_records.append(record)
                    # Names the step in a profiler trace, so its kernels can be told apart by step
                    # (benchmarks/engine_profile.py); a few µs a step when nothing profiles.
                    compiled = compiles_so_far()
                    with torch.profiler.record_function(step_annotation(len(self.step_records) - 1, record)):
                        launched = (step, record, self.runner.launch(step, record))
                    record.compiles = compiles_so_far() - compiled
                done, in_flight = (in_flight, launched) if self.config.async_scheduling else (launched, None)
                if done is not None:
                    bar.update(len(self._finish(*done)))

    def _finish(self, step, record: StepRecord, sampled) -> list[Sequence]:
        """Wait for a launched step's tokens and hand them to the scheduler; the finished sequences."""
        start = time.perf_counter()
        tokens = sampled.result() if sampled is not None else []
        waited = time.perf_counter()
        finished = self.scheduler.postprocess(step, tokens, self.eos_token_ids)
        record.wait_s, record.postprocess_s = waited - start, time.perf_counter() - waited
        return finished


def serve_rank(model: str, config: dict, rendezvous: Rendezvous) -> None:
    """A spawned tensor-parallel worker's engine: build this rank's shard of `model`, joining the
    group at `rendezvous`, then serve rank 0's commands until told to stop
    (tp_processes.serve_worker runs it)."""
    LLM(model, rendezvous=rendezvous, **config).serve()
