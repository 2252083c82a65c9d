"""The LM head runs at a few row counts: a step's sampled rows are padded up to the next
LOGITS_ROWS entry and cut back after, so the tokens are those of the unpadded rows."""

import pytest

from minivllm.engine import LLM, SamplingParams, model_runner
from minivllm.engine.model_runner import LOGITS_ROWS, logits_rows
from minivllm.testing.random_checkpoint import write_random_qwen3


@pytest.mark.parametrize("rows, padded", [(1, 1), (3, 4), (8, 8), (9, 16), (17, 32), (33, 48), (500, 512), (512, 512), (513, 513)])
def test_logits_rows(rows, padded):
    assert logits_rows(rows) == padded


def test_padded_rows_change_no_token(tmp_path, monkeypatch):
    """Prefill steps (3 prompts sampled in one step) and eager decode steps (3, then fewer rows)
    take padded LM-head rows; greedy tokens equal those of a run that pads nothing."""
    llm = LLM(str(write_random_qwen3(tmp_path, with_tokenizer=False)), max_model_len=64, device="cpu", attention_backend="torch")
    prompts = [[5, 1, 7], [2, 9, 4, 4, 8], [3]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 2, 7)]
    seen = []
    compute_logits = llm.model.compute_logits
    monkeypatch.setattr(llm.model, "compute_logits", lambda hidden: seen.append(hidden.shape[0]) or compute_logits(hidden))
    padded = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert set(seen) <= set(LOGITS_ROWS) and 4 in seen  # 3 rows ran as 4
    monkeypatch.setattr(model_runner, "LOGITS_ROWS", tuple(range(1, 600)))
    seen.clear()
    unpadded = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert 3 in seen and 4 not in seen
    assert padded == unpadded
