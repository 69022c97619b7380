"""Tiny, deterministic GGUF models for fast tests against real llama.cpp.

The models have random weights, so their output is meaningless, but they are
real ``llama`` models with a GPT-2 style byte-level BPE vocabulary: llama.cpp
loads them in milliseconds and tokenizes, decodes and samples from them exactly
as it would a downloaded model. The same arguments always give byte-identical
files.

Models (see ``write_tiny_models``):

* ``tiny_a`` and ``tiny_b``: vocabulary ``"ab"``, different weights; ``tiny_a``
  carries a ChatML-like chat template.
* ``tiny_c``: vocabulary ``"c"`` (other merges, other size, other token ids),
  for cross-tokenizer code.

Broken files for error paths (see ``write_broken_models``): not a GGUF file at
all, a valid model cut in the middle of its tensor data, and a tiny Mamba
model (recurrent, which the engine must refuse).

Crafted files (see ``CRAFTED``): a valid tiny model changed in one precise way,
as a damaged or malicious download would be: a wrong magic, counts and lengths
far beyond the file, cuts, and values llama.cpp aborts the process on.
"""

from __future__ import annotations

import json

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

VocabName = Literal["ab", "c", "ab+markers"]

# Hyperparameters of the tiny llama models: a few hundred KB at F32.
N_CTX_TRAIN = 512
N_EMBD = 32
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2  # grouped-query attention, as in most current models
N_FF = 64
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0

# Standard deviation of the logits. The final RMS norm gives the hidden state
# unit scale, so this alone sets how peaked next-token distributions are:
# clearly non-uniform, never one-hot.
LOGIT_SCALE = 2.0

# Mamba sizes; llama.cpp only supports an expansion factor of 2.
MAMBA_D_INNER = 2 * N_EMBD
MAMBA_D_CONV = 4
MAMBA_D_STATE = 8
MAMBA_DT_RANK = 2

