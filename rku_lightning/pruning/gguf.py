"""GGUF export for llama.cpp, per-layer shapes included.

A model whose layers all keep the same counts is written under its family's own llama.cpp
architecture (`llama`, `qwen2`). llama.cpp's `llama` and `qwen2` graphs size every layer from
layer 0, so a model with per-layer widths is written under llama.cpp's `deci` architecture
instead: it reads `feed_forward_length`, `attention.head_count` and `attention.head_count_kv` as
per-layer arrays and applies optional q/k/v biases (Qwen2's). Hugging Face checkpoints rotate the
two halves of each head (the NEOX layout); llama.cpp's `llama` and `deci` rotate adjacent pairs
(NORM), so their Q/K rows (and biases) are permuted, head by head. The head size is written
explicitly: after pruning it is no longer hidden_size / heads.

The tokenizer (byte-level BPE: tokens, merges, special ids, chat template) is carried into the
file so that `llama-cli -m model.gguf` needs nothing else. Weights go out as f32, f16 or bf16
(1-D tensors stay f32, as llama.cpp's own converter does); quantisation is llama.cpp's job
(`llama-quantize`). The file is written beside the target and renamed: never half a GGUF.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rku_lightning.files import write_file_atomic

from .families import ModelFamily, get_family, unwrap_model

#: Weight types: the name used on the command line -> (tensor type, file type).
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
#: llama.cpp's architecture for per-layer widths.
PER_LAYER_ARCH = "deci"
#: How each llama.cpp architecture used here applies RoPE (llama.cpp `llama_model_rope_type`).
LLAMA_CPP_ROPE: dict[str, str] = {"llama": "norm", "deci": "norm", "qwen2": "neox"}
#: Hugging Face pre-tokenizers (tokenizer.json `pre_tokenizer`, offsets settings dropped) -> llama.cpp's name.
#: The ids they produce are what llama.cpp's regexes of the same name reproduce (llama-vocab.cpp).
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTE_LEVEL_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


KNOWN_PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _GPT2_BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _BYTE_LEVEL_ONLY]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _BYTE_LEVEL_ONLY]},
}


def _canonical(node: object) -> object:
    """A pre-tokenizer without the settings that change offsets only, not ids."""
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer: GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    # Qwen2's NFC normalizer is the one llama.cpp's own converter drops: it changes only text that is not NFC already.
    if spec["model"]["type"] != "BPE" or spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise ValueError(
            f"tokenizer: GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3) without a "
            f"normalizer other than NFC; this one has model.type {spec['model']['type']!r} and normalizer "
            f"{spec.get('normalizer')!r}"
        )
    return spec


def llama_cpp_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a tokenizer.json's pre-tokenizer; ValueError if it has none."""
    wanted = _canonical(spec.get("pre_tokenizer"))
    for name, known in KNOWN_PRE_TOKENIZERS.items():
        if wanted == known:
            return name
    raise ValueError(
        f"tokenizer: tokenizer.json pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} matches none of the "
        f"pre-tokenizers this export maps to llama.cpp ({', '.join(KNOWN_PRE_TOKENIZERS)}); llama.cpp would split text "
        "differently from transformers"
    )


def _adds(tokenizer: PreTrainedTokenizerBase, token_id: int | None, position: int) -> bool:
    """Whether encoding puts this special token at `position` (0: BOS, -1: EOS): llama.cpp must add it too."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and ids[position] == token_id


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Tokens, merges, special ids and chat template, as llama.cpp's `gpt2` (byte-level BPE) vocabulary."""
    spec = _tokenizer_json(tokenizer)
    pre = llama_cpp_pre_tokenizer(spec)
    count = len(tokenizer)
    if count > vocab_size:
        raise ValueError(f"tokenizer: {count} tokens but the model's vocab_size is {vocab_size}; they must belong together")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens = tokenizer.convert_ids_to_tokens(list(range(count)))
    types = [
        (gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added else gguf.TokenType.NORMAL
        for i in range(count)
    ]
    # Rows of the embedding past the tokenizer (Qwen2 pads its vocabulary): llama.cpp needs one token per row.
    tokens += [f"[PAD{i}]" for i in range(count, vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - count)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if not merges:
        raise ValueError("tokenizer: tokenizer.json has no BPE merges; llama.cpp's BPE vocabulary needs them")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, 0))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, -1))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _rope_theta(config) -> float:
    parameters = config.rope_parameters or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config: rope_parameters.rope_type {rope_type!r} is not written to GGUF by this export; only plain RoPE is")
    return float(parameters["rope_theta"])


