"""Offline inference demo: generate completions for a few prompts with the engine.

    python main.py                                   # tiny random-weight Qwen3, built once, no network
    python main.py --model /path/to/Qwen3-0.6B       # a real Hugging Face Qwen3 checkpoint directory
    python main.py --model DIR "Why is the sky blue?" "Write a haiku about GPUs."
    python main.py --model DIR --tensor-parallel-size 4          # spawns 3 workers, one per GPU
    torchrun --nproc-per-node 4 main.py --model DIR              # or let a launcher start the ranks

Without --model it runs a tiny Qwen3 with random weights (cached under ~/.cache/minivllm), so its
completions are gibberish; it shows the engine working end to end, even on a CPU without network.
"""

import argparse
import os
import sys
import time

from minivllm.interpreter import interpret_without_gpu

DEMO_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Explain why the sky is blue.",
    "Once upon a time, in a little village by the sea,",
    "Write a short poem about the moon.",
]


def positive_int(text: str) -> int:
    """argparse type for counts: an int >= 1, so 0 is refused rather than taken for "unset"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompts to complete (default: a handful of demo prompts)")
    p.add_argument("--model", help="Hugging Face Qwen3 checkpoint directory (default: the tiny random-weight demo checkpoint)")
    p.add_argument("--max-tokens", type=positive_int, help="tokens to generate per prompt (default: 16 for the demo checkpoint, 256 with --model)")
    # Unset sampling options take the checkpoint's generation_config.json, else the library defaults.
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy (default: the checkpoint's, else 1.0)")
    p.add_argument("--top-k", type=int, help="keep only the k most likely tokens; 0 is off (default: the checkpoint's, else 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass; 1.0 is off (default: the checkpoint's, else 1.0)")
    p.add_argument("--min-p", type=float, help="keep tokens at least this fraction as likely as the likeliest; 0 is off (default: the checkpoint's, else 0)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--device", help="torch device, e.g. cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--attention-backend", choices=["triton", "torch"], default="triton",
                   help="triton: our kernels; torch: the PyTorch references (default: triton)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--max-model-len", type=positive_int, default=1024, help="longest sequence, prompt plus completion (default: 1024)")
    p.add_argument("--tensor-parallel-size", type=positive_int,
                   help="ranks to shard the model over (default: the launcher's WORLD_SIZE under torchrun or srun, else 1)")
    p.add_argument("--profile", action="store_true", help="print where each step's time went: scheduling, input building, model run, bookkeeping")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # Before any kernel is imported: kernels on CPU tensors need Triton's interpreter.
    if args.device and args.device.startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        interpret_without_gpu()

    from minivllm.engine import LLM, SamplingParams
    from minivllm.testing.random_checkpoint import default_checkpoint

    # `is None`, not `or`: an explicit value is never swapped for the default.
    max_tokens = args.max_tokens if args.max_tokens is not None else (256 if args.model else 16)
    # Built first so a bad sampling option is refused before any checkpoint is written or loaded.
    params = SamplingParams(temperature=args.temperature, max_tokens=max_tokens, ignore_eos=args.ignore_eos,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    tp = args.tensor_parallel_size if args.tensor_parallel_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    model = args.model or str(default_checkpoint())
    llm = LLM(model, max_model_len=args.max_model_len, max_num_batched_tokens=max(16384, args.max_model_len),
              dtype=args.dtype, device=args.device, attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
              tensor_parallel_size=tp)
    prompts = args.prompts or DEMO_PROMPTS
    tok = llm.tokenizer
    if tok is None:  # no tokenizer: feed UTF-8 bytes as token ids (the random checkpoints without one have 256)
        inputs = [list(p.encode()) for p in prompts]
    elif tok.chat_template:
        inputs = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    else:
        inputs = prompts

    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    rank = llm.tp.rank
    llm.close()
    if rank != 0:  # under a launcher every rank generated the same tokens; rank 0 reports them
        return

    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out["text"] if out["text"] is not None else str(out["token_ids"])
        print(f"\nPrompt:     {prompt!r}\nCompletion: {completion!r}")
    if args.profile:
        from minivllm.engine.step_profile import format_summary

        print("\nStep profile (median per step; host % = scheduling, input building and bookkeeping over all step time):")
        print(format_summary(llm.step_records))
    generated = sum(len(out["token_ids"]) for out in outputs)
    print(f"\n{generated} tokens generated for {len(prompts)} prompts in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
          f"(device {llm.config.device}, {args.attention_backend} attention, tensor parallel {tp})")
    if not args.model:
        print(f"\nNote: {model} holds a tiny Qwen3 with RANDOM weights, so these completions are gibberish;"
              " it only shows the engine running end to end.\nFor real text, point it at a Hugging Face Qwen3 checkpoint:"
              " python main.py --model /path/to/Qwen3-0.6B")


if __name__ == "__main__":
    sys.exit(main())
