"""A small GPT-NeoX / Llama / GPT-2 transformer that reads and writes HuggingFace checkpoints.

One `Transformer` covers the three families with a handful of switches (norm, position encoding,
MLP, residual layout). Checkpoints are HF directories (`config.json` + `model.safetensors`, or
shards listed in `model.safetensors.index.json`), parsed and written here by hand: no
`transformers`, no `safetensors`, and nothing is ever unpickled.

Read top to bottom: config -> layers -> model -> safetensors I/O -> HF key tables -> load/save.
"""
import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    model_type: str = "gpt_neox"    # checkpoint family, which fixes the key names: gpt_neox | llama | gpt2
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None    # grouped-query attention; None = n_head
    d_model: int = 768
    d_ff: int = 3072                # MLP hidden width
    head_dim: int | None = None     # None = d_model // n_head
    max_seq_len: int = 2048
    norm: str = "layernorm"         # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position: str = "rotary"        # rotary | learned
    rotary_pct: float = 0.25        # share of each head's dims that rotate (NeoX rotates a quarter)
    rope_theta: float = 10000.0
    mlp: str = "gelu"               # gelu (exact) | gelu_tanh | swiglu
    parallel_residual: bool = True  # x + attn(ln1 x) + mlp(ln2 x) instead of two sequential steps
    attn_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = False

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or (self.d_model // self.n_head if type(self.n_head) is int and self.n_head > 0 else None)
        for field, limit in SIZE_LIMITS.items():  # bounded before anything is built from them
            value = getattr(self, field)
            if type(value) is not int or not 1 <= value <= limit:
                raise ValueError(f"ModelConfig.{field}={value!r}: expected an integer in 1..{limit}")
        for field, (low, high) in FLOAT_RANGES.items():
            value = getattr(self, field)
            if type(value) not in (int, float) or not low <= value <= high:  # NaN fails too
                raise ValueError(f"ModelConfig.{field}={value!r}: expected a number in [{low}, {high}]")
        for field in ("parallel_residual", "attn_bias", "mlp_bias", "tie_embeddings"):
            if type(getattr(self, field)) is not bool:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected true or false")
        if self.rotary_dim % 2:
            raise ValueError(f"ModelConfig.rotary_pct={self.rotary_pct}: rotates {self.rotary_dim} of {self.head_dim}"
                             " dims per head; rotary embeddings need an even number")
        for field, allowed in [("model_type", FAMILIES), ("norm", ("layernorm", "rmsnorm")),
                               ("position", ("rotary", "learned")), ("mlp", ("gelu", "gelu_tanh", "swiglu"))]:
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected one of {allowed}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.rotary_pct) if self.position == "rotary" else 0


FAMILIES = ("gpt_neox", "llama", "gpt2")
# Upper bounds on every size, far above any model this code is for, so that a damaged config.json cannot
# make the loader try to build a model of 10^9 layers; the checkpoint's own tensors are checked next.
SIZE_LIMITS = dict(vocab_size=2**21, n_layer=512, n_head=1024, n_kv_head=1024, d_model=2**16, d_ff=2**18,
                   head_dim=2**12, max_seq_len=2**21)
