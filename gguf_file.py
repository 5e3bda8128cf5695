"""GGUF files, by hand: read the header and the tensors, dequantise them, and load a llama model into
model.py's `Transformer`.

GGUF (llama.cpp's format), little-endian throughout:
    magic "GGUF" | version u32 (2 or 3) | tensor count u64 | key-value count u64
    key-values: key (string), value type u32, value      (string = u64 length + UTF-8 bytes)
    tensor infos: name (string), n_dims u32, dims u64[n_dims] (innermost first), ggml type u32, offset u64
    padding to `general.alignment` (32 by default), then the tensor data, each tensor at its offset.

Every count, length and offset is checked against the file before it is used, so a damaged file gives one
ValueError naming the file and what was wrong, never a huge allocation or an error from deep inside torch.

Read top to bottom: header -> dequantisation -> llama weights into a Transformer.
"""
import mmap
import os
import struct
from dataclasses import dataclass

import torch

from model import ModelConfig, Transformer

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most four dimensions

# Scalar value types of the key-value section: type id -> struct format. 8 = string, 9 = array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class BlockType:
    """A ggml tensor type: `block` values are stored in `nbytes` bytes."""
    name: str
    block: int
    nbytes: int


# The types this reader can dequantise (ggml type id -> layout); any other id is refused by name.
GGML_TYPES = {0: BlockType("F32", 1, 4), 1: BlockType("F16", 1, 2),
              3: BlockType("Q4_1", 32, 20),   # fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes
              8: BlockType("Q8_0", 32, 34)}   # fp16 scale d, 32 signed bytes
KNOWN_TYPE_NAMES = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                    14: "Q6_K", 15: "Q8_K", 30: "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    kind: BlockType
    shape: tuple    # torch order (outermost first): GGUF's dims reversed
    offset: int     # from the start of the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict      # key -> int | float | bool | str | list
    tensors: dict       # name -> TensorInfo, in file order

# -----------------------------------------------------------------------------------------------
# Header