BOS = "<|bos|>"
EOS = "<|eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# User-defined marker tokens, as gemma has ("<tr>", "<start_of_image>"): the tokenizer
# reads their text as one token, and an answer must never hold them.
MARKERS = tuple(f"<mark{i}>" for i in range(40))

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# BPE merges in rank order, written as plain text pairs. Each merge creates
# the token left + right, so both halves must exist by the time it appears.
_MERGES_AB: tuple[tuple[str, str], ...] = (
    (" ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), (" ", "a"), ("o", "n"),
    ("r", "e"), (" t", "he"), ("a", "n"), ("e", "n"), ("o", "r"), ("in", "g"),
    (" ", "s"), (" ", "w"), (" ", "o"), ("a", "t"), ("e", "s"), ("l", "l"),
    ("o", "u"), ("i", "s"), ("e", "d"), ("t", "he"), (" a", "n"), (" an", "d"),
    (" ", "i"), ("i", "t"), ("a", "r"), ("s", "t"), (" ", "c"), (" ", "b"),
    (" ", "h"), (" ", "f"), (" o", "f"), (" t", "o"), (" i", "s"), (" i", "n"),
    ("o", "w"), ("l", "e"), ("a", "l"), ("l", "y"), ("t", "i"), ("ti", "on"),
    ("he", "ll"), ("hell", "o"), (" w", "or"), ("l", "d"), (" wor", "ld"),
    (" ", "d"), (" d", "o"), (" do", "g"), ("\n", "\n"),
)

# A different, smaller merge list: "the", "ing", "al"... segment differently.
_MERGES_C: tuple[tuple[str, str], ...] = (
    ("t", "h"), ("th", "e"), (" ", "the"), ("n", "g"), ("i", "ng"), ("a", "l"),
    ("o", "f"), (" ", "of"), ("e", "d"), ("l", "y"), (" ", "s"), ("s", "t"),
    ("e", "r"), (" ", "a"), ("o", "u"), ("l", "o"), ("h", "e"), (" ", "w"),
    ("o", "r"), (" w", "or"), ("i", "s"), (" ", "is"), ("a", "n"), (" ", "an"),
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character map.

    Printable bytes map to themselves and the others to U+0100 onwards, so
    every token is a printable string (a space becomes "Ġ", a newline "Ċ").
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in mapping)
    for n, b in enumerate(others):
        mapping[b] = chr(256 + n)
    return mapping


_BYTE_TO_CHAR = _bytes_to_unicode()


def _encode(text: str) -> str:
    """Plain text -> GPT-2 token text (UTF-8 bytes mapped to characters)."""
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as llama.cpp reads it from GGUF."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int
    eos_id: int

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def build_vocab(name: VocabName) -> Vocab:
    """The shared vocabulary ``"ab"``, the different vocabulary ``"c"``, or ``"ab"``
    with user-defined marker tokens after it (``"ab+markers"``)."""
    if name in ("ab", "ab+markers"):
        # Byte tokens in byte order, then merges, then the special tokens.
        byte_tokens = [_BYTE_TO_CHAR[b] for b in range(256)]
        markers = list(MARKERS) if name == "ab+markers" else []
        return _assemble(byte_tokens, _MERGES_AB, [BOS, EOS, IM_START, IM_END], specials_first=False, markers=markers)
    if name == "c":
        # Other ids for the same bytes: specials first, bytes by character.
        byte_tokens = sorted(_BYTE_TO_CHAR.values())
        return _assemble(byte_tokens, _MERGES_C, [BOS, EOS], specials_first=True)
    raise ValueError(f"unknown vocabulary {name!r}; expected 'ab' or 'c'")


def _assemble(
    byte_tokens: list[str],
    merge_pairs: tuple[tuple[str, str], ...],
    specials: list[str],
    *,
    specials_first: bool,
    markers: Sequence[str] = (),
) -> Vocab:
    merges, merged = _encode_merges(set(byte_tokens), merge_pairs)
    normal = byte_tokens + merged
    tokens = (specials + normal if specials_first else normal + specials) + list(markers)
    types = [
        gguf.TokenType.CONTROL if t in specials else gguf.TokenType.USER_DEFINED if t in markers else gguf.TokenType.NORMAL
        for t in tokens
    ]
    return Vocab(
        tokens=tuple(tokens),
        token_types=tuple(int(t) for t in types),
        merges=tuple(merges),
        bos_id=tokens.index(BOS),
        eos_id=tokens.index(EOS),
    )


def _encode_merges(
    known: set[str], pairs: tuple[tuple[str, str], ...]
) -> tuple[list[str], list[str]]:
    """GGUF merge strings ("Ġt he") and the new tokens they create, in order.

    Checked here because llama.cpp aborts the whole process on a duplicate
    token, and silently ignores a merge whose halves are not tokens.
    """
    known = set(known)
    merges, merged = [], []
    for left, right in pairs:
        left, right = _encode(left), _encode(right)
        if left not in known or right not in known:
            raise ValueError(f"merge {left!r} {right!r} uses an unknown token")
        if left + right in known:
            raise ValueError(f"merge {left!r} {right!r} creates an existing token")
        known.add(left + right)
        merges.append(f"{left} {right}")
        merged.append(left + right)
    return merges, merged


def _linear(rng: np.random.Generator, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
    """A weight in numpy (out, in) order, i.e. ggml shape {in, out}.

    Scaled by 1/sqrt(n_in) so activations keep unit scale through the layers.
    """
    return (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def _embedding_and_head(rng: np.random.Generator, n_vocab: int) -> dict[str, np.ndarray]:
    """The tensors every architecture here shares: token embeddings, final norm, output."""
    return {
        "token_embd.weight": rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32),
        "output_norm.weight": _ones(N_EMBD),
        "output.weight": _linear(rng, n_vocab, N_EMBD, gain=LOGIT_SCALE),
    }


def _llama_tensors(rng: np.random.Generator, n_vocab: int) -> dict[str, np.ndarray]:
    head_dim = N_EMBD // N_HEAD
    tensors = _embedding_and_head(rng, n_vocab)
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        tensors |= {
            f"{blk}.attn_norm.weight": _ones(N_EMBD),
            f"{blk}.attn_q.weight": _linear(rng, N_HEAD * head_dim, N_EMBD),
            f"{blk}.attn_k.weight": _linear(rng, N_HEAD_KV * head_dim, N_EMBD),
            f"{blk}.attn_v.weight": _linear(rng, N_HEAD_KV * head_dim, N_EMBD),
            f"{blk}.attn_output.weight": _linear(rng, N_EMBD, N_HEAD * head_dim),
            f"{blk}.ffn_norm.weight": _ones(N_EMBD),
            f"{blk}.ffn_gate.weight": _linear(rng, N_FF, N_EMBD),
            f"{blk}.ffn_up.weight": _linear(rng, N_FF, N_EMBD),
            f"{blk}.ffn_down.weight": _linear(rng, N_EMBD, N_FF),
        }
    return tensors


def _mamba_tensors(rng: np.random.Generator, n_vocab: int) -> dict[str, np.ndarray]:
    d_inner, d_state, dt_rank = MAMBA_D_INNER, MAMBA_D_STATE, MAMBA_DT_RANK
    # S4D-real initialisation: A = -(1..d_state) for every channel keeps the scan stable.
    ssm_a = -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1))
    tensors = _embedding_and_head(rng, n_vocab)
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        tensors |= {
            f"{blk}.attn_norm.weight": _ones(N_EMBD),
            f"{blk}.ssm_in.weight": _linear(rng, 2 * d_inner, N_EMBD),
            f"{blk}.ssm_conv1d.weight": _linear(rng, d_inner, MAMBA_D_CONV),
            f"{blk}.ssm_conv1d.bias": np.zeros(d_inner, dtype=np.float32),
            f"{blk}.ssm_x.weight": _linear(rng, dt_rank + 2 * d_state, d_inner),
            f"{blk}.ssm_dt.weight": _linear(rng, d_inner, dt_rank),
            f"{blk}.ssm_dt.bias": np.zeros(d_inner, dtype=np.float32),
            # No ".weight" suffix on these two, as in llama.cpp's tensor names.
            f"{blk}.ssm_a": ssm_a.copy(),
            f"{blk}.ssm_d": _ones(d_inner),
            f"{blk}.ssm_out.weight": _linear(rng, N_EMBD, d_inner),
        }
    return tensors