FLOAT_RANGES = dict(norm_eps=(0.0, 1.0), rotary_pct=(0.0, 1.0), rope_theta=(1e-6, 1e12))
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an HF config dict, reading both the transformers 4.x and 5.x spellings."""
    try:
        return _config_from_hf(hf, source)
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type, e.g. a list for a number
        raise ValueError(f"{source}: a field has the wrong type ({e})") from None
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def _config_from_hf(hf: dict, source: str) -> ModelConfig:
    def bad(field, why):
        return ValueError(f"{source}: field '{field}' {why}")

    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise bad("model_type", f"is {kind!r}; supported: {', '.join(FAMILIES)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}   # 5.x nests rope settings here
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise bad("rope_scaling", f"has type {rope_type!r}; only plain RoPE ('default') is supported")
    for field in ("sliding_window", "use_sliding_window", "scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(field):
            raise bad(field, f"is {hf[field]!r}; not supported by this model")
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    common = dict(model_type=kind, vocab_size=hf["vocab_size"])
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GELU_NAMES:
            raise bad("activation_function", f"is {act!r}; expected one of {sorted(GELU_NAMES)}")
        d = hf["n_embd"]
        return ModelConfig(**common, n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=d,
                           d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf.get("n_positions", 1024),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
                           mlp=GELU_NAMES[act], parallel_residual=False,
                           tie_embeddings=hf.get("tie_word_embeddings", True))
    act = hf.get("hidden_act", "silu" if kind == "llama" else "gelu")
    if (kind == "llama") != (act == "silu") or (kind == "gpt_neox" and act not in GELU_NAMES):
        raise bad("hidden_act", f"is {act!r}; {kind} here supports {'silu' if kind == 'llama' else sorted(GELU_NAMES)}")
    shared = dict(n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
                  d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                  rope_theta=float(theta))
    if kind == "llama":
        return ModelConfig(**common, **shared, n_kv_head=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
                           norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                           rotary_pct=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)),
                           mlp="swiglu", parallel_residual=False, attn_bias=hf.get("attention_bias", False),
                           mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False))
    return ModelConfig(**common, **shared, norm_eps=hf.get("layer_norm_eps", 1e-5),
                       rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25))),
                       mlp=GELU_NAMES[act], parallel_residual=hf.get("use_parallel_residual", True),
                       attn_bias=hf.get("attention_bias", True), tie_embeddings=hf.get("tie_word_embeddings", False))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF config.json for cfg, in the 4.x spelling that transformers 5.x still reads."""
    expected = {"gpt_neox": dict(norm="layernorm", position="rotary", mlp_bias=True, n_kv_head=cfg.n_head),
                "llama": dict(norm="rmsnorm", position="rotary", mlp="swiglu", parallel_residual=False),
                "gpt2": dict(norm="layernorm", position="learned", parallel_residual=False, attn_bias=True,
                             mlp_bias=True, n_kv_head=cfg.n_head)}[cfg.model_type]
    if cfg.model_type != "llama":
        expected["head_dim"] = cfg.d_model // cfg.n_head
    for field, value in expected.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} cannot be written as a {cfg.model_type} checkpoint (needs {value!r})")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "swiglu": "silu"}[cfg.mlp]
    if cfg.model_type == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len,
                    activation_function=act, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings)
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, hidden_act=act,
              max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=cfg.attn_bias)
    if cfg.model_type == "llama":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", **hf, num_key_value_heads=cfg.n_kv_head,
                    head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                    partial_rotary_factor=cfg.rotary_pct, mlp_bias=cfg.mlp_bias)
    return dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", **hf, layer_norm_eps=cfg.norm_eps,
                rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta, use_parallel_residual=cfg.parallel_residual)

# -----------------------------------------------------------------------------------------------
# Layers


def rotate_half(x):
    """HF's rotary convention: pair dim i with dim i + half (no weight permutation needed on load)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head; the rest pass through (NeoX's partial rotary)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, one slot per layer, filled left to right."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.len = 0   # positions already stored; forward() advances it after the last layer

    def update(self, layer, k, v):  # k, v: (B, H_kv, T, D)
        end = self.len + k.shape[2]
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # Separate q/k/v (not one fused matrix): the weight-update analyses look at each one.
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.attn_bias)

    def forward(self, x, cos, sin, mask, cache):  # x: (B, T, C)
        B, T, _ = x.shape
        H, H_kv, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        # One matrix product for q, k and v together: fewer, larger products run faster on a CPU. (So forward
        # hooks on q_proj, k_proj and v_proj do not fire: hook attn_norm's output to see what they read.)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([p.bias for p in projs]) if self.cfg.attn_bias else None
        qkv = F.linear(x, torch.cat([p.weight for p in projs]), bias)            # (B, T, (H + 2 H_kv) D)
        q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)                                 # (B, H, T, D)
        k, v = (t.view(B, T, H_kv, D).transpose(1, 2) for t in (k, v))         # (B, H_kv, T, D)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                              # (B, H_kv, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


def make_norm(cfg: ModelConfig):
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        attn_out = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if self.parallel:  # both branches read the same input x
            return x + attn_out + self.mlp(self.mlp_norm(x))
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x))

# -----------------------------------------------------------------------------------------------
# Model


def left_pad(prompts, pad_id, device=None):
    """Token-id lists of any lengths -> idx (B, T) and attention mask (B, T), right-aligned so that
    every prompt's last token sits in the last column."""
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return idx, mask


