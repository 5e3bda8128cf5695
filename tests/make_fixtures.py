"""Make the committed parity fixtures: one tiny checkpoint per family, saved by `transformers`
itself, with the logits `transformers` computes for a fixed batch of token ids.

The model tests compare our model against these when `transformers` is not installed, so each
family keeps one parity check everywhere. Rerun after changing the configs below:
    python tests/make_fixtures.py               # all of them
    python tests/make_fixtures.py gpt_neox_hd32 # just the ones named
"""
import json
import os
import shutil
import sys

import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
INPUT_IDS = [[1, 5, 9, 2, 7, 3, 11, 4], [6, 0, 13, 8, 12, 10, 14, 15]]
TINY = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)
# The cpu preset's head shape: head_dim 32 with a quarter rotating (8 dims: enough for rotate-half and an
# interleaved layout to differ, unlike the 2 dims of the family fixture above), and a rotary base other
# than the default, over 16 positions so that the base moves the angles. Stored in float16 to stay small.
HD32_IDS = [[(7 * i + 3) % 16 for i in range(16)], [(5 * i + 1) % 16 for i in range(16)]]
# name -> (config, input ids, dtype the weights are stored in)
FIXTURES_MADE = {
    "llama": (transformers.LlamaConfig(**TINY, num_key_value_heads=1), INPUT_IDS, torch.float32),
    "gpt_neox": (transformers.GPTNeoXConfig(**TINY, rotary_pct=0.5), INPUT_IDS, torch.float32),
    "gpt2": (transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=2, n_head=2, n_positions=16), INPUT_IDS,
             torch.float32),
    "gpt_neox_hd32": (transformers.GPTNeoXConfig(vocab_size=16, hidden_size=64, intermediate_size=16,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=32, rotary_pct=0.25,
                                                 rotary_emb_base=5000.0), HD32_IDS, torch.float16),
}


def randomize(model, std=0.2, seed=0):
    """Large random weights: at the default std 0.02 a wrong rotary layout hides under 5e-3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def main(names):
    unknown = sorted(set(names) - set(FIXTURES_MADE))
    if unknown:
        sys.exit(f"error: unknown fixture(s) {unknown}; expected some of {sorted(FIXTURES_MADE)}")
    for name in names or FIXTURES_MADE:
        config, input_ids, dtype = FIXTURES_MADE[name]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        randomize(model)
        with torch.no_grad():  # the logits come from the weights as stored: rounded to dtype, computed in float32
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
            logits = model(torch.tensor(input_ids)).logits
        out = os.path.join(FIXTURES, name)
        shutil.rmtree(out, ignore_errors=True)
        model.to(dtype).save_pretrained(out)
        os.remove(os.path.join(out, "generation_config.json"))
        with open(os.path.join(out, "expected_logits.json"), "w") as f:
            json.dump({"input_ids": input_ids, "logits": logits.tolist(),
                       "transformers": transformers.__version__}, f)
        print(name, "->", out)


if __name__ == "__main__":
    main(sys.argv[1:])
