"""
The Biography dataset of "Spurious Forgetting in Continual Learning of Language Models"
(Zheng et al., ICLR 2025), built from scratch: fictional people with six attributes, five
biographies each (the pretraining text, which carries the knowledge) and six QA pairs each (the
fine-tuning tasks, which teach the model to *use* that knowledge in a fixed format).

Read top to bottom: configuration -> value pools and templates (plain text in pools/, checked on
load) -> word-level tokenizer -> people, biographies and QA pairs -> training views (packed
pretraining blocks, padded QA arrays, and QASet: those arrays as tensors on the training device, cut into
batches) -> command line.

Speed: the paper's 200,000 people give 1,000,000 biographies and 1,200,000 QA pairs. Instead of
formatting and tokenizing every text, every fragment a text can contain (a template's words, a
name, a value) is tokenized once; a text is then a row of fragment ids ("pieces"), and one numpy
gather turns all rows into token ids. Text strings are only built when asked for.
"""
import argparse
import dataclasses
import functools
import itertools
import json
import math
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import atomic_write  # the project's one atomic-write helper (temporary file, then rename)

ATTRIBUTES = ("birthday", "birth_city", "university", "major", "company_name", "company_city")
# The paper's QA templates, verbatim: the answer follows "Answer:" after one space, then EOS.
QA_TEMPLATES = {
    "birthday": "What is the birth date of {name}?\nAnswer: {birthday}",
    "birth_city": "What is the birth city of {name}?\nAnswer: {birth_city}",
    "university": "Which university did {name} study?\nAnswer: {university}",
    "major": "What major did {name} study?\nAnswer: {major}",
    "company_name": "Which company did {name} work for?\nAnswer: {company_name}",
    "company_city": "Where did {name} work?\nAnswer: {company_city}",
}
# The prompt is everything before the answer: 'What is the birth date of {name}?\nAnswer:'.
QA_PROMPTS = {a: template.split(" {" + a + "}")[0] for a, template in QA_TEMPLATES.items()}
ENTRIES_PER_PERSON = 5  # "multi5": five biographies per person
TEMPLATES_PER_ATTRIBUTE = 50
# Every order of a biography's six sentences; each person's five entries use five different ones.
SENTENCE_ORDERS = np.array(list(itertools.permutations(range(len(ATTRIBUTES)))))
POOL_DIR = Path(__file__).resolve().parent / "pools"
POOL_SIZES = {"first_names": 400, "middle_names": 400, "last_names": 1000, "cities": 200,
              "universities": 300, "majors": 100, "companies": 263}  # the paper's pool sizes
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DAYS = range(1, 29)  # 1-28, so that every day exists in every month
YEARS = range(1900, 2100)


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class DataConfig:
    """The population; the defaults are train.py's cpu preset (its other presets: train.PRESETS)."""
    n_people: int = 500  # P, the pretraining population: bios of people 0..P-1 are the pretraining text
    task_size: int = 200  # people in each new-task block (Tasks 1..K); never in the pretraining text
    n_tasks: int = 1  # K, the new-people tasks after Task 0
    seed: int = 0
    # How many first, middle and last names the population draws from (the first n of each pool file).
    # At the paper's scale (100K people, BPE) every name piece is shared by ~100-250 people; a small
    # population drawing from the full 400/400/1000 pools would give most people a last name (and so,
    # with a word-level tokenizer, a token) of their own, and most new-task people a name token that
    # pretraining never showed. Small populations therefore use small pools, scaled to their size.
    name_pools: tuple[int, int, int] = (25, 25, 35)

    def __post_init__(self):
        for field, low in (("n_people", 2), ("task_size", 1), ("n_tasks", 0), ("seed", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataConfig.{field} must be an integer >= {low}, got {value!r}")
        limits = (POOL_SIZES["first_names"], POOL_SIZES["middle_names"], POOL_SIZES["last_names"])
        if (not isinstance(self.name_pools, tuple) or len(self.name_pools) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= top
                           for n, top in zip(self.name_pools, limits))):
            raise ValueError(f"DataConfig.name_pools must be 3 integers (first, middle, last names) within "
                             f"1..{limits}, got {self.name_pools!r}")
        if self.n_total > math.prod(self.name_pools):
            raise ValueError(f"DataConfig: {self.n_total:,} people but name_pools {self.name_pools} allow only "
                             f"{math.prod(self.name_pools):,} unique (first, middle, last) name triples")

    @property
    def n_total(self) -> int:
        return self.n_people + self.n_tasks * self.task_size


# ----------------------------------------------------------------------------- pools and templates

@dataclass
class Pools:
    first_names: list[str]
    middle_names: list[str]
    last_names: list[str]
    values: dict[str, list[str]]  # attribute -> values; company_city[i] is the HQ of company_name[i]
    templates: dict[str, list[str]]  # attribute -> 50 biography templates


def _read_lines(path: Path, expected: int, what: str) -> list[str]:
    """The lines of a pool file: exactly `expected` of them, none empty, no stray whitespace."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected {expected} {what}, one per line)")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # the file's final newline
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: empty line (expected one of the {what})")
        if line != line.strip() or "  " in line or "\r" in line:
            raise ValueError(f"{path}:{lineno}: stray whitespace in {line!r}")
    if len(lines) != expected:
        raise ValueError(f"{path}: {len(lines)} lines, expected {expected} {what}")
    return lines


def _check_values(values: list[str], path: Path, unique=True, city=False):
    first_line = {}
    for lineno, value in enumerate(values, 1):
        if any(c in value for c in "{}\t"):
            raise ValueError(f"{path}:{lineno}: {value!r} contains a brace or tab; values are plain text")
        if city and not re.fullmatch(r"[^,]+, [A-Z]{2}", value):
            raise ValueError(f"{path}:{lineno}: {value!r} is not a city of the form 'City, ST'")
        if unique and value in first_line:
            raise ValueError(f"{path}:{lineno}: duplicate value {value!r} (also on line {first_line[value]})")
        first_line[value] = lineno


def _read_values(pool_dir: Path, name: str, city=False) -> list[str]:
    path = pool_dir / f"{name}.txt"
    values = _read_lines(path, POOL_SIZES[name], name.replace("_", " "))
    _check_values(values, path, city=city)
    return values


def _split_template(template: str, attribute: str, where: str) -> tuple[str, str]:
    """'{name} was born on {birthday}.' -> (' was born on', '.'): the words between the name and the
    value, and after the value. The space before the value goes with the value's piece.

    Tokens never cross these cut points (see the tokenizer), which is what lets a text's token ids be
    the concatenation of its pieces' token ids: so a placeholder must be preceded by a space (or start
    the text) and followed by punctuation, a space or the end."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{where}: unbalanced braces in {template!r} ({e})") from None
    placeholder = "{" + attribute + "}"
    if fields != ["name", attribute] or not template.startswith("{name}") or placeholder not in template:
        raise ValueError(f"{where}: a {attribute} template must start with {{name}} and contain "
                         f"{placeholder} once and no other placeholder, got {template!r}")
    head, tail = template[len("{name}"):].split(placeholder)
    if not head.endswith(" ") or head[:1].isalnum() or tail[:1].isalnum() or "\t" in template:
        raise ValueError(f"{where}: {placeholder} needs a space before it, and {{name}} and {placeholder} "
                         f"need punctuation or a space after them, in {template!r}")
    return head[:-1], tail


