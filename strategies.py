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
    """From Task 1 on, freeze the input embedding and the bottom `n_layers` blocks.

    The paper finds the bottom layers carry most of the feature shift that undoes the old task's
    alignment, so holding them fixed keeps more of Task 0. Layers are picked by exact index
    (model.blocks[:n]), not by name matching: the authors' 'layers.1' also caught layers 10-19.
    """
    name = "freeze"

    def __init__(self, n_layers):
        self.n_layers = n_layers

    def before_task(self, model, task):
        super().before_task(model, task)
        if task == 0:
            return
        frozen = [model.embed, *model.blocks[:self.n_layers]]
        if hasattr(model, "pos_embed"):  # learned positions are part of the input embedding
            frozen.append(model.pos_embed)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def describe(self):
        return f"freeze{self.n_layers}"


STRATEGIES = {"seq": Seq, "freeze": Freeze}


def make_strategy(name, freeze_layers=0):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    return Freeze(freeze_layers) if name == "freeze" else STRATEGIES[name]()
