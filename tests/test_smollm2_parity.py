"""The converted SmolLM2-135M gives the same greedy tokens in transformers and in stock vLLM (float32).

vLLM runs in a subprocess (it leaves process-wide state behind) with the engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), eager mode and a small CPU KV pool. Both sides get the same token ids;
vLLM's own tokenization of the text prompts is checked against transformers' too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_compact.models.registry import ensure_model

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16

VLLM_SCRIPT = textwrap.dedent("""
    import json
    import sys

    from vllm_compact.vllm_compat import patch_vllm_version

    patch_vllm_version()

    from vllm import LLM, SamplingParams


    def main() -> None:
        model, prompts_path, result_path = sys.argv[1:4]
        prompts = json.loads(open(prompts_path).read())
        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                  enable_prefix_caching=False)
        params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[4]), ignore_eos=True, logprobs=0)
        by_ids = llm.generate([{"prompt_token_ids": ids} for ids in prompts["ids"]], params, use_tqdm=False)
        by_text = llm.generate(prompts["texts"], SamplingParams(max_tokens=1), use_tqdm=False)
        result = {
            "tokens": [list(out.outputs[0].token_ids) for out in by_ids],
            "logprobs": [[step[token].logprob for step, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
                         for out in by_ids],
            "text_prompt_ids": [list(out.prompt_token_ids) for out in by_text],
        }
        open(result_path, "w").write(json.dumps(result))


    if __name__ == "__main__":
        main()
""")


def _prompts(tokenizer) -> list[str]:
    from vllm_compact.data.needle import continuation_split, make_needle_prompt

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    return [
        "The capital of France is",
        chat,
        continuation_split(tokenizer, 300, 1, seed=5).context,  # spans three 128-slot KV blocks
        make_needle_prompt(tokenizer, 600, 0.5, "number", seed=1).prompt,
    ]


def _transformers_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Plain greedy loop (no EOS handling, like vLLM's ignore_eos) returning tokens and their log-probs."""
    tokens, logprobs = [], []
    past, inputs = None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            out = model(inputs, past_key_values=past, use_cache=True)
            step_logprobs = out.logits[0, -1].double().log_softmax(-1)
            token = int(step_logprobs.argmax())
            tokens.append(token)
            logprobs.append(float(step_logprobs[token]))
            past, inputs = out.past_key_values, torch.tensor([[token]])
    return tokens, logprobs


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return ensure_model("smollm2-135m")


def test_greedy_tokens_match_vllm(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    texts = _prompts(tokenizer)
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    # Text prompts only for the short ones: checking vLLM's tokenization needs no long prefill.
    (tmp_path / "prompts.json").write_text(json.dumps({"ids": ids, "texts": texts[:2]}))
    (tmp_path / "run_vllm.py").write_text(VLLM_SCRIPT)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    vllm = subprocess.Popen(
        [sys.executable, str(tmp_path / "run_vllm.py"), str(smollm2), str(tmp_path / "prompts.json"),
         str(tmp_path / "result.json"), str(NEW_TOKENS)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # transformers runs meanwhile (the vLLM child spends most of its time importing and starting up).
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    expected = [_transformers_greedy(model, prompt_ids, NEW_TOKENS) for prompt_ids in ids]
    log, _ = vllm.communicate(timeout=600)
    assert vllm.returncode == 0, log[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    assert result["text_prompt_ids"] == ids[:2]  # vLLM tokenizes with the converted tokenizer the same way
    assert expected[0][0][:2] == tokenizer.encode(" Paris.", add_special_tokens=False)  # a sane model
    for (hf_tokens, hf_logprobs), vllm_tokens, vllm_logprobs in zip(expected, result["tokens"], result["logprobs"]):
        assert vllm_tokens == hf_tokens, (tokenizer.decode(hf_tokens), tokenizer.decode(vllm_tokens))
        assert vllm_logprobs == pytest.approx(hf_logprobs, abs=5e-4)  # measured ~2e-5