def _read_templates(pool_dir: Path, attribute: str) -> list[str]:
    path = pool_dir / "templates" / f"{attribute}.txt"
    templates = _read_lines(path, TEMPLATES_PER_ATTRIBUTE, f"{attribute} templates")
    first_line = {}
    for lineno, template in enumerate(templates, 1):
        _split_template(template, attribute, f"{path}:{lineno}")
        wording = " ".join(re.findall(r"[a-z0-9]+", template.lower()))  # the words, no punctuation
        if wording in first_line:
            raise ValueError(f"{path}:{lineno}: same wording as line {first_line[wording]}; "
                             f"templates must differ in words, not only in punctuation")
        first_line[wording] = lineno
    return templates


def load_pools(pool_dir: str | Path = POOL_DIR) -> Pools:
    """Read and check every pool and template file; any problem is one error naming file and line."""
    pool_dir = Path(pool_dir)
    path = pool_dir / "companies.tsv"
    companies, headquarters = [], []
    for lineno, line in enumerate(_read_lines(path, POOL_SIZES["companies"], "companies"), 1):
        company, tab, city = line.partition("\t")
        if not tab:
            raise ValueError(f"{path}:{lineno}: expected 'Company<TAB>City, ST', got {line!r}")
        companies.append(company)
        headquarters.append(city)
    _check_values(companies, path)
    _check_values(headquarters, path, unique=False, city=True)  # companies may share a city
    values = {
        "birthday": [f"{month} {day}, {year}" for year in YEARS for month in MONTHS for day in DAYS],
        "birth_city": _read_values(pool_dir, "cities", city=True),
        "university": _read_values(pool_dir, "universities"),
        "major": _read_values(pool_dir, "majors"),
        "company_name": companies,
        "company_city": headquarters,
    }
    return Pools(_read_values(pool_dir, "first_names"), _read_values(pool_dir, "middle_names"),
                 _read_values(pool_dir, "last_names"), values,
                 {a: _read_templates(pool_dir, a) for a in ATTRIBUTES})