class Cursor:
    """Reads values from a byte buffer front to back, refusing to read past its end."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, why):
        return ValueError(f"{self.path}: {why}")

    def take(self, n, what):
        if n > len(self.buf) - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at byte {self.pos}, the file has {len(self.buf)}")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start:self.pos])  # a copy: no view of the file outlives the read

    def scalar(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what):
        raw = self.take(self.scalar("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, kind, what):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            item_kind, count = self.scalar("<I", what), self.scalar("<Q", what)
            if item_kind == ARRAY:
                raise self.fail(f"{what} is an array of arrays; not supported")
            smallest = 8 if item_kind == STRING else struct.calcsize(SCALARS.get(item_kind, "<B"))
            if count * smallest > len(self.buf) - self.pos:  # before a list of 10^18 items is started
                raise self.fail(f"truncated: {what} claims {count} items, more than the rest of the file holds")
            if item_kind in SCALARS and item_kind != 7:  # numbers: one unpack for the whole array
                fmt = SCALARS[item_kind]
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * struct.calcsize(fmt), what)))
            return [self.value(item_kind, what) for _ in range(count)]
        raise self.fail(f"{what} has unknown value type {kind}")


def read_gguf(path) -> GGUFFile:
    """Parse and check the header of a GGUF file: metadata and tensor infos, every tensor inside the file."""
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: truncated, {size} bytes is shorter than the 24-byte GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = Cursor(memoryview(buf), path)
        try:
            gguf = _read_header(cur, size)
        finally:
            cur.buf.release()  # the mmap cannot close while a view of it is alive
    return gguf


def _read_header(cur, size):
    path = cur.path
    if cur.take(4, "magic") != MAGIC:
        raise cur.fail(f"not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected {MAGIC!r})")
    version = cur.scalar("<I", "version")
    if version not in VERSIONS:
        raise cur.fail(f"GGUF version {version}; this reader supports versions {VERSIONS}")
    n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "key-value count")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least that many bytes
        raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} key-values, more than a {size}-byte file holds")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        metadata[key] = cur.value(cur.scalar("<I", f"type of '{key}'"), f"value of '{key}'")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<I", f"tensor '{name}' dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions, expected 1..{MAX_DIMS}")
        dims = [cur.scalar("<Q", f"tensor '{name}' dims") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I", f"tensor '{name}' type"), cur.scalar("<Q", f"tensor '{name}' offset")
        infos.append((name, dims, type_id, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment={alignment!r}, expected a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors, spans = {}, []
    for name, dims, type_id, offset in infos:
        tensors[name] = info = _tensor_info(cur, name, dims, type_id, offset, alignment, data_start, size)
        spans.append((info.offset, info.offset + info.nbytes, name))
    if len(tensors) != len(infos):
        raise cur.fail("two tensors share a name")
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise cur.fail(f"tensors '{a}' and '{b}' overlap")
    return GGUFFile(path, version, metadata, tensors)


def _tensor_info(cur, name, dims, type_id, offset, alignment, data_start, size):
    kind = GGML_TYPES.get(type_id)
    if kind is None:
        known = KNOWN_TYPE_NAMES.get(type_id, "unknown")
        raise cur.fail(f"tensor '{name}' has ggml type {type_id} ({known}); supported: "
                       f"{', '.join(t.name for t in GGML_TYPES.values())}")
    if not all(1 <= d <= 2**40 for d in dims):
        raise cur.fail(f"tensor '{name}' has dims {dims}; each must be in 1..2^40")
    if dims[0] % kind.block:
        raise cur.fail(f"tensor '{name}' rows of {dims[0]} values are not whole {kind.name} blocks of {kind.block}")
    count = 1
    for d in dims:
        count *= d
    nbytes = count // kind.block * kind.nbytes
    if offset % alignment:
        raise cur.fail(f"tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}")
    if data_start + offset + nbytes > size:
        raise cur.fail(f"tensor '{name}' bytes [{offset}, {offset + nbytes}) lie outside the"
                       f" {max(0, size - data_start)}-byte data section")
    return TensorInfo(kind, tuple(reversed(dims)), data_start + offset, nbytes)

# -----------------------------------------------------------------------------------------------
# Dequantisation: raw bytes -> float32, block by block, vectorised over all blocks.


def dequantize(raw: bytes, kind: BlockType, shape) -> torch.Tensor:
    """The float32 values of one tensor stored as `kind` in `raw`."""
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if kind.name == "F32":
        return data.view(torch.float32).reshape(shape).clone()
    if kind.name == "F16":
        return data.view(torch.float16).float().reshape(shape)
    blocks = data.reshape(-1, kind.nbytes)                                     # (n_blocks, nbytes)
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()            # (n_blocks, 1)
    if kind.name == "Q8_0":                                                    # value = d * q, q in -128..127
        return (scale * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(shape)
    # Q4_1: value = d * q + m, q in 0..15; byte j holds value j (low nibble) and value j + 16 (high nibble)
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()          # (n_blocks, 1)
    codes = blocks[:, 4:]                                                      # (n_blocks, 16)
    q = torch.cat([codes & 0x0F, codes >> 4], dim=1).float()                   # (n_blocks, 32)
    return (scale * q + minimum).reshape(shape)


def read_tensors(gguf: GGUFFile) -> dict:
    """{name: float32 tensor} for every tensor of the file."""
    return dict(iter_tensors(gguf))


def iter_tensors(gguf: GGUFFile):
    """(name, float32 tensor) for each tensor in turn: one dequantised tensor in memory at a time."""
    with open(gguf.path, "rb") as f:
        for name, info in gguf.tensors.items():
            f.seek(info.offset)
            raw = f.read(info.nbytes)
            if len(raw) != info.nbytes:  # the file shrank since its header was read
                raise ValueError(f"{gguf.path}: truncated inside tensor '{name}'")
            yield name, dequantize(raw, info.kind, info.shape)

# -----------------------------------------------------------------------------------------------
# llama weights -> Transformer

# GGUF tensor name -> ours; "{}" = layer index. The output head is absent when the embedding is tied.
LLAMA_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm_f.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "blocks.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "blocks.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "blocks.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "blocks.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "blocks.{}.attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "blocks.{}.mlp_norm.weight",
    "blk.{}.ffn_gate.weight": "blocks.{}.mlp.gate.weight",
    "blk.{}.ffn_up.weight": "blocks.{}.mlp.up.weight",
    "blk.{}.ffn_down.weight": "blocks.{}.mlp.down.weight",
}


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """A llama ModelConfig from the file's metadata (sizes, RoPE base, RMSNorm epsilon, tied head)."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.path}: general.architecture={arch!r}; this loader reads llama models")

    def field(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{gguf.path}: metadata key 'llama.{key}' is missing")
        return value

    n_head, d_model = field("attention.head_count"), field("embedding_length")
    head_dim = d_model // n_head if type(n_head) is int and n_head > 0 else None
    vocab = field("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None)
    try:
        return ModelConfig(model_type="llama", vocab_size=vocab, n_layer=field("block_count"), n_head=n_head,
                           n_kv_head=field("attention.head_count_kv", n_head), d_model=d_model,
                           d_ff=field("feed_forward_length"), head_dim=head_dim,
                           max_seq_len=field("context_length"), norm="rmsnorm",
                           norm_eps=field("attention.layer_norm_rms_epsilon"),
                           rotary_pct=field("rope.dimension_count", head_dim) / head_dim if head_dim else 1.0,
                           rope_theta=field("rope.freq_base", 10000.0), mlp="swiglu", parallel_residual=False,
                           attn_bias=False, mlp_bias=False, tie_embeddings="output.weight" not in gguf.tensors)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{gguf.path}: metadata gives an invalid model ({e})") from None


def unpermute_rotary(w, n_head):
    """Undo llama.cpp's row order for q and k. Its converter interleaves each head's two rotary halves
    (rows i and i + D/2 become neighbours 2i, 2i + 1) for its pairwise rotation; model.py rotates halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf_model(path, max_seq_len=None) -> tuple[Transformer, GGUFFile]:
    """Read a llama GGUF file into a float32 Transformer (eval mode); also return the parsed file, whose
    metadata holds the tokenizer. max_seq_len shortens the rotary tables when long contexts are not needed."""
    gguf = read_gguf(path)
    cfg = config_from_gguf(gguf)
    if max_seq_len:
        cfg.max_seq_len = min(cfg.max_seq_len, max_seq_len)
    model = Transformer(cfg)
    copy_gguf_weights(model, gguf)
    return model.eval(), gguf


def copy_gguf_weights(model: Transformer, gguf: GGUFFile):
    """Overwrite the model's weights with the file's, in place, after checking every name and shape. Values are
    checked (finite) as each tensor is decoded, so after that error the model is partly overwritten: discard it."""
    cfg, path = model.cfg, gguf.path
    names = {}
    for theirs, ours in LLAMA_NAMES.items():
        for layer in (range(cfg.n_layer) if "{}" in theirs else [None]):
            names[theirs.format(layer)] = ours.format(layer)
    unknown = sorted(set(gguf.tensors) - set(names))
    if unknown:
        raise ValueError(f"{path}: unexpected tensors {unknown[:5]} for a llama model")
    params = dict(model.named_parameters())
    for theirs, ours in names.items():
        if ours not in params:  # lm_head of a tied model: not a parameter of its own
            if theirs in gguf.tensors:
                raise ValueError(f"{path}: tensor '{theirs}' present, but this model's output head is tied to its embedding")
            continue
        if theirs not in gguf.tensors:
            raise ValueError(f"{path}: missing tensor '{theirs}'")
        if gguf.tensors[theirs].shape != tuple(params[ours].shape):
            raise ValueError(f"{path}: tensor '{theirs}' has shape {list(gguf.tensors[theirs].shape)},"
                             f" the metadata implies {list(params[ours].shape)}")
    with torch.no_grad():
        for theirs, t in iter_tensors(gguf):
            if theirs.endswith("attn_q.weight"):
                t = unpermute_rotary(t, cfg.n_head)
            elif theirs.endswith("attn_k.weight"):
                t = unpermute_rotary(t, cfg.n_kv_head)
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor '{theirs}' holds NaN or infinite values")
            params[names[theirs]].copy_(t)
