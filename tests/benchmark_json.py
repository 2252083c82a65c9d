"""Synthetic pytest-benchmark JSON, shaped as our suites write it, for testing the tools that read it."""

import json
from pathlib import Path

H100 = "NVIDIA H100 80GB HBM3"
MACHINE = dict(
    device="cuda",
    gpu=H100,
    interpreter=False,
    timer="cuda_events",
    torch="2.11.0",
    triton="3.6.0",
    driver="570.86",
    cuda="12.8",
    copy_gbps=3000.0,
    read_gbps=3200.0,
    matmul_tflops=800.0,
)


def bench(suite: str, impl: str, median: float, size: int = 4096, batch: int = 4, causal: bool = False, **extra) -> dict:
    """One benchmark as pytest-benchmark writes it, with the extra_info the suites record for `suite`."""
    heads, kv_heads, head_dim = 32, 8, 128
    info = dict(
        suite=suite,
        impl=impl,
        model="qwen3-8b",
        tp=1,
        batch=batch,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype="bfloat16",
    )
    if suite == "prefill":
        flops = 4 * batch * heads * size * size * head_dim // (2 if causal else 1)
        info |= dict(
            causal=causal,
            block_size=None,
            seqlen=size,
            flops=flops,
            bytes=2 * batch * size * (2 * heads + 2 * kv_heads) * head_dim,
            tflops=flops / median / 1e12,
            ceiling="matmul_tflops",
        )
        info["pct_of_ceiling"] = 100 * info["tflops"] / MACHINE["matmul_tflops"]
    else:
        nbytes = 2 * batch * size * kv_heads * head_dim * 2
        info |= dict(
            causal=None,
            block_size=16,
            context_len=size,
            flops=4 * batch * heads * size * head_dim,
            bytes=nbytes,
            gbps=nbytes / median / 1e9,
            ceiling="read_gbps",
        )
        info["pct_of_ceiling"] = 100 * info["gbps"] / MACHINE["read_gbps"]
    info |= extra
    name = f"test_{suite}[{impl}-{info['model']}-b{batch}-n{size}]"
    stats = dict(
        min=median * 0.97,
        max=median * 1.2,
        mean=median * 1.02,
        median=median,
        stddev=median * 0.01,
        iqr=median * 0.02,
        rounds=25,
        data=[median] * 25,
    )
    return dict(
        name=name,
        fullname=f"benchmarks/test_{suite}.py::{name}",
        group=f"{suite}-{info['model']}",
        params={"impl": impl},
        param=impl,
        extra_info=info,
        options={"timer": "cuda_events"},
        stats=stats,
    )


def write(path: Path, benches: list[dict], **machine) -> Path:
    """A pytest-benchmark JSON file at `path` holding `benches`, measured on MACHINE updated by `machine`."""
    path.write_text(
        json.dumps(
            dict(machine_info=MACHINE | machine, commit_info={}, benchmarks=benches, datetime="2026-11-27", version="5.3.1")
        )
    )
    return path