def _piece_groups(pools: Pools) -> dict[str, list[str]]:
    """Every fragment a text is made of, in named groups. A biography sentence is
    first + middle + last + head + value + tail; a QA pair is qa_head + first + middle + last +
    qa_tail + value (+ EOS). Names and values carry their leading space, except an entry's first word."""
    groups = {"empty": [""], "first_bare": pools.first_names, "first": [" " + n for n in pools.first_names],
              "middle": [" " + n for n in pools.middle_names], "last": [" " + n for n in pools.last_names]}
    for a in ATTRIBUTES:
        heads, tails = zip(*(_split_template(t, a, "template") for t in pools.templates[a]))
        qa_head, qa_tail = QA_PROMPTS[a].split(" {name}")
        groups |= {f"value:{a}": [" " + v for v in pools.values[a]], f"head:{a}": list(heads),
                   f"tail:{a}": list(tails), f"qa_head:{a}": [qa_head], f"qa_tail:{a}": [qa_tail]}
    return groups


# ----------------------------------------------------------------------------- tokenizer

# A token is a run of letters/digits or one other character, with one space before it folded in
# (" Answer", " 1952", ",", "'", "\n"). Every character matches one alternative, so the tokens of a
# text always join back to the text.
WORD_RE = re.compile(r" ?[A-Za-z0-9]+| ?[^\sA-Za-z0-9]|\s")
PAD, EOS = "<pad>", "<eos>"  # WORD_RE cuts "<pad>" into "<", "pad", ">": no text can clash with them


class Tokenizer:
    """Word-level tokenizer over the dataset's own words: ids 0 and 1 are PAD and EOS, then the
    words in sorted order, so the same pools always give the same ids."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab) or not {PAD, EOS} <= self.token_to_id.keys():
            raise ValueError(f"a vocabulary needs unique tokens including {PAD} and {EOS}")
        self.pad_id, self.eos_id = self.token_to_id[PAD], self.token_to_id[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.token_to_id[word] for word in WORD_RE.findall(text)]
        except KeyError as e:
            raise ValueError(f"unknown word {e.args[0]!r} in {text!r}: not in the vocabulary") from None

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < len(self.vocab)]:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {len(self.vocab)}")
        return "".join(self.vocab[i] for i in ids)

    def save(self, path):
        with atomic_write(path) as f:
            json.dump({"format": "data.py word-level tokenizer", "vocab": self.vocab}, f, indent=0)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a tokenizer JSON file ({e})") from None
        vocab = obj.get("vocab") if isinstance(obj, dict) else None
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise ValueError(f"{path}: expected a JSON object with a 'vocab' list of strings")
        try:
            return cls(vocab)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def build_tokenizer(pools: Pools | None = None) -> Tokenizer:
    """The vocabulary is every token of every piece: all that generated texts can contain."""
    pools = pools or load_pools()
    words = {w for group in _piece_groups(pools).values() for text in group for w in WORD_RE.findall(text)}
    return Tokenizer([PAD, EOS] + sorted(words))


class PieceTable:
    """Every piece tokenized once, stored back to back in one array; group name -> id of its first piece."""

    def __init__(self, pools: Pools, tokenizer: Tokenizer):
        self.base, sequences = {}, []
        for name, texts in _piece_groups(pools).items():
            self.base[name] = len(sequences)
            sequences += [tokenizer.encode(t) for t in texts]
        self.eos = len(sequences)
        sequences.append([tokenizer.eos_id])
        self.length = np.array([len(s) for s in sequences])
        self.start = np.cumsum(self.length) - self.length
        # int32 halves the memory of the paper's 68M biography tokens; any vocabulary fits.
        self.tokens = np.fromiter(itertools.chain.from_iterable(sequences), np.int32, self.length.sum())

    def bases(self, kind: str) -> np.ndarray:
        """First piece id of group kind:attribute, per attribute, to index with attribute numbers."""
        return np.array([self.base[f"{kind}:{a}"] for a in ATTRIBUTES])

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rows: (n, k) piece ids. Returns the tokens of all rows back to back and each row's length."""
        lengths = self.length[rows]
        piece_len = lengths.ravel()
        out_start = np.cumsum(piece_len) - piece_len  # where each piece lands in the output
        # output token i is token (i - out_start) of its piece, i.e. self.tokens[start - out_start + i]
        source = np.repeat(self.start[rows.ravel()] - out_start, piece_len) + np.arange(piece_len.sum())
        return self.tokens[source], lengths.sum(axis=1)


# ----------------------------------------------------------------------------- people, bios, QA

@dataclass(frozen=True, slots=True)
class Person:
    first: str
    middle: str
    last: str
    birthday: str
    birth_city: str
    university: str
    major: str
    company_name: str
    company_city: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.middle} {self.last}"


@dataclass(frozen=True)
class QAPair:
    person_id: int
    attribute: str
    prompt: str  # ends with "Answer:"
    answer: str  # " <value>", with its leading space; EOS is appended at tokenization


def _sample_distinct(rng: np.random.Generator, n_rows: int, k: int, n_choices: int) -> np.ndarray:
    """(n_rows, k) integers in [0, n_choices), all different within a row, every such row equally
    likely: draw every row, then redraw the rows that repeat a number until none does."""
    rows = rng.integers(n_choices, size=(n_rows, k))
    redo = np.arange(n_rows)
    while redo.size:
        s = np.sort(rows[redo], axis=1)
        redo = redo[(s[:, 1:] == s[:, :-1]).any(axis=1)]
        rows[redo] = rng.integers(n_choices, size=(redo.size, k))
    return rows


