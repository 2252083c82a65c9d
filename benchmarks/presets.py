"""Model presets: the attention shapes of the models our users serve on GB200, and their
per-GPU shard under tensor parallelism.

Numbers come from each model's published config.json (Megatron's num-query-groups is
num_key_value_heads, kv-channels is head_dim). The attention suites read the attention fields;
the engine suite also builds whole dense Qwen3 models from `ffn` (intermediate_size) and `tied`
(tie_word_embeddings). `ffn` is None where the engine cannot run the model: MoE or not Qwen3.
"""

from dataclasses import dataclass

from minivllm.engine.tensor_parallel import head_shard


@dataclass(frozen=True)
class ModelPreset:
    name: str
    layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    ffn: int | None
    tied: bool

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, f"{self.name}: q heads must be a multiple of kv heads"


#                 name                layers hidden  heads kv  head_dim vocab   ffn    tied
PRESETS = {p.name: p for p in [
    ModelPreset("qwen3-0.6b",          28,   1024,   16,   8,  128,  151936,  3072, True),
    ModelPreset("qwen3-1.7b",          28,   2048,   16,   8,  128,  151936,  6144, True),
    ModelPreset("qwen3-4b",            36,   2560,   32,   8,  128,  151936,  9728, True),
    ModelPreset("qwen3-8b",            36,   4096,   32,   8,  128,  151936, 12288, False),
    ModelPreset("qwen3-14b",           40,   5120,   40,   8,  128,  151936, 17408, False),
    ModelPreset("qwen3-32b",           64,   5120,   64,   8,  128,  151936, 25600, False),
    ModelPreset("qwen3-30b-a3b",       48,   2048,   32,   4,  128,  151936,  None, False),
    ModelPreset("qwen3-235b-a22b",     94,   4096,   64,   4,  128,  151936,  None, False),
    ModelPreset("llama-3.1-8b",        32,   4096,   32,   8,  128,  128256,  None, False),
    ModelPreset("llama-3.1-70b",       80,   8192,   64,   8,  128,  128256,  None, False),
    ModelPreset("llama-3.1-405b",     126,  16384,  128,   8,  128,  128256,  None, False),
    # Not a model: the CPU smoke shape, small enough for the Triton interpreter, with GQA and a
    # head size that is not a power of two so the padded-head path runs too.
    ModelPreset("tiny",                 2,     96,    4,   2,   24,     256,   192, False),
]}  # fmt: skip

# Three GQA ratios (2, 4, 16) at head_dim 128: the small, mid and MoE-giant ends of the range.
GPU_DEFAULT = ("qwen3-0.6b", "qwen3-8b", "qwen3-235b-a22b")
CPU_DEFAULT = ("tiny",)


@dataclass(frozen=True)
class Shard:
    """One GPU's slice of a model's attention under tensor parallelism."""

    model: str
    tp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def id(self) -> str:
        return f"{self.model}-tp{self.tp}"


def shard(preset: ModelPreset, tp: int) -> Shard:
    """q heads split evenly over `tp` GPUs; kv heads split too, or replicated (one per GPU) once
    tp exceeds their count, as the engine shards them (engine.tensor_parallel.head_shard). Raises
    ValueError, naming the model, where the heads do not divide."""
    try:
        heads, kv_heads = head_shard(preset.num_heads, preset.num_kv_heads, tp)
    except ValueError as e:
        raise ValueError(f"{preset.name}: {e}") from None
    return Shard(preset.name, tp, heads, kv_heads, preset.head_dim)


def select(names: list[str], tps: list[int], on_gpu: bool) -> tuple[list[Shard], list[str]]:
    """The shards for the --preset / --tp options, and a note for each combination left out.

    `all` expands to every model (not `tiny`); no names means the device's default. A named
    preset that a tp cannot shard raises ValueError; under `all` such a pair is left out with a
    note, so one sweep can span TP degrees that only some models support.
    """
    names = list(names) or list(GPU_DEFAULT if on_gpu else CPU_DEFAULT)
    expanded = "all" in names
    if expanded:
        names = [n for n in PRESETS if n != "tiny"] + [n for n in names if n != "all"]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"--preset: unknown {unknown}; expected 'all' or some of {sorted(PRESETS)}")
    shards, notes = [], []
    for name in dict.fromkeys(names):
        for tp in dict.fromkeys(tps):
            try:
                shards.append(shard(PRESETS[name], tp))
            except ValueError as e:
                if not expanded:
                    raise
                notes.append(f"left out: {e}")
    return shards, notes