def positions_and_mask(B, T, start, attention_mask, device):
    """The positions of T new tokens after `start` cached ones, and the attention mask: (T,) and None (plain
    causal: SDPA's fast path) without padding or a cache, else (B, T) and (B, 1, T, S) over S = start + T keys.
    attention_mask (B, S): 1 = real token, 0 = padding."""
    if attention_mask is None and start == 0:
        return torch.arange(T, device=device), None
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(B, start + T, dtype=torch.bool, device=device))       # (B, S)
    # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]                     # (B, T)
    q_idx = torch.arange(start, start + T, device=device)[:, None]
    k_idx = torch.arange(start + T, device=device)[None, :]
    mask = (k_idx <= q_idx) & valid[:, None, :]                                     # (B, T, S)
    return pos, (mask | (k_idx == q_idx)).unsqueeze(1)  # a padding query sees itself: no all-masked rows (NaN)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.rotary_dim:  # cos/sin tables for every position, derived from the config, never saved
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32) / cfg.rotary_dim)
            freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)                        # (max_seq_len, rotary_dim)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2's scaled init: residual-branch outputs shrink with depth
            for proj in (block.attn.o_proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + a backward costing twice the forward), split as (body, head)
        because QA fine-tuning runs the head at the answer positions only. 6 per weight of every matrix
        product, plus 6 x 2 x seq_len x n_head x head_dim per block for attention's two products (scores
        and weighted values; the causal mask's skipped half counted, as in PaLM, Chowdhery et al. 2022,
        appendix B). Norms, activations, the embedding lookup and the optimizer are not counted: this is
        the useful work a utilisation figure divides by the machine's matmul peak."""
        c = self.cfg
        attn_weights = c.d_model * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.d_model
        mlp_weights = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff
        attention = 2 * 2 * seq_len * c.n_head * c.head_dim                    # forward, per token per block
        return c.n_layer * (6 * (attn_weights + mlp_weights) + 3 * attention), 6 * c.d_model * c.vocab_size

    def forward(self, idx, targets=None, loss_mask=None, attention_mask=None, return_hidden=False, cache=None,
                last_only=False):
        """idx (B, T) token ids -> logits (B, T, V) and the mean cross-entropy over masked targets.

        attention_mask (B, S), 1 = real token, 0 = padding, covers the cached positions too (S = cache.len + T);
        padding may sit on the left, as in batched generation. return_hidden adds the residual stream:
        hidden[0] after the embedding, hidden[l] after block l (before the final norm), each (B, T, C).
        last_only computes logits (B, 1, V) for the last position alone: all that decoding needs.
        With a loss_mask (B, T), only the masked positions go through the final norm and the head, and logits
        is (N, V) for the N masked positions in row-major order: in QA fine-tuning the loss covers the answer
        alone, a quarter of the positions, and the head (vocabulary x width) is a large share of a small
        model's compute.
        """
        B, T = idx.shape
        if last_only and targets is not None:
            raise ValueError("forward: last_only gives one position's logits; the loss needs them all")
        start = cache.len if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        pos, mask = positions_and_mask(B, T, start, attention_mask, idx.device)
        x = self.embed(idx)                                                     # (B, T, C)
        if self.cfg.position == "learned":
            x = x + self.pos_embed(pos)
        cos = sin = None
        if self.cfg.rotary_dim:
            cos, sin = self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype)  # (T, R) or (B, T, R)
            if pos.dim() == 2:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                   # (B, 1, T, R): broadcast over heads
        hidden = [x]
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
            hidden.append(x)
        if cache is not None:
            cache.len += T
        logits = loss = None
        if loss_mask is not None:
            logits = self.lm_head(self.norm_f(x[loss_mask]))                    # (N, V), N masked positions
            if targets is not None:
                loss = F.cross_entropy(logits.float(), targets[loss_mask], reduction="sum") / max(1, len(logits))
        else:
            logits = self.lm_head(self.norm_f(x[:, -1:] if last_only else x))  # (B, T, V)
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1))
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id=None, pad_id=0, top_k=None, generator=None):
        """Batched decoding with a KV cache: greedy, or with top_k sampling from the k likeliest tokens
        (drawn from `generator`). prompts: list of token-id lists, any lengths.

        Prompts are left-padded so they all end at the same column. Returns one list of new tokens per
        prompt, ending with eos_id where the model produced it. (Exact-match evaluation needs no decoding:
        see evaluation.evaluate.)
        """
        device = self.embed.weight.device
        idx, mask = left_pad(prompts, pad_id, device)
        B, T = idx.shape
        cache = KVCache(self.cfg, B, T + max_new_tokens, self.embed.weight.dtype, device)
        logits, _ = self(idx, attention_mask=mask, cache=cache, last_only=True)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            if top_k is None:
                nxt = logits[:, -1].argmax(-1)                                  # (B,)
            else:
                top, ids = logits[:, -1].float().topk(top_k, dim=-1)           # (B, k)
                pick = torch.multinomial(top.softmax(-1), 1, generator=generator)  # (B, 1)
                nxt = ids.gather(1, pick)[:, 0]
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            logits, _ = self(nxt[:, None], attention_mask=mask, cache=cache, last_only=True)
        rows = torch.stack(out, dim=1).tolist()
        if eos_id is not None:
            rows = [r[:r.index(eos_id) + 1] if eos_id in r else r for r in rows]
        return rows

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """Load an HF checkpoint directory. dtype: the dtype to compute in, or "auto" for the file's own."""
        return load_pretrained(cls, path, dtype)

    def save_pretrained(self, path, max_shard_bytes=None):
        save_pretrained(self, path, max_shard_bytes)