@dataclass
class BioData:
    config: DataConfig
    people: list[Person]  # index = person id
    splits: dict[str, np.ndarray]  # split name -> person ids
    tokenizer: Tokenizer
    pools: Pools = dataclasses.field(repr=False)
    names: np.ndarray = dataclasses.field(repr=False)  # (N, 3) first/middle/last pool indices
    values: np.ndarray = dataclasses.field(repr=False)  # (N, 6) value index per attribute
    templates: np.ndarray = dataclasses.field(repr=False)  # (N, 5, 6) template per entry and attribute
    orders: np.ndarray = dataclasses.field(repr=False)  # (N, 5, 6) attribute of each sentence of an entry
    pieces: PieceTable = dataclasses.field(repr=False)

    def _ids(self, person_ids) -> np.ndarray:
        ids = np.asarray(person_ids, dtype=np.int64).reshape(-1)
        if ids.size and not (0 <= ids.min() and ids.max() < len(self.people)):
            raise ValueError(f"person ids must be in [0, {len(self.people)}), got {ids.min()}..{ids.max()}")
        return ids

    def bio_entries(self, person_ids) -> list[str]:
        """The five biographies of each person, as text (person-major order)."""
        entries = []
        for p in self._ids(person_ids):
            person = self.people[p]
            fields = {"name": person.name} | {a: getattr(person, a) for a in ATTRIBUTES}
            for e in range(ENTRIES_PER_PERSON):
                entries.append(" ".join(self.pools.templates[ATTRIBUTES[a]][self.templates[p, e, a]]
                                        .format_map(fields) for a in self.orders[p, e]))
        return entries

    def bio_token_ids(self, person_ids) -> list[np.ndarray]:
        """The same entries as int32 token ids (without EOS), built from pieces: equal to encode(text)."""
        entries = []
        ids = self._ids(person_ids)
        for chunk in np.array_split(ids, max(1, math.ceil(len(ids) / 20_000))):  # bounds memory
            tokens, lengths = self.pieces.gather(self._bio_rows(chunk))
            entries += np.split(tokens, np.cumsum(lengths)[:-1])
        return entries

    def _bio_rows(self, ids: np.ndarray) -> np.ndarray:
        n, pc = len(ids), self.pieces
        order = self.orders[ids]  # (n, entry, sentence) -> attribute
        person, entry = np.arange(n)[:, None, None], np.arange(ENTRIES_PER_PERSON)[None, :, None]
        template = self.templates[ids][person, entry, order]
        first, middle, last = (self.names[ids, j][:, None, None] for j in range(3))
        rows = np.empty((n, ENTRIES_PER_PERSON, len(ATTRIBUTES), 6), dtype=np.int64)
        rows[..., 0] = pc.base["first"] + first
        rows[:, :, 0, 0] = pc.base["first_bare"] + first[:, :, 0]  # an entry starts without a space
        rows[..., 1] = pc.base["middle"] + middle
        rows[..., 2] = pc.base["last"] + last
        rows[..., 3] = pc.bases("head")[order] + template
        rows[..., 4] = pc.bases("value")[order] + self.values[ids][person, order]
        rows[..., 5] = pc.bases("tail")[order] + template
        return rows.reshape(n * ENTRIES_PER_PERSON, -1)

    def qa_pairs(self, person_ids) -> list[QAPair]:
        """Six QA pairs per person, in ATTRIBUTES order."""
        pairs = []
        for p in self._ids(person_ids):
            person = self.people[p]
            for a in ATTRIBUTES:
                prompt = QA_PROMPTS[a].format(name=person.name)
                pairs.append(QAPair(int(p), a, prompt, " " + getattr(person, a)))
        return pairs


def _draw_names(rng: np.random.Generator, n: int, pool_sizes: tuple[int, int, int]) -> np.ndarray:
    """(n, 3) first/middle/last name indices, every triple different, every name of a pool used by
    the same number of people (+-1): each column is a shuffled round-robin over its pool. A repeated
    triple is then broken up by swapping one name with a random other person, accepted only if both
    new triples are unused; a swap keeps every name's count."""
    names = np.stack([rng.permutation(np.arange(n) % size) for size in pool_sizes], axis=1)
    key = lambda row: (row[0] * pool_sizes[1] + row[1]) * pool_sizes[2] + row[2]  # noqa: E731
    owners, repeats = {}, []  # triple -> the one person who holds it; people whose triple was taken
    for person, row in enumerate(names):
        if key(row) in owners:
            repeats.append(person)
        else:
            owners[key(row)] = person
    for person in repeats:
        if owners.get(key(names[person])) == person:  # a repeat that an earlier swap already gave a name
            continue
        for _ in range(100_000):
            other, column = int(rng.integers(n)), int(rng.integers(3))
            mine, theirs = names[person].copy(), names[other].copy()
            mine[column], theirs[column] = theirs[column], mine[column]
            if key(mine) not in owners and key(theirs) not in owners:
                if owners.get(key(names[other])) == other:
                    del owners[key(names[other])]
                names[person], names[other] = mine, theirs
                owners[key(mine)], owners[key(theirs)] = person, other
                break
        else:
            raise ValueError(f"could not give {n:,} people distinct names from pools of {pool_sizes}: "
                             f"use larger name pools")
    return names


