"""Tests of data.py: pools, biographies, QA pairs, splits, tokenizer, training views, bad input."""
import dataclasses
import hashlib
import json
import re
import shutil

import numpy as np
import pytest

import data
import train
from data import ATTRIBUTES, ENTRIES_PER_PERSON, POOL_DIR, POOL_SIZES


TINY = train.data_config(train.preset_config("tiny"))  # the presets' one table is train.PRESETS


@pytest.fixture(scope="module")
def pools():
    return data.load_pools()


@pytest.fixture(scope="module")
def tiny(pools):
    return data.build_dataset(TINY, pools=pools)


@pytest.fixture
def pool_copy(tmp_path):
    """A writable copy of the pool folder, for the bad-input tests."""
    return shutil.copytree(POOL_DIR, tmp_path / "pools")


def edit_line(path, lineno, new):
    lines = path.read_text().split("\n")
    lines[lineno - 1] = new
    path.write_text("\n".join(lines))


def folder_hash(folder):
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def sentences(entry, name):
    """Split an entry into its sentences: every sentence starts with the full name."""
    assert entry.startswith(name)
    return [name + s for s in entry[len(name):].split(" " + name)]


# ----------------------------------------------------------------------------- pools

def test_pool_sizes_and_uniqueness(pools):
    lists = {"first_names": pools.first_names, "middle_names": pools.middle_names,
             "last_names": pools.last_names, "cities": pools.values["birth_city"],
             "universities": pools.values["university"], "majors": pools.values["major"],
             "companies": pools.values["company_name"]}
    for name, values in lists.items():
        assert len(values) == POOL_SIZES[name], name
        assert len(set(values)) == len(values), name
    assert len(pools.values["birthday"]) == 12 * 28 * 200 == len(set(pools.values["birthday"]))
    assert "May 28, 1952" in pools.values["birthday"]
    cities = pools.values["birth_city"] + pools.values["company_city"]
    assert all(re.fullmatch(r"[^,]+, [A-Z]{2}", c) for c in cities)
    for a in ATTRIBUTES:
        templates = pools.templates[a]
        assert len(templates) == 50 == len(set(templates))
        wordings = {" ".join(re.findall(r"[a-z0-9]+", t.lower())) for t in templates}
        assert len(wordings) == 50, f"{a}: templates differ only in punctuation"
        assert all(t.startswith("{name} ") or t.startswith("{name}'s ") for t in templates)
        assert all("{" + a + "}" in t for t in templates)


def test_company_city_is_a_function_of_the_company(pools, tiny):
    headquarters = dict(zip(pools.values["company_name"], pools.values["company_city"]))
    assert headquarters["Walmart"] == "Bentonville, AR"
    for person in tiny.people:
        assert person.company_city == headquarters[person.company_name]
    big = data.build_dataset(data.DataConfig(), tokenizer=tiny.tokenizer, pools=pools)  # the cpu preset
    seen = {}
    for person in big.people:
        assert seen.setdefault(person.company_name, person.company_city) == person.company_city


# ----------------------------------------------------------------------------- people and biographies

def test_people_have_unique_names_and_attributes_from_the_pools(pools, tiny):
    cfg = tiny.config
    assert len(tiny.people) == cfg.n_people + cfg.n_tasks * cfg.task_size
    assert len({p.name for p in tiny.people}) == len(tiny.people)
    for person in tiny.people:
        assert person.first in pools.first_names and person.last in pools.last_names
        assert person.name == f"{person.first} {person.middle} {person.last}"
        for a in ATTRIBUTES:
            assert getattr(person, a) in pools.values[a]