# -----------------------------------------------------------------------------------------------
# safetensors, by hand: 8-byte little-endian header length, a JSON header, then raw little-endian bytes.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open a temporary file beside `path` for writing; when the block ends without error, one rename puts it
    in place of `path`. A reader, or a run killed at any moment, sees the old file or the new one, never half
    of one; on an error (a full disk) the temporary file is removed and the old file is left as it was."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}  # the same bytes on every platform
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes private files; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_safetensors(path) -> dict:
    """Read every tensor of one .safetensors file, checking the header against the file first."""
    header, data_start = read_safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in sorted(header.items(), key=lambda kv: kv[1][2]):
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            f.readinto(buf)
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
    return tensors


def read_safetensors_header(path):
    """{name: (dtype, shape, begin, end)} and where the data starts, every entry checked against the file
    (offsets inside it, sizes matching shapes, no overlaps), without reading the data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated, {size} bytes is shorter than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        spans = []
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
                well_formed = all(isinstance(v, int) and v >= 0 for v in [*shape, begin, end])
            except (KeyError, TypeError, ValueError):
                well_formed = False
            if not well_formed:
                raise ValueError(f"{path}: tensor '{name}' has a malformed entry {info!r}")
            if dtype is None:
                raise ValueError(f"{path}: tensor '{name}' has unknown dtype {info['dtype']!r}")
            if not begin <= end <= data_size:
                raise ValueError(f"{path}: tensor '{name}' offsets [{begin}, {end}] lie outside the {data_size}-byte data")
            if math.prod(shape) * dtype.itemsize != end - begin:
                raise ValueError(f"{path}: tensor '{name}' shape {shape} x {info['dtype']} does not match its {end - begin} bytes")
            spans.append((begin, end, name))
        spans.sort()
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise ValueError(f"{path}: tensors '{a}' and '{b}' overlap")
    return {name: (DTYPES[info["dtype"]], tuple(info["shape"]), *info["data_offsets"]) for name, info in header.items()}, 8 + n


def write_safetensors(path, tensors: dict, metadata=None):
    """Write tensors atomically (atomic_write)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    with atomic_write(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

# -----------------------------------------------------------------------------------------------
# HF key tables: our parameter name <- HF name, "{}" = layer index. A tuple of our names marks a
# fused HF tensor: NeoX stores q,k,v interleaved per head; GPT-2's Conv1D stores (in, out) matrices.

HF_KEYS = {
    "llama": [
        ("embed.weight", "model.embed_tokens.weight", "copy"),
        ("blocks.{}.attn_norm.weight", "model.layers.{}.input_layernorm.weight", "copy"),
        *[(f"blocks.{{}}.attn.{p}.{w}", f"model.layers.{{}}.self_attn.{p}.{w}", "copy")
          for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")],
        ("blocks.{}.mlp_norm.weight", "model.layers.{}.post_attention_layernorm.weight", "copy"),
        *[(f"blocks.{{}}.mlp.{ours}.{w}", f"model.layers.{{}}.mlp.{theirs}_proj.{w}", "copy")
          for ours, theirs in (("gate", "gate"), ("up", "up"), ("down", "down")) for w in ("weight", "bias")],
        ("norm_f.weight", "model.norm.weight", "copy"),
        ("lm_head.weight", "lm_head.weight", "copy"),
    ],
    "gpt_neox": [
        ("embed.weight", "gpt_neox.embed_in.weight", "copy"),
        *[(f"blocks.{{}}.{ours}.{w}", f"gpt_neox.layers.{{}}.{theirs}.{w}", "copy") for w in ("weight", "bias")
          for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                               ("attn.o_proj", "attention.dense"), ("mlp.up", "mlp.dense_h_to_4h"),
                               ("mlp.down", "mlp.dense_4h_to_h"))],
        *[((f"blocks.{{}}.attn.q_proj.{w}", f"blocks.{{}}.attn.k_proj.{w}", f"blocks.{{}}.attn.v_proj.{w}"),
           f"gpt_neox.layers.{{}}.attention.query_key_value.{w}", "neox_qkv") for w in ("weight", "bias")],
        *[(f"norm_f.{w}", f"gpt_neox.final_layer_norm.{w}", "copy") for w in ("weight", "bias")],
        ("lm_head.weight", "embed_out.weight", "copy"),
    ],
    "gpt2": [
        ("embed.weight", "transformer.wte.weight", "copy"),
        ("pos_embed.weight", "transformer.wpe.weight", "copy"),
        *[(f"blocks.{{}}.{ours}.{w}", f"transformer.h.{{}}.{theirs}.{w}", "copy") for w in ("weight", "bias")
          for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"))],
        *[(f"blocks.{{}}.{ours}.{w}", f"transformer.h.{{}}.{theirs}.{w}", "conv1d") for w in ("weight", "bias")
          for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj"))],
        *[((f"blocks.{{}}.attn.q_proj.{w}", f"blocks.{{}}.attn.k_proj.{w}", f"blocks.{{}}.attn.v_proj.{w}"),
           f"transformer.h.{{}}.attn.c_attn.{w}", "conv1d") for w in ("weight", "bias")],
        *[(f"norm_f.{w}", f"transformer.ln_f.{w}", "copy") for w in ("weight", "bias")],
        ("lm_head.weight", "lm_head.weight", "copy"),
    ],
}
# Buffers some checkpoints carry that are not weights: rotary tables and causal masks.
NON_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias")


def key_plan(model: Transformer):
    """[(our names, HF name, layout)] for every tensor this model has: the table, expanded per layer,
    keeping the rows whose parameters exist (biases, gate, pos_embed and lm_head depend on the config)."""
    ours = dict(model.named_parameters())  # a tied lm_head shares embed's Parameter and is listed once
    plan = []
    for our, hf, layout in HF_KEYS[model.cfg.model_type]:
        for layer in (range(model.cfg.n_layer) if "{}" in hf else [None]):
            names = tuple(n.format(layer) for n in (our if isinstance(our, tuple) else (our,)))
            if all(n in ours for n in names):
                plan.append((names, hf.format(layer), layout))
    return plan


def split_hf(t, layout, cfg, parts):
    """HF tensor -> our tensors."""
    if layout == "conv1d":
        t = t.t() if t.dim() == 2 else t          # Conv1D keeps (in, out); nn.Linear wants (out, in)
        return t.chunk(parts, dim=0) if parts > 1 else (t,)
    if layout == "neox_qkv":                      # rows are [head0: q k v, head1: q k v, ...]
        t = t.reshape(cfg.n_head, 3, cfg.head_dim, *t.shape[1:])
        return tuple(t[:, i].reshape(cfg.n_head * cfg.head_dim, *t.shape[3:]) for i in range(3))
    return (t,)


def fuse_hf(ts, layout, cfg):
    """Our tensors -> HF tensor (the inverse of split_hf)."""
    if layout == "conv1d":
        t = torch.cat(ts, dim=0)
        return t.t().contiguous() if t.dim() == 2 else t
    if layout == "neox_qkv":
        t = torch.stack([x.reshape(cfg.n_head, cfg.head_dim, *x.shape[1:]) for x in ts], dim=1)
        return t.reshape(3 * cfg.n_head * cfg.head_dim, *t.shape[3:])
    return ts[0]

# -----------------------------------------------------------------------------------------------
# HF checkpoint directories


def checkpoint_files(path):
    """{tensor name: (file, dtype, shape)} over model.safetensors or the shards its index lists, from the
    headers alone: everything can be checked before a byte of data is read or a tensor allocated."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(f"{single}: not found (nor a model.safetensors.index.json)")
        return {name: (single, dtype, shape) for name, (dtype, shape, *_) in read_safetensors_header(single)[0].items()}
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        well_formed = isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        well_formed = False
    if not well_formed:
        raise ValueError(f"{index}: expected a JSON object with a 'weight_map' of tensor name -> shard file")
    files = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index}: shard name {shard!r} escapes the checkpoint directory")
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{shard_path}: shard listed in {index} is missing")
        for name, (dtype, shape, *_) in read_safetensors_header(shard_path)[0].items():
            if name in files:
                raise ValueError(f"{index}: tensor '{name}' is in two shards")
            if weight_map.get(name) != shard:
                raise ValueError(f"{shard_path}: holds tensor '{name}', which {index} does not place there")
            files[name] = (shard_path, dtype, shape)
    missing = sorted(set(weight_map) - set(files))
    if missing:
        raise ValueError(f"{index}: tensors {missing[:3]} are listed but not in their shards")
    return files


LAYER_PREFIX = {"gpt_neox": "gpt_neox.layers.", "llama": "model.layers.", "gpt2": "transformer.h."}


def load_pretrained(cls, path, dtype=torch.float32):
    """Check config.json and every tensor's name, dtype and shape against each other, then build the model
    and read the data. Nothing is allocated until the files agree with the config, so a damaged checkpoint
    gives a ValueError naming the file, never a huge allocation or an error from deep inside torch."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: not found (expected an HF checkpoint directory)")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        hf = None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    try:
        cfg = config_from_hf(hf, config_path)
    except KeyError as e:
        raise ValueError(f"{config_path}: missing field {e}") from None
    files = checkpoint_files(path)
    if cfg.model_type == "gpt2":  # GPT-2 files come with and without the "transformer." prefix
        files = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in files.items()}
    prefix = LAYER_PREFIX[cfg.model_type]
    layers = {int(k[len(prefix):].split(".")[0]) for k in files if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    if layers != set(range(cfg.n_layer)):
        raise ValueError(f"{config_path}: says {cfg.n_layer} layers, but the tensors hold layers"
                         f" {sorted(layers)[:3]}{'...' if len(layers) > 3 else ''} ({len(layers)} in all)")
    with torch.device("meta"):  # shapes without storage: what this config expects of every tensor
        skeleton = cls(cfg)
    params = dict(skeleton.named_parameters())
    plan = key_plan(skeleton)
    for names, hf_name, layout in plan:
        if hf_name not in files:
            raise ValueError(f"{path}: missing tensor '{hf_name}'")
        file, file_dtype, shape = files[hf_name]
        expected = tuple(fuse_hf([params[n] for n in names], layout, cfg).shape)
        if shape != expected:
            raise ValueError(f"{file}: tensor '{hf_name}' has shape {list(shape)}, {config_path} implies {list(expected)}")
        if not file_dtype.is_floating_point:
            raise ValueError(f"{file}: tensor '{hf_name}' is {file_dtype}, expected floating-point weights")
    used = {hf for _, hf, _ in plan}
    if cfg.tie_embeddings:  # some files carry the tied head anyway; it is the embedding again
        used.add(next(hf for our, hf, _ in HF_KEYS[cfg.model_type] if our == "lm_head.weight"))
    unknown = sorted(k for k in files if k not in used and not k.endswith(NON_WEIGHT_SUFFIXES))
    if unknown:
        raise ValueError(f"{path}: unexpected tensors {unknown[:5]} for a {cfg.model_type} model of this config")
    tensors = {}
    for file in sorted({file for file, _, _ in files.values()}):
        tensors |= read_safetensors(file)
    if cfg.model_type == "gpt2":
        tensors = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in tensors.items()}
    if dtype == "auto":
        dtype = next((files[hf][1] for _, hf, _ in plan), torch.float32)
    model = cls(cfg).to(dtype)
    params = dict(model.named_parameters())
    for names, hf_name, layout in plan:
        if not torch.isfinite(tensors[hf_name]).all():
            raise ValueError(f"{files[hf_name][0]}: tensor '{hf_name}' holds NaN or infinite values")
        with torch.no_grad():
            for name, part in zip(names, split_hf(tensors[hf_name], layout, cfg, len(names))):
                params[name].copy_(part)
    return model


def save_pretrained(model: Transformer, path, max_shard_bytes=None):
    """Write config.json and model.safetensors (or shards + index when max_shard_bytes is set), each atomically."""
    os.makedirs(path, exist_ok=True)
    cfg, params = model.cfg, dict(model.named_parameters())
    hf_cfg = config_to_hf(cfg) | {"torch_dtype": str(model.embed.weight.dtype).removeprefix("torch.")}
    tensors = {hf: fuse_hf([params[n].detach() for n in names], layout, cfg) for names, hf, layout in key_plan(model)}
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    write_json(os.path.join(path, "config.json"), hf_cfg)
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if max_shard_bytes is None:
        write_safetensors(single, tensors, {"format": "pt"})
        stale = [index]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            write_safetensors(os.path.join(path, name), shard, {"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(index, {"metadata": {"total_size": total},
                           "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}})
        stale = [single]
    for f in stale:  # a leftover file of the other layout would shadow or confuse the new one
        if os.path.exists(f):
            os.remove(f)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