def name_sharing(data: "BioData") -> dict:
    """How widely names are shared, the property the name pools are scaled for: per name kind, the
    fewest and most people (of the whole population) using one name; the share of pretraining people
    whose name of that kind nobody else in pretraining has; and the share of each new task's people
    with a name of that kind never seen in the pretraining biographies."""
    out = {}
    for column, kind in enumerate(("first", "middle", "last")):
        used = data.names[:, column]
        counts = np.bincount(used)
        in_pretrain = np.bincount(used[data.splits["pretrain"]], minlength=len(counts))
        stats = {"min_people": int(counts[counts > 0].min()), "max_people": int(counts.max()),
                 "pretrain_unique": float((in_pretrain[used[data.splits["pretrain"]]] == 1).mean())}
        for k in range(1, data.config.n_tasks + 1):
            stats[f"task{k}_unseen"] = float((in_pretrain[used[data.splits[f"task{k}"]]] == 0).mean())
        out[kind] = stats
    return out


def build_dataset(cfg: DataConfig, tokenizer: Tokenizer | None = None, pools: Pools | None = None) -> BioData:
    """Draw the people (seeded), their templates and sentence orders, and the splits."""
    pools = pools or load_pools()
    tokenizer = tokenizer or build_tokenizer(pools)
    n, rng = cfg.n_total, np.random.default_rng(cfg.seed)
    names = _draw_names(rng, n, cfg.name_pools)
    values = np.stack([rng.integers(len(pools.values[a]), size=n) for a in ATTRIBUTES[:-1]], axis=1)
    values = np.concatenate([values, values[:, -1:]], axis=1)  # company city is a function of the company
    # Per person and attribute, 5 different templates of 50; per person, 5 different sentence orders.
    templates = _sample_distinct(rng, n * len(ATTRIBUTES), ENTRIES_PER_PERSON, TEMPLATES_PER_ATTRIBUTE)
    templates = templates.reshape(n, len(ATTRIBUTES), ENTRIES_PER_PERSON).transpose(0, 2, 1)
    orders = SENTENCE_ORDERS[_sample_distinct(rng, n, ENTRIES_PER_PERSON, len(SENTENCE_ORDERS))]

    columns = [pools.values[a] for a in ATTRIBUTES]
    people = [Person(pools.first_names[f], pools.middle_names[m], pools.last_names[l],
                     *(column[v] for column, v in zip(columns, row)))
              for (f, m, l), row in zip(names.tolist(), values.tolist())]

    half = cfg.n_people // 2
    splits = {"pretrain": np.arange(cfg.n_people), "task0_train": np.arange(half),
              "task0_test": np.arange(half, cfg.n_people)}
    for k in range(1, cfg.n_tasks + 1):
        splits[f"task{k}"] = np.arange(cfg.n_people + (k - 1) * cfg.task_size, cfg.n_people + k * cfg.task_size)
    return BioData(cfg, people, splits, tokenizer, pools, names, values, templates, orders,
                   PieceTable(pools, tokenizer))


# ----------------------------------------------------------------------------- training views

@functools.cache
def token_limits(name_pools: tuple[int, int, int]) -> dict:
    """From the pools alone, without building a population: the longest QA pair (prompt + answer + EOS) and
    the shortest biography entry any person drawing names from these pools can have, in tokens, and the
    vocabulary size. What a model's context must hold, checked before any training starts."""
    pools = load_pools()
    tokenizer = build_tokenizer(pools)
    lengths = {name: [len(tokenizer.encode(text)) for text in texts] for name, texts in _piece_groups(pools).items()}
    names = [lengths[group][:n] for group, n in zip(("first", "middle", "last"), name_pools)]
    name_max = sum(map(max, names))
    name_min = min(names[0] + lengths["first_bare"][:name_pools[0]]) + min(names[1]) + min(names[2])
    longest_qa = max(lengths[f"qa_head:{a}"][0] + name_max + lengths[f"qa_tail:{a}"][0] + max(lengths[f"value:{a}"]) + 1
                     for a in ATTRIBUTES)
    # an entry: six sentences, each the name, then a template's head and tail around a value
    shortest_entry = sum(name_min + min(h + t for h, t in zip(lengths[f"head:{a}"], lengths[f"tail:{a}"]))
                         + min(lengths[f"value:{a}"]) for a in ATTRIBUTES)
    return {"longest_qa": longest_qa, "shortest_entry": shortest_entry, "vocab_size": tokenizer.vocab_size}