def test_five_entries_with_distinct_templates_and_orders(pools, tiny):
    """Multi5 + permute + fullname, checked on the text: recognise which template made each sentence."""
    entries = tiny.bio_entries(range(len(tiny.people)))
    assert len(entries) == ENTRIES_PER_PERSON * len(tiny.people)
    for p, person in enumerate(tiny.people):
        fields = {"name": person.name} | {a: getattr(person, a) for a in ATTRIBUTES}
        rendered = {t.format_map(fields): (a, i) for a in ATTRIBUTES for i, t in enumerate(pools.templates[a])}
        used = {a: [] for a in ATTRIBUTES}
        orders = []
        for entry in entries[p * ENTRIES_PER_PERSON:(p + 1) * ENTRIES_PER_PERSON]:
            parts = sentences(entry, person.name)  # every sentence starts with the full name
            assert len(parts) == len(ATTRIBUTES)
            order = []
            for sentence in parts:
                attribute, template = rendered[sentence]
                used[attribute].append(template)
                order.append(attribute)
            assert sorted(order) == sorted(ATTRIBUTES)  # each attribute once per entry
            orders.append(tuple(order))
        assert len(set(orders)) == ENTRIES_PER_PERSON
        for a in ATTRIBUTES:
            assert len(set(used[a])) == ENTRIES_PER_PERSON, (p, a)


def test_splits(tiny):
    s, cfg = tiny.splits, tiny.config
    assert list(s["pretrain"]) == list(range(cfg.n_people))
    assert len(s["task0_train"]) + len(s["task0_test"]) == cfg.n_people
    assert not set(s["task0_train"]) & set(s["task0_test"])
    tasks = [set(s[f"task{k}"]) for k in range(1, cfg.n_tasks + 1)]
    for k, task in enumerate(tasks, 1):
        assert len(task) == cfg.task_size
        assert not task & set(s["pretrain"])
        for other in tasks[k:]:
            assert not task & other
    assert set().union(*tasks, s["pretrain"]) == set(range(len(tiny.people)))


@pytest.mark.parametrize("n_people", [50, 51])
def test_task0_halves_split_the_pretraining_people(pools, n_people):
    bio = data.build_dataset(dataclasses.replace(TINY, n_people=n_people), pools=pools)
    pretrain, learn, held = (bio.splits[s].tolist() for s in ("pretrain", "task0_train", "task0_test"))
    assert len(set(learn)) == len(learn) == n_people // 2 and len(set(held)) == len(held)  # halves, no repeats
    assert set(learn) <= set(pretrain) and set(held) <= set(pretrain)  # Task 0 asks about people pretraining showed
    assert not set(learn) & set(held) and set(learn) | set(held) == set(pretrain)  # ... all of them, each once


