"""How a model is scored on QA pairs: exact match (greedy decoding must write the answer, then EOS) and first-token
accuracy, each per attribute and then averaged over the attributes, as the paper reports them. train.py scores
every task with it; analysis.py and bench.py use it too.
"""
import torch

import data
from data import QASet


@torch.no_grad()
def evaluate(model, qa: QASet, tok, exact_match=True, batch_size=1024):
    """First-token accuracy at the answer position, hard (argmax) and soft (probability), and exact match
    (greedy decoding must give the answer, then EOS); each per attribute, then averaged over attributes.
    Exact match needs no decoding loop: greedy decoding writes the answer exactly when, fed the answer's own
    prefix, the argmax is the next answer token at every answer position, EOS included. So one causal pass over
    the set's rows (prompt + answer + EOS; right padding cannot change earlier positions) decides it. Without
    exact_match the pass covers qa.prompts (the memorisation probe shortens them) up to the first answer token."""
    was_training = model.training
    model.eval()
    per_sample = {"first_token": [], "first_token_prob": []} | ({"em": []} if exact_match else {})
    for s in range(0, len(qa), batch_size):
        rows = slice(s, s + batch_size)
        if exact_match:  # the set's own rows: prompt + answer + EOS, right-padded
            inputs, targets, read = qa.batch(range(s, min(s + batch_size, len(qa))))      # (B, W-1) each
        else:  # the prompts as given (a caller may have shortened them) and the answer's first token
            pairs = QASet.from_pairs(qa.prompts[rows], [a[:1] for a in qa.answers[rows]], tok.pad_id, qa.tokens.device)
            inputs, targets, read = pairs.tokens[:, :-1], pairs.tokens[:, 1:], pairs.loss_mask[:, 1:]
        logits, _ = model(inputs, loss_mask=read)                  # (N, V): the answer positions, row by row
        greedy = logits.argmax(-1)                                  # (N,) what greedy decoding would write
        n = read.sum(1)                                             # (B,) answer tokens of each row
        starts = n.cumsum(0) - n                                    # (B,) each row's first answer position
        first = qa.answer_first[rows]
        per_sample["first_token"].append((greedy[starts] == first).float().cpu())
        per_sample["first_token_prob"].append(logits[starts].float().softmax(-1).gather(1, first[:, None])[:, 0].cpu())
        if exact_match:
            wrong = (greedy != targets[read]).float()              # (N,)
            row_of = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
            per_sample["em"].append((torch.zeros(len(n), device=n.device).index_add_(0, row_of, wrong) == 0).float().cpu())
    model.train(was_training)
    attribute = qa.attribute.cpu()
    out = {}
    for metric, values in per_sample.items():
        values = torch.cat(values)
        by_attr = {a: values[attribute == i].mean().item() for i, a in enumerate(data.ATTRIBUTES) if (attribute == i).any()}
        out[metric] = sum(by_attr.values()) / len(by_attr)
        out[f"{metric}_by_attribute"] = by_attr
    return out