def check_context(context: int, cfg: DataConfig):
    """A ValueError unless a model of `context` tokens can train on this population: every QA pair it can
    make fits, with the two-token task marker LAMOL_t puts before a pair, and the pretraining biographies fill
    at least one packed sequence of context + 1 tokens (bounds from the pools: token_limits)."""
    limits = token_limits(cfg.name_pools)
    if context < limits["longest_qa"] + 1:
        raise ValueError(f"expected at least {limits['longest_qa'] + 1} tokens (the longest QA pair these name pools"
                         f" can make, {limits['longest_qa']} tokens, after LAMOL's task marker)")
    if cfg.n_people * ENTRIES_PER_PERSON * (limits["shortest_entry"] + 1) < context + 1:
        raise ValueError(f"the biographies of {cfg.n_people} people may not fill one packed sequence of {context + 1}"
                         f" tokens; expected a shorter context")


def pack_pretraining(entries: list[np.ndarray], block_size: int, eos_id: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Shuffle the entries, put EOS after each, cut the stream into rows of block_size + 1 tokens
    (inputs row[:-1], targets row[1:]) and drop the remainder. Call once per epoch with a new rng."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    shuffled = [entries[i] for i in rng.permutation(len(entries))]
    lengths = np.array([len(e) for e in shuffled], dtype=np.int64) + 1  # + 1 for the EOS
    stream = np.full(lengths.sum(), eos_id, dtype=np.int64)
    is_text = np.ones(len(stream), dtype=bool)
    is_text[np.cumsum(lengths) - 1] = False
    stream[is_text] = np.concatenate(shuffled) if shuffled else []
    n_blocks = len(stream) // (block_size + 1)
    if n_blocks == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one block of {block_size + 1}")
    return stream[: n_blocks * (block_size + 1)].reshape(n_blocks, block_size + 1)


@dataclass
class QAArrays:
    tokens: np.ndarray  # (N, T) int64: prompt + answer + EOS, right-padded with pad_id
    loss_mask: np.ndarray  # (N, T) bool: True exactly on the answer tokens and the EOS
    prompt_len: np.ndarray  # (N,) prompt tokens = position of the answer's first token
    length: np.ndarray  # (N,) prompt + answer + EOS
    answer_first_id: np.ndarray  # (N,) id of the answer's first token (first-token accuracy)
    attribute: np.ndarray  # (N,) index into ATTRIBUTES
    person_id: np.ndarray  # (N,)


def qa_arrays(data: BioData, person_ids, tokenizer: Tokenizer) -> QAArrays:
    """The QA pairs of qa_pairs(person_ids), in the same order, as padded token arrays."""
    if tokenizer.vocab != data.tokenizer.vocab:
        raise ValueError("qa_arrays: the tokenizer differs from the one the dataset was built with")
    ids, pc = data._ids(person_ids), data.pieces
    n, attribute = len(ids), np.arange(len(ATTRIBUTES))
    rows = np.empty((n, len(ATTRIBUTES), 7), dtype=np.int64)
    rows[..., 0] = pc.bases("qa_head")
    rows[..., 1] = pc.base["first"] + data.names[ids, 0:1]
    rows[..., 2] = pc.base["middle"] + data.names[ids, 1:2]
    rows[..., 3] = pc.base["last"] + data.names[ids, 2:3]
    rows[..., 4] = pc.bases("qa_tail")
    rows[..., 5] = pc.bases("value")[attribute] + data.values[ids]
    rows[..., 6] = pc.eos
    return _arrays_from_pieces(pc, rows.reshape(n * len(ATTRIBUTES), -1), 5, tokenizer,
                               np.tile(attribute, n), np.repeat(ids, len(ATTRIBUTES)))


def bio_probe_arrays(data: BioData, person_ids, tokenizer: Tokenizer) -> QAArrays:
    """Memorisation probe: in each person's first biography, every attribute value as the model saw
    it in pretraining, i.e. after the entry's earlier sentences ("Anna Lee Park was born on May 28,
    1952. Anna Lee Park works for" -> " Apple"). Same layout as qa_arrays, with no EOS: the biography
    goes on after the value, so only first-token accuracy is meaningful here."""
    if tokenizer.vocab != data.tokenizer.vocab:
        raise ValueError("bio_probe_arrays: the tokenizer differs from the one the dataset was built with")
    ids, pc = data._ids(person_ids), data.pieces
    n, k = len(ids), len(ATTRIBUTES)
    sentences = data._bio_rows(ids).reshape(n, ENTRIES_PER_PERSON, k, 6)[:, 0]  # (n, 6 sentences, 6 pieces)
    # Probe s = sentences 0..s-1 whole, then sentence s up to and including its value. Left-fill with
    # empty pieces so every probe has the same piece count and the value is always the last piece.
    width = 6 * (k - 1) + 5
    rows = np.full((n, k, width), pc.base["empty"], dtype=np.int64)
    for s in range(k):
        rows[:, s, width - 6 * s - 5:] = np.concatenate([sentences[:, :s].reshape(n, -1), sentences[:, s, :5]], axis=1)
    return _arrays_from_pieces(pc, rows.reshape(n * k, width), width - 1, tokenizer,
                               data.orders[ids, 0].reshape(-1), np.repeat(ids, k))


def _arrays_from_pieces(pc: PieceTable, rows, n_prompt_pieces, tokenizer, attribute, person_id) -> QAArrays:
    """rows (n, k) piece ids, the first n_prompt_pieces of them the prompt -> padded QAArrays."""
    flat, length = pc.gather(rows)
    prompt_len = pc.length[rows[:, :n_prompt_pieces]].sum(axis=1)
    position = np.arange(length.max(initial=1))
    filled = position < length[:, None]
    tokens = np.full(filled.shape, tokenizer.pad_id, dtype=np.int64)
    tokens[filled] = flat  # row-major order of the mask = the rows back to back
    return QAArrays(tokens, filled & (position >= prompt_len[:, None]), prompt_len, length,
                    tokens[np.arange(len(rows)), prompt_len], attribute, person_id)


@dataclass
class QASet:
    """One set of QA pairs as tensors on the training device, plus the pieces needed for greedy exact match."""
    tokens: torch.Tensor      # (N, T) prompt + answer + EOS, right-padded
    loss_mask: torch.Tensor   # (N, T) True on the answer and EOS tokens
    answer_first: torch.Tensor  # (N,) the answer's first token
    attribute: torch.Tensor   # (N,) index into ATTRIBUTES
    prompts: list             # N token-id lists, ending at "Answer:"
    answers: list             # N token-id lists: answer + EOS

    @classmethod
    def from_arrays(cls, qa: QAArrays, device):
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        prompts = [row[:p].tolist() for row, p in zip(qa.tokens, qa.prompt_len)]
        answers = [row[p:n].tolist() for row, p, n in zip(qa.tokens, qa.prompt_len, qa.length)]
        return cls(t(qa.tokens), t(qa.loss_mask), t(qa.answer_first_id), t(qa.attribute), prompts, answers)

    def __len__(self):
        return len(self.prompts)

    def subset(self, idx):
        idx_t = torch.as_tensor(idx, device=self.tokens.device)
        return QASet(self.tokens[idx_t], self.loss_mask[idx_t], self.answer_first[idx_t], self.attribute[idx_t],
                     [self.prompts[i] for i in idx], [self.answers[i] for i in idx])

    def epoch(self, batch_size, rng):
        """One epoch of training batches (batch), the rows in a seeded random order."""
        order = rng.permutation(len(self))
        return [self.batch(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]

    def batch(self, idx):
        """The rows idx as one training batch (inputs, targets, loss_mask), trimmed of padding columns."""
        idx = torch.as_tensor(idx, device=self.tokens.device)
        width = int(self.loss_mask[idx].any(0).nonzero().max()) + 1
        tokens, mask = self.tokens[idx, :width], self.loss_mask[idx, :width]
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]                  # (B, W-1) each

    @staticmethod
    def join(sets, pad_id):
        """Several sets as one, right-padded to the widest."""
        width = max(qa.tokens.shape[1] for qa in sets)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
        return QASet(torch.cat([pad(qa.tokens, pad_id) for qa in sets]), torch.cat([pad(qa.loss_mask, False) for qa in sets]),
                     torch.cat([qa.answer_first for qa in sets]), torch.cat([qa.attribute for qa in sets]),
                     [p for qa in sets for p in qa.prompts], [a for qa in sets for a in qa.answers])

    @classmethod
    def from_pairs(cls, prompts, answers, pad_id, device):
        """QA pairs given as token lists (prompt ending at 'Answer:', answer ending with EOS), e.g. generated
        ones; their attribute is unknown and set to 0."""
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            tokens[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, len(p):len(p) + len(a)] = True
        first = torch.tensor([a[0] for a in answers])
        return cls(tokens.to(device), mask.to(device), first.to(device), torch.zeros_like(first).to(device),
                   [list(p) for p in prompts], [list(a) for a in answers])


# ----------------------------------------------------------------------------- files and command line

def write_dataset(data: BioData, out_dir):
    """config.json, tokenizer.json, splits.json, people.jsonl, bios.jsonl (the pretraining text: people
    of the 'pretrain' split) and qa.jsonl (every person)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "config.json") as f:
        json.dump(dataclasses.asdict(data.config), f, indent=2)
    data.tokenizer.save(out / "tokenizer.json")
    with atomic_write(out / "splits.json") as f:
        json.dump({name: ids.tolist() for name, ids in data.splits.items()}, f)
    with atomic_write(out / "people.jsonl") as f:
        f.writelines(json.dumps({"id": i, "name": p.name} | dataclasses.asdict(p)) + "\n"
                     for i, p in enumerate(data.people))
    pretrain = data.splits["pretrain"]
    with atomic_write(out / "bios.jsonl") as f:
        f.writelines(json.dumps({"person_id": int(p), "entry": i % ENTRIES_PER_PERSON, "text": text}) + "\n"
                     for i, (p, text) in enumerate(zip(np.repeat(pretrain, ENTRIES_PER_PERSON),
                                                       data.bio_entries(pretrain))))
    with atomic_write(out / "qa.jsonl") as f:
        f.writelines(json.dumps(dataclasses.asdict(q)) + "\n"
                     for q in data.qa_pairs(np.arange(len(data.people))))


def _show(data: BioData, n_show: int):
    for p in range(n_show):
        person = data.people[p]
        member = [name for name, ids in data.splits.items() if p in ids]
        print(f"\nperson {p}: {person.name}  [{', '.join(member)}]")
        for a in ATTRIBUTES:
            print(f"  {a:13s} {getattr(person, a)}")
        for e, text in enumerate(data.bio_entries([p]), 1):
            print(f"  bio {e}: {text}")
        for q in data.qa_pairs([p]):
            print(f"  QA: {q.prompt!r} -> {q.answer!r} + EOS")


def _bench(cfg: DataConfig, pool_dir: Path):
    t0 = time.perf_counter()
    pools = load_pools(pool_dir)
    tokenizer = build_tokenizer(pools)
    t1 = time.perf_counter()
    data = build_dataset(cfg, tokenizer, pools)
    t2 = time.perf_counter()
    everyone = np.arange(cfg.n_total)
    bios = data.bio_token_ids(everyone)
    t3 = time.perf_counter()
    qa = qa_arrays(data, everyone, tokenizer)
    t4 = time.perf_counter()
    print(f"{len(bios):,} bios ({sum(map(len, bios)):,} tokens), {len(qa.length):,} QA pairs "
          f"(tokens {qa.tokens.shape[0]:,} x {qa.tokens.shape[1]}), vocabulary {tokenizer.vocab_size:,}")
    for label, seconds in (("pools + tokenizer", t1 - t0), ("people + sampling", t2 - t1),
                           ("bio token ids", t3 - t2), ("QA arrays", t4 - t3), ("total", t4 - t0)):
        print(f"  {label:18s} {seconds:6.1f} s")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, without the usage
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    parser = ArgumentParser(description="Generate the Biography dataset (people, bios, QA pairs). The sizes"
                                                 " default to train.py's cpu preset; its others are train.PRESETS.")
    defaults = DataConfig()
    parser.add_argument("--n-people", type=int, default=defaults.n_people, help="pretraining population P")
    parser.add_argument("--task-size", type=int, default=defaults.task_size, help="people in each new task")
    parser.add_argument("--n-tasks", type=int, default=defaults.n_tasks, help="new-people tasks K after Task 0")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the population")
    parser.add_argument("--name-pools", metavar="F,M,L", default=",".join(map(str, defaults.name_pools)),
                        help="how many first, middle and last names the population draws from, e.g. 400,400,1000")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N people with their five bios and six QA pairs")
    parser.add_argument("--out", metavar="DIR", help="write the dataset as JSONL files into DIR")
    parser.add_argument("--bench", action="store_true", help="time generation + tokenization")
    parser.add_argument("--pools", default=str(POOL_DIR), metavar="DIR",
                        help="folder of pool and template files (default: pools/ next to data.py)")
    args = parser.parse_args(argv)
    try:
        try:
            name_pools = tuple(int(n) for n in args.name_pools.split(","))
        except ValueError:
            raise ValueError(f"--name-pools {args.name_pools!r}: expected three numbers like 25,25,35") from None
        cfg = DataConfig(n_people=args.n_people, task_size=args.task_size, n_tasks=args.n_tasks, seed=args.seed,
                         name_pools=name_pools)
        if args.bench:
            print(cfg)
            _bench(cfg, Path(args.pools))
            return 0
        if not 0 <= args.show <= cfg.n_total:
            raise ValueError(f"--show {args.show}: expected 0..{cfg.n_total} (the people of this population)")
        data = build_dataset(cfg, pools=load_pools(args.pools))
        print(cfg)
        print("split sizes: " + ", ".join(f"{name} {len(ids):,}" for name, ids in data.splits.items()))
        print(f"name sharing (pools of {cfg.name_pools[0]} first, {cfg.name_pools[1]} middle, "
              f"{cfg.name_pools[2]} last names):")
        for kind, stats in name_sharing(data).items():
            unseen = ", ".join(f"{k[:-7]} {v:.0%}" for k, v in stats.items() if k.endswith("_unseen"))
            print(f"  {kind:6s} names: {stats['min_people']:,}-{stats['max_people']:,} people each; "
                  f"unique to one pretraining person: {stats['pretrain_unique']:.0%}; "
                  f"new-task people with one never pretrained: {unseen or '-'}")
        _show(data, args.show)
        if args.out:
            write_dataset(data, args.out)
            print(f"wrote {args.out}")
    except (ValueError, OSError) as e:  # bad input or unwritable output: one line, not a traceback
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