def test_task_people_never_in_pretraining_text(tiny):
    text = "\n".join(tiny.bio_entries(tiny.splits["pretrain"]))
    for k in range(1, tiny.config.n_tasks + 1):
        for p in tiny.splits[f"task{k}"]:
            assert not re.search(rf"\b{re.escape(tiny.people[p].name)}\b", text)
    assert all(tiny.people[p].name in text for p in tiny.splits["pretrain"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        data.write_dataset(data.build_dataset(dataclasses.replace(TINY, seed=seed)), tmp_path / name)
    assert folder_hash(tmp_path / "a") == folder_hash(tmp_path / "b")
    assert folder_hash(tmp_path / "a") != folder_hash(tmp_path / "c")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "config.json", "tokenizer.json", "splits.json", "people.jsonl", "bios.jsonl", "qa.jsonl"}
    bios = [json.loads(line) for line in (tmp_path / "a" / "bios.jsonl").read_text().splitlines()]
    assert len(bios) == 50 * ENTRIES_PER_PERSON


def test_same_seed_same_arrays(tiny, pools):
    def digest(d):
        ids = np.arange(len(d.people))
        h = hashlib.sha256(np.concatenate(d.bio_token_ids(ids)).tobytes())
        h.update(data.qa_arrays(d, ids, d.tokenizer).tokens.tobytes())
        return h.hexdigest()
    again = data.build_dataset(TINY, pools=pools)
    other = data.build_dataset(dataclasses.replace(TINY, seed=1), pools=pools)
    assert digest(tiny) == digest(again) != digest(other)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_fast_path(tiny):
    tok = tiny.tokenizer
    ids = np.arange(len(tiny.people))
    texts = tiny.bio_entries(ids)
    for text, fast in zip(texts, tiny.bio_token_ids(ids)):
        encoded = tok.encode(text)
        assert tok.decode(encoded) == text
        assert fast.tolist() == encoded
    for pair in tiny.qa_pairs(ids):
        assert tok.decode(tok.encode(pair.prompt + pair.answer)) == pair.prompt + pair.answer
    assert tok.encode("Answer: May 28, 1952") == [tok.token_to_id[w] for w in
                                                  ["Answer", ":", " May", " 28", ",", " 1952"]]
    assert "\n" in tok.token_to_id and tok.vocab[:2] == ["<pad>", "<eos>"]


def test_fast_path_equals_encode_for_every_template(tiny):
    """Give the first 10 people's 50 entry slots templates 0..49, so every template of every
    attribute is cut into pieces and compared with encoding its text."""
    person, entry = np.arange(len(tiny.people))[:, None, None], np.arange(ENTRIES_PER_PERSON)[:, None]
    slot = person * ENTRIES_PER_PERSON + entry
    every = dataclasses.replace(tiny, templates=np.broadcast_to(slot % 50, tiny.templates.shape).copy())
    assert sorted(every.templates[:10, :, 0].ravel()) == list(range(50))
    for text, fast in zip(every.bio_entries(range(10)), every.bio_token_ids(range(10))):
        assert fast.tolist() == every.tokenizer.encode(text)


def test_tokenizer_save_load_and_errors(tiny, tmp_path):
    path = tmp_path / "tok.json"
    tiny.tokenizer.save(path)
    loaded = data.Tokenizer.load(path)
    assert loaded.vocab == tiny.tokenizer.vocab and loaded.eos_id == tiny.tokenizer.eos_id
    assert data.build_tokenizer(tiny.pools).vocab == tiny.tokenizer.vocab  # stable ids
    with pytest.raises(ValueError, match="unknown word ' Zyzzyva'"):
        tiny.tokenizer.encode("Mary Zyzzyva")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.tokenizer.decode([-1])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        data.Tokenizer.load(tmp_path / "missing.json")
    for content in ("{not json", '{"vocab": 3}', '["<pad>"]', '{"vocab": ["a", "a", "<pad>", "<eos>"]}'):
        path.write_text(content)
        with pytest.raises(ValueError, match="tok.json"):
            data.Tokenizer.load(path)


# ----------------------------------------------------------------------------- training views

def test_qa_arrays_mask_and_first_token(tiny):
    tok = tiny.tokenizer
    ids = tiny.splits["task0_train"][:10]
    pairs = tiny.qa_pairs(ids)
    qa = data.qa_arrays(tiny, ids, tok)
    assert qa.tokens.dtype == np.int64 and qa.tokens.shape == (len(pairs), qa.length.max())
    for i, pair in enumerate(pairs):
        assert pair.prompt.endswith("Answer:") and pair.answer.startswith(" ")
        prompt, answer = tok.encode(pair.prompt), tok.encode(pair.answer) + [tok.eos_id]
        n = len(prompt)
        assert qa.prompt_len[i] == n and qa.length[i] == n + len(answer)
        assert qa.tokens[i, :n].tolist() == prompt
        assert qa.tokens[i, n:qa.length[i]].tolist() == answer
        assert (qa.tokens[i, qa.length[i]:] == tok.pad_id).all()
        assert np.flatnonzero(qa.loss_mask[i]).tolist() == list(range(n, qa.length[i]))
        assert qa.answer_first_id[i] == answer[0] == qa.tokens[i, qa.prompt_len[i]]
        assert ATTRIBUTES[qa.attribute[i]] == pair.attribute and qa.person_id[i] == pair.person_id
    other = data.Tokenizer(tok.vocab + ["extra"])
    with pytest.raises(ValueError, match="tokenizer differs"):
        data.qa_arrays(tiny, ids, other)


def test_pack_pretraining(tiny):
    entries = tiny.bio_token_ids(tiny.splits["pretrain"])
    eos, block = tiny.tokenizer.eos_id, 64
    rows = data.pack_pretraining(entries, block, eos, np.random.default_rng(0))
    total = sum(len(e) + 1 for e in entries)
    assert rows.dtype == np.int64 and rows.shape == (total // (block + 1), block + 1)
    # The stream is the entries, each once and each followed by EOS, in a shuffled order.
    *complete, partial = np.split(rows.ravel(), np.flatnonzero(rows.ravel() == eos) + 1)
    index = {tuple(e.tolist()): i for i, e in enumerate(entries)}
    found = [index[tuple(s[:-1].tolist())] for s in complete]
    assert len(found) == len(set(found)) and found != sorted(found)
    # What is missing is the entry cut by the end of the last row, and the dropped remainder.
    missing = set(range(len(entries))) - set(found)
    assert sum(len(entries[i]) + 1 for i in missing) == len(partial) + total % (block + 1)
    assert np.array_equal(rows, data.pack_pretraining(entries, block, eos, np.random.default_rng(0)))
    assert not np.array_equal(rows, data.pack_pretraining(entries, block, eos, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="one block"):
        data.pack_pretraining(entries[:1], 10_000, eos, np.random.default_rng(0))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("file, lineno, new, message", [
    ("cities.txt", 5, "Los Angeles, CA", r"cities.txt:5: duplicate value 'Los Angeles, CA' \(also on line 2\)"),
    ("majors.txt", 10, "", "majors.txt:10: empty line"),
    ("majors.txt", 10, " Physics", "majors.txt:10: stray whitespace"),
    ("universities.txt", 3, "Yale {University}", "universities.txt:3: .* brace"),
    ("cities.txt", 7, "Phoenix", "cities.txt:7: 'Phoenix' is not a city of the form 'City, ST'"),
    ("companies.tsv", 4, "Exxon Mobil Irving, TX", "companies.tsv:4: expected 'Company<TAB>City, ST'"),
    ("templates/birthday.txt", 3, "{name} was born long ago.", "birthday.txt:3: .*must start with"),
    ("templates/major.txt", 2, "{name} studied {university}.", "major.txt:2: .*must start with"),
    ("templates/major.txt", 2, "{name} studied{major}.", "major.txt:2: .*needs a space before it"),
    ("templates/major.txt", 2, "{name} majored, in {major}.", "major.txt:2: same wording as line 1"),
    ("templates/university.txt", 4, "{name} attended {university.", "university.txt:4: unbalanced braces"),
])
def test_bad_pool_line(pool_copy, file, lineno, new, message):
    edit_line(pool_copy / file, lineno, new)
    with pytest.raises(ValueError, match=message):
        data.load_pools(pool_copy)


def test_bad_pool_sizes_and_missing_files(pool_copy):
    path = pool_copy / "universities.txt"
    path.write_text("\n".join(path.read_text().split("\n")[:299]) + "\n")
    with pytest.raises(ValueError, match="universities.txt: 299 lines, expected 300 universities"):
        data.load_pools(pool_copy)
    (pool_copy / "templates" / "major.txt").unlink()
    path.unlink()
    with pytest.raises(FileNotFoundError, match="universities.txt: file not found"):
        data.load_pools(pool_copy)


def test_bad_config():
    for field, value in (("n_people", 1), ("n_tasks", -1), ("task_size", 0), ("seed", 1.5),
                         ("name_pools", (5, 5)), ("name_pools", (0, 5, 5)), ("name_pools", (401, 5, 5))):
        with pytest.raises(ValueError, match=f"DataConfig.{field}"):
            dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ValueError, match="name triples"):
        data.DataConfig(n_people=160_000_002, task_size=1, n_tasks=0)
    with pytest.raises(ValueError, match="name triples"):
        dataclasses.replace(TINY, name_pools=(4, 4, 4))


def test_cli(capsys, tmp_path, pool_copy):
    tiny_flags = ["--n-people", "50", "--task-size", "25", "--n-tasks", "2", "--name-pools", "5,5,5"]
    assert data.main([*tiny_flags, "--show", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "split sizes: pretrain 50, task0_train 25, task0_test 25, task1 25, task2 25" in out
    assert "first  names: 20-20 people each" in out
    assert data.main(["--name-pools", "400,400,1000"]) == 0  # the paper's pools, 700 people
    assert "last   names: 1-1 people each; unique to one pretraining person: 100%" in capsys.readouterr().out
    assert out.count("bio 5:") == 2 and out.count("QA:") == 12
    assert (tmp_path / "out" / "qa.jsonl").read_text().count("\n") == 100 * 6
    edit_line(pool_copy / "majors.txt", 3, "")
    assert data.main([*tiny_flags, "--pools", str(pool_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "majors.txt:3: empty line" in err
    with pytest.raises(SystemExit) as exc:
        data.main(["--n-people", "many"])
    assert exc.value.code == 2


def test_bio_probe_arrays_cut_the_first_biography_before_each_value(tiny):
    bio, tok = tiny, tiny.tokenizer
    people = bio.splits["pretrain"][:5]
    probe = data.bio_probe_arrays(bio, people, tok)
    assert len(probe.tokens) == 6 * len(people)
    first_entries = bio.bio_entries(people)[::ENTRIES_PER_PERSON]
    for i, (row, mask, p, n, a, pid) in enumerate(zip(probe.tokens, probe.loss_mask, probe.prompt_len,
                                                      probe.length, probe.attribute, probe.person_id)):
        person, entry = bio.people[pid], first_entries[i // 6]
        prompt, answer = tok.decode(row[:p]), tok.decode(row[p:n])
        assert answer == " " + getattr(person, ATTRIBUTES[a])
        assert entry.startswith(prompt + answer)  # exactly the biography, as pretraining showed it
        assert prompt.count(person.name) == i % 6 + 1  # the (i % 6)-th sentence of the entry
        assert mask[p:n].all() and not mask[:p].any() and not mask[n:].any()


@pytest.mark.parametrize("preset", ["tiny", "cpu", "deep"])
def test_small_presets_share_every_name_as_at_the_paper_scale(preset):
    """Every first, middle and last name is used by >= 20 people, none is one pretraining person's own,
    and every name of a new-task person was seen in pretraining (with BPE at 100K people, every name
    piece is shared by ~100-250 people)."""
    bio = data.build_dataset(train.data_config(train.preset_config(preset)))
    for kind, stats in data.name_sharing(bio).items():
        assert stats["min_people"] >= 20, (kind, stats)
        assert stats["pretrain_unique"] == 0.0
        assert all(v == 0.0 for k, v in stats.items() if k.endswith("_unseen")), (kind, stats)
    assert len({p.name for p in bio.people}) == len(bio.people)


def test_full_pools_measure_the_problem_the_scaled_pools_fix():
    """The control: the cpu population with the paper's full pools gives most pretraining people a
    last name of their own, and many Task-1 people a name never pretrained."""
    bio = data.build_dataset(data.DataConfig(name_pools=(400, 400, 1000)))  # the cpu population
    sharing = data.name_sharing(bio)
    assert sharing["last"]["pretrain_unique"] > 0.5 and sharing["last"]["task1_unseen"] > 0.5


def test_names_are_balanced_and_distinct_even_when_the_pools_are_nearly_full():
    for pools, n in (((5, 5, 5), 100), ((3, 4, 5), 60), ((2, 2, 2), 8)):
        names = data._draw_names(np.random.default_rng(1), n, pools)
        assert len({tuple(r) for r in names.tolist()}) == n
        for column, size in enumerate(pools):
            counts = np.bincount(names[:, column], minlength=size)
            assert counts.max() - counts.min() <= 1
