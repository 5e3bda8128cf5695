"""A byte-level BPE tokenizer (GPT-2's scheme) built from a GGUF file's metadata, and the ChatML chat template.

Encoding, in order:
 1. special tokens (the file's control tokens, e.g. <|im_start|>) are cut out of the text whole;
 2. the rest is split into words: every digit on its own (SmolLM's tokenizer isolates digits), then
    GPT-2's rule `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`,
    written out as a scanner because Python's `re` has no \\p{L};
 3. each word's UTF-8 bytes are spelled in GPT-2's printable byte alphabet and merged pair by pair, lowest
    merge rank first, until no listed merge applies; the pieces are looked up in the vocabulary.
"""
import re
import unicodedata

CONTROL = 3  # tokenizer.ggml.token_type of a special token
# Unicode's White_Space property (what \s means to the regex engines these tokenizers were trained with).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(chr(c) for c in range(0x2000, 0x200B)))
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
NO_MERGE = float("inf")
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def byte_alphabet():
    """GPT-2's map from each byte to a printable character: printable Latin-1 bytes stand for themselves,
    the other 68 are moved to code points 256 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def char_class(c):
    if c in WHITESPACE:
        return "space"
    category = unicodedata.category(c)[0]
    return {"L": "letter", "N": "number"}.get(category, "other")


def split_words(text):
    """Pre-tokenize: digits isolated, then GPT-2's split of each digit-free stretch."""
    words = []
    for stretch in _split_numbers(text):
        if stretch:
            words.extend(_gpt2_split(stretch))
    return words


def _split_numbers(text):
    """Every Unicode number character (category N) as its own stretch, with the text between them."""
    out, start = [], 0
    for i, c in enumerate(text):
        if unicodedata.category(c)[0] == "N":
            out += [text[start:i], c]
            start = i + 1
    return out + [text[start:]]


def _gpt2_split(text):
    words, i, n = [], 0, len(text)
    while i < n:
        j = _word_end(text, i, n)
        words.append(text[i:j])
        i = j
    return words


def _word_end(text, i, n):
    """Where the word starting at i ends, trying GPT-2's alternatives in the regex's order."""
    for c in CONTRACTIONS:
        if text.startswith(c, i):
            return i + len(c)
    k = i + 1 if text[i] == " " and i + 1 < n and char_class(text[i + 1]) != "space" else i  # ` ?` prefix
    kind = char_class(text[k])
    if kind != "space":  # ` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+`: a run of one class
        j = k + 1
        while j < n and char_class(text[j]) == kind:
            j += 1
        return j
    j = i + 1
    while j < n and text[j] in WHITESPACE:
        j += 1
    if j == n or j - i == 1:  # `\s+(?!\S)` takes a run at the end; `\s+` a lone space before a word
        return j
    return j - 1  # a run before a word: all but its last space, which goes with the word


class Tokenizer:
    def __init__(self, tokens, merges, token_types, eos_id, bos_id=None):
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.eos_id, self.bos_id = eos_id, bos_id
        self.special = {t: i for i, (t, kind) in enumerate(zip(self.tokens, token_types)) if kind == CONTROL}
        longest_first = sorted(self.special, key=len, reverse=True)
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        self.spell = byte_alphabet()
        self.unspell = {c: b for b, c in self.spell.items()}
        self.cache = {}  # word -> ids: most text repeats a few thousand words

    @classmethod
    def from_gguf(cls, gguf):
        meta = gguf.metadata
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{gguf.path}: tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r};"
                             " this tokenizer reads byte-level BPE ('gpt2')")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.eos_token_id"):
            if key not in meta:
                raise ValueError(f"{gguf.path}: metadata key '{key}' is missing")
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], meta["tokenizer.ggml.token_type"],
                   meta["tokenizer.ggml.eos_token_id"], meta.get("tokenizer.ggml.bos_token_id"))

    def encode(self, text):
        """Text -> token ids; special tokens written in the text become their ids."""
        ids = []
        pieces = self.special_pattern.split(text) if self.special_pattern else [text]
        for piece in pieces:
            if piece in self.special:
                ids.append(self.special[piece])
            else:
                for word in split_words(piece):
                    ids.extend(self._encode_word(word))
        return ids

    def _encode_word(self, word):
        if word not in self.cache:
            self.cache[word] = self._merge([self.spell[b] for b in word.encode("utf-8")])
        return self.cache[word]

    def _merge(self, parts):
        """Apply the lowest-ranked listed merge to every occurrence of its pair, until none applies."""
        while len(parts) > 1:
            rank, first = min((self.ranks.get(pair, NO_MERGE), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == NO_MERGE:
                break
            best, merged, i = (parts[first], parts[first + 1]), [], 0
            while i < len(parts):  # left to right, so "a a a" with merge "a a" gives "aa a"
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.ids[p] for p in parts]

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            token = self.tokens[i]
            out += token.encode() if token in self.special else bytes(self.unspell[c] for c in token)
        return out.decode("utf-8", errors="replace")


def chat(messages, add_generation_prompt=True):
    """The ChatML text of a conversation, as SmolLM2-Instruct's template writes it: each message as
    `<|im_start|>role\\ncontent<|im_end|>\\n`, a default system message first when none is given, and
    `<|im_start|>assistant\\n` at the end to ask for a reply."""
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