def _add_vocab(writer: gguf.GGUFWriter, vocab: Vocab, chat_template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _write_gguf(path: Path, writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> Path:
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _new_writer(path: Path, arch: str, name: str) -> gguf.GGUFWriter:
    """A writer with what every tiny model's header starts with, whatever its architecture."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    return writer


def write_tiny_model(
    path: str | Path,
    *,
    vocab: VocabName,
    seed: int,
    chat_template: str | None = None,
    edit: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a tiny ``llama`` model with random weights drawn from ``seed``.

    ``edit`` has the last word on the metadata: a key written again keeps its new
    value (gguf logs a warning), which is how crafted files get impossible values.
    """
    path = Path(path)
    voc = build_vocab(vocab)
    writer = _new_writer(path, "llama", f"tiny-{vocab}-seed{seed}")
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    _add_vocab(writer, voc, chat_template)
    if edit is not None:
        edit(writer)
    tensors = _llama_tensors(np.random.default_rng(seed), voc.n_vocab)
    return _write_gguf(path, writer, tensors)


def write_tiny_recurrent(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``mamba`` model (recurrent) with vocabulary ``"ab"``."""
    path = Path(path)
    voc = build_vocab("ab")
    writer = _new_writer(path, "mamba", f"tiny-mamba-seed{seed}")
    writer.add_ssm_conv_kernel(MAMBA_D_CONV)
    writer.add_ssm_inner_size(MAMBA_D_INNER)
    writer.add_ssm_state_size(MAMBA_D_STATE)
    writer.add_ssm_time_step_rank(MAMBA_DT_RANK)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    _add_vocab(writer, voc, None)
    tensors = _mamba_tensors(np.random.default_rng(seed), voc.n_vocab)
    return _write_gguf(path, writer, tensors)


def write_not_gguf(path: str | Path) -> Path:
    """Write a file that is not GGUF at all: some text, then random bytes."""
    path = Path(path)
    noise = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8)
    path.write_bytes(b"This is not a GGUF model.\n" + noise.tobytes())
    return path


def write_truncated(path: str | Path) -> Path:
    """Write a valid tiny model, then cut it in the middle of its tensor data."""
    path = write_tiny_model(path, vocab="ab", seed=0)
    data_offset = gguf.GGUFReader(path).data_offset
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(data_offset + (size - data_offset) // 2)
    return path


@dataclass(frozen=True)
class TinyModels:
    """Paths of the three tiny models (see the module docstring)."""

    tiny_a: Path
    tiny_b: Path
    tiny_c: Path


@dataclass(frozen=True)
class BrokenModels:
    """Paths of files that must fail to load, or be refused, as models."""

    not_gguf: Path
    truncated: Path
    recurrent: Path


def write_tiny_models(directory: str | Path) -> TinyModels:
    """Write tiny_a.gguf, tiny_b.gguf and tiny_c.gguf into ``directory``."""
    directory = Path(directory)
    return TinyModels(
        tiny_a=write_tiny_model(directory / "tiny_a.gguf", vocab="ab", seed=1, chat_template=CHATML_TEMPLATE),
        tiny_b=write_tiny_model(directory / "tiny_b.gguf", vocab="ab", seed=2),
        tiny_c=write_tiny_model(directory / "tiny_c.gguf", vocab="c", seed=3),
    )


def write_broken_models(directory: str | Path) -> BrokenModels:
    """Write not_gguf.gguf, truncated.gguf and recurrent.gguf into ``directory``."""
    directory = Path(directory)
    return BrokenModels(
        not_gguf=write_not_gguf(directory / "not_gguf.gguf"),
        truncated=write_truncated(directory / "truncated.gguf"),
        recurrent=write_tiny_recurrent(directory / "recurrent.gguf"),
    )


# --- crafted files: each wrong in one precise way ------------------------------------
# Offsets follow the GGUF layout: magic (4 bytes), version (u32), tensor count (u64),
# key count (u64), then each key as a string (u64 length + bytes), its type (u32) and
# its value; a string value is a u64 length + bytes, an array an item type (u32), a
# count (u64) and the items. Then each tensor: name, n_dims (u32), dims (u64 each),
# type (u32), data offset (u64).


def _key_offset(path: Path, key: str) -> int:
    """Where a metadata key (its u64 length) starts."""
    return gguf.GGUFReader(path).fields[key].offset


def _value_offset(path: Path, key: str) -> int:
    """Where a metadata value starts, after its key and type."""
    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + int(field.parts[0][0]) + 4


def _first_tensor_dims_offset(path: Path) -> int:
    field = gguf.GGUFReader(path).tensors[0].field
    return field.offset + 8 + int(field.parts[0][0]) + 4


def _overwritten(where: Callable[[Path], int], fmt: str, value: object) -> Callable[[Path], Path]:
    """A writer of a tiny model with `value` packed (little-endian `fmt`) at `where`."""

    def write(path: Path) -> Path:
        path = write_tiny_model(path, vocab="ab", seed=0, chat_template=CHATML_TEMPLATE)
        offset = where(path)
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(struct.pack("<" + fmt, value))
        return path

    return write


def _cut(where: Callable[[Path], int]) -> Callable[[Path], Path]:
    """A writer of a tiny model cut short at `where`."""

    def write(path: Path) -> Path:
        path = write_tiny_model(path, vocab="ab", seed=0, chat_template=CHATML_TEMPLATE)
        size = where(path)
        with path.open("r+b") as f:
            f.truncate(size)
        return path

    return write


def _edited(edit: Callable[[gguf.GGUFWriter], None]) -> Callable[[Path], Path]:
    """A writer of a well-formed tiny model whose metadata `edit` has changed."""
    return lambda path: write_tiny_model(path, vocab="ab", seed=0, edit=edit)


def _a_token_twice(writer: gguf.GGUFWriter) -> None:
    tokens = list(build_vocab("ab").tokens)
    writer.add_token_list(tokens[:-1] + [tokens[0]])


def _experts(count: int, used: int) -> Callable[[gguf.GGUFWriter], None]:
    def edit(writer: gguf.GGUFWriter) -> None:
        writer.add_expert_count(count)
        writer.add_expert_used_count(used)

    return edit


CRAFTED: dict[str, Callable[[Path], Path]] = {
    # The header.
    "bad magic": _overwritten(lambda p: 0, "4s", b"GGUX"),
    "version 999": _overwritten(lambda p: 4, "I", 999),
    "tensor count 2**60": _overwritten(lambda p: 8, "Q", 2**60),
    "tensor count beyond the file": _overwritten(lambda p: 8, "Q", 10**7),
    "key count 2**60": _overwritten(lambda p: 16, "Q", 2**60),
    "key count beyond the file": _overwritten(lambda p: 16, "Q", 10**7),
    # The metadata.
    "key length 2**60": _overwritten(lambda p: _key_offset(p, "general.name"), "Q", 2**60),
    "string length 2**60": _overwritten(lambda p: _value_offset(p, "general.name"), "Q", 2**60),
    "chat template length 2**60": _overwritten(lambda p: _value_offset(p, "tokenizer.chat_template"), "Q", 2**60),
    "string length beyond the file": _overwritten(lambda p: _value_offset(p, "general.name"), "Q", 10**9),
    "token count 2**60": _overwritten(lambda p: _value_offset(p, "tokenizer.ggml.tokens") + 4, "Q", 2**60),
    "token count beyond the file": _overwritten(lambda p: _value_offset(p, "tokenizer.ggml.tokens") + 4, "Q", 10**9),
    "token type count 2**60": _overwritten(lambda p: _value_offset(p, "tokenizer.ggml.token_type") + 4, "Q", 2**60),
    "unknown value type": _overwritten(lambda p: _value_offset(p, "general.name") - 4, "I", 77),
    "unknown array type": _overwritten(lambda p: _value_offset(p, "tokenizer.ggml.tokens"), "I", 77),
    "cut in the header": _cut(lambda p: 12),
    "cut in the metadata": _cut(lambda p: _value_offset(p, "tokenizer.ggml.tokens") + 100),
    # The tensors.
    "tensor dimension 2**60": _overwritten(_first_tensor_dims_offset, "Q", 2**60),
    "tensor data offset past the end": _overwritten(lambda p: _first_tensor_dims_offset(p) + 2 * 8 + 4, "Q", 2**40),
    "cut in the tensor data": _cut(lambda p: gguf.GGUFReader(p).data_offset + 1000),
    # Well-formed files whose values llama.cpp asserts on (aborting the process).
    "a million layers": _edited(lambda w: w.add_block_count(10**6)),
    "no layers": _edited(lambda w: w.add_block_count(0)),
    "a million experts": _edited(_experts(10**6, 2)),
    "more experts used than there are": _edited(_experts(4, 8)),
    "a token twice in the vocabulary": _edited(_a_token_twice),
}
"""Writers of crafted files, by what is wrong with them: ``CRAFTED[name](path)``."""


def write_tiny_preset(tiny_models: TinyModels, path: Path, **search) -> Path:
    """A preset file on the tiny models (plain prompts, 512-token contexts, one thread)."""
    plain = {"format": "plain"}
    preset = {
        "strong": {"model": str(tiny_models.tiny_c), "prompt": plain},
        "weak": {"model": str(tiny_models.tiny_a), "prompt": plain},
        "weak_ref": {"model": str(tiny_models.tiny_b), "prompt": plain},
        "search": {"children": 3, "seed": 1, **search},
        "runtime": {"n_ctx": 512, "n_threads": 1},
    }
    path.write_text(json.dumps(preset))
    return path
