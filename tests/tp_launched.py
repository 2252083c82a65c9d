"""Run by tests/test_tensor_parallel.py under torchrun: each rank builds LLM(tensor_parallel_size=
WORLD_SIZE) from the launcher's environment, and rank 0 writes the greedy tokens to argv[2].

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_launched.py CHECKPOINT OUT.json
"""

import json
import os
import sys

from minivllm.engine import LLM
from tests.engine_cases import GREEDY, PROMPT_LENS, engine, prompts

if __name__ == "__main__":
    llm: LLM = engine(sys.argv[1], "triton", tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    out = [o["token_ids"] for o in llm.generate(prompts(PROMPT_LENS), GREEDY, use_tqdm=False)]
    if llm.tp.rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(dict(world=llm.tp.size, tokens=out), f)
    llm.close()