def _permute_rotary_rows(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from halves (x_0..x_{d/2-1}, y_0..) to pairs (x_0, y_0, x_1, ...)."""
    return tensor.reshape(-1, 2, head_dim // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _layer_counts(family: ModelFamily) -> list[tuple[int, int, int]]:
    return [(v.num_channels, v.num_heads, v.num_groups) for v in family.views()]


def gguf_arch(family: ModelFamily) -> str:
    """The llama.cpp architecture this model is written under: the family's own, or `deci` for per-layer widths."""
    if family.gguf_arch is None:
        raise ValueError(f"{type(family.model).__name__}: this family has no llama.cpp architecture to export to")
    return family.gguf_arch if len(set(_layer_counts(family))) == 1 else PER_LAYER_ARCH


def _add_hparams(writer: gguf.GGUFWriter, family: ModelFamily, arch: str, file_type: gguf.LlamaFileType) -> None:
    config = family.config
    if getattr(config, "use_sliding_window", False):
        raise ValueError("config: use_sliding_window=True is not exported to GGUF; llama.cpp would attend to the full context")
    counts = _layer_counts(family)
    per_layer = arch == PER_LAYER_ARCH
    ffn, heads, groups = ([c[i] for c in counts] for i in range(3))
    head_dim = family.layer_view(0).head_dim
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(counts))
    writer.add_feed_forward_length(ffn if per_layer else ffn[0])
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(groups if per_layer else groups[0])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _add_tensors(writer: gguf.GGUFWriter, family: ModelFamily, arch: str, tensor_type: gguf.GGMLQuantizationType) -> None:
    model = family.model
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(family.decoder_layers()))
    permute = LLAMA_CPP_ROPE[arch] != family.rope_layout
    rotary = {id(m) for v in family.views() for m in (v.q, v.kv_rows[0])} if permute else set()
    rotary_names = {f"{name}.{kind}" for name, m in model.named_modules() if id(m) in rotary for kind in ("weight", "bias")}
    head_dim = family.layer_view(0).head_dim
    output = model.get_output_embeddings()
    # Tied embeddings: no output.weight, and llama.cpp reuses token_embd for the LM head.
    skipped = {f"{n}.weight" for n, m in model.named_modules() if m is output} if model.config.tie_word_embeddings else set()
    for name, tensor in model.state_dict().items():
        if name in skipped:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"{name}: no llama.cpp tensor name for it under architecture {arch!r}")
        data = tensor.detach().to(torch.float32).cpu()
        if name in rotary_names:
            data = _permute_rotary_rows(data, head_dim)
        array = data.numpy()
        if array.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, array)
        elif tensor_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, array.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)


def save_gguf(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike,
    dtype: str = "f16",
    overwrite: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Write `model` (pruned or dense, Llama or Qwen2 family) and its tokenizer to one GGUF file for llama.cpp.

    `metadata` (e.g. the pruning plan) is kept in the file as the JSON string `rku_lightning.pruning`.
    """
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(f"path: a GGUF export is one file whose name ends in .gguf, got {path}")
    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {sorted(GGUF_TYPES)} (quantise with llama.cpp's llama-quantize), got {dtype!r}")
    if path.is_dir() or (path.exists() and not overwrite):
        raise FileExistsError(f"{path} already exists; choose a new file name or pass overwrite=True")
    if tokenizer is None:
        raise ValueError("tokenizer: a GGUF file carries its tokenizer for llama.cpp; pass the model's tokenizer")
    model: PreTrainedModel = unwrap_model(model)
    if getattr(model, "rku_gates", None) is not None:
        raise ValueError("save_gguf: the model still holds masks; call compact(model) before exporting")
    family = get_family(model)
    arch = gguf_arch(family)
    tensor_type, file_type = GGUF_TYPES[dtype]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(getattr(model.config, "name_or_path", None) or type(model).__name__)
        _add_hparams(writer, family, arch, file_type)
        add_tokenizer(writer, tokenizer, model.config.vocab_size)
        if metadata:
            writer.add_string("rku_lightning.pruning", json.dumps(metadata))
        _add_tensors(writer, family, arch, tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomic(path, write, suffix=".part")
    return path
