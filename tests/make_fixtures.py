"""Make the committed parity fixtures: one tiny checkpoint per family, saved by `transformers`
itself, with the logits `transformers` computes for a fixed batch of token ids.

The model tests compare our model against these when `transformers` is not installed, so each
family keeps one parity check everywhere. Rerun after changing the configs below:
    python tests/make_fixtures.py
"""
import json
import os
import shutil

import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
INPUT_IDS = [[1, 5, 9, 2, 7, 3, 11, 4], [6, 0, 13, 8, 12, 10, 14, 15]]
TINY = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)
CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY, num_key_value_heads=1),
    "gpt_neox": transformers.GPTNeoXConfig(**TINY, rotary_pct=0.5),
    "gpt2": transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=2, n_head=2, n_positions=16),
}


def randomize(model, std=0.2, seed=0):
    """Large random weights: at the default std 0.02 a wrong rotary layout hides under 5e-3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def main():
    for family, config in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        randomize(model)
        out = os.path.join(FIXTURES, family)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        os.remove(os.path.join(out, "generation_config.json"))
        with torch.no_grad():
            logits = model(torch.tensor(INPUT_IDS)).logits
        with open(os.path.join(out, "expected_logits.json"), "w") as f:
            json.dump({"input_ids": INPUT_IDS, "logits": logits.tolist(),
                       "transformers": transformers.__version__}, f)
        print(family, "->", out)


if __name__ == "__main__":
    main()
