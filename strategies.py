"""Continual-learning strategies, plugged into the training loop of train.py through four hooks.

train.py calls them for every new task (Task 1 on; pretraining, Task 0 and the recovery probes use
plain SEQ):

    strategy.before_task(model, task)        # once, before the optimizer is built
    loss = strategy.loss(model, batch, loss)  # every step: add a penalty (EWC), a replay term, ...
    strategy.after_backward(model)           # every step, gradients ready: edit them (projection)
    strategy.after_task(model, task)         # once, when the task ends: remember what it needs

Parameters with requires_grad=False after before_task are left out of the optimizer, so they stay
bit-identical. New methods (EWC, replay, LAMOL, task vectors, gradient projection) subclass Seq and
override the hooks they need; the loop does not change.
"""


class Seq:
    """Plain sequential fine-tuning (the paper's SEQ): every parameter learns every task."""
    name = "seq"

    def before_task(self, model, task):
        for p in model.parameters():
            p.requires_grad_(True)

    def loss(self, model, batch, loss):
        return loss

    def after_backward(self, model):
        pass

    def after_task(self, model, task):
        pass

    def describe(self):
        return self.name


class Freeze(Seq):
    """From Task 1 on, freeze the input embedding and `n_layers` bottom blocks.

    The paper finds the bottom layers carry most of the feature shift that undoes the old task's
    alignment, so holding them fixed keeps more of Task 0. By default blocks are picked by exact index
    (model.blocks[:n]). `by="substring"` reproduces the set the authors' code actually froze: it
    matched parameter names against 'layers.0' .. 'layers.{n-1}' by substring, and 'layers.1' also
    matches 'layers.10'..'layers.19', so with 12 blocks their "bottom 7" froze blocks 0-6, 10 and 11.
    """
    name = "freeze"

    def __init__(self, n_layers, by="index"):
        self.n_layers, self.by = n_layers, by

    def frozen_blocks(self, n_blocks):
        if self.by == "index":
            return list(range(min(self.n_layers, n_blocks)))
        patterns = [f"layers.{i}" for i in range(self.n_layers)]
        return [j for j in range(n_blocks) if any(p in f"layers.{j}." for p in patterns)]

    def before_task(self, model, task):
        super().before_task(model, task)
        if task == 0:
            return
        frozen = [model.embed] + [model.blocks[j] for j in self.frozen_blocks(len(model.blocks))]
        if hasattr(model, "pos_embed"):  # learned positions are part of the input embedding
            frozen.append(model.pos_embed)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def describe(self):
        return f"freeze{self.n_layers}" + ("" if self.by == "index" else f"-{self.by}")


STRATEGIES = {"seq": Seq, "freeze": Freeze}
FREEZE_BY = ("index", "substring")


def make_strategy(name, freeze_layers=0, freeze_by="index"):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    return Freeze(freeze_layers, freeze_by) if name == "freeze" else STRATEGIES[name]()
