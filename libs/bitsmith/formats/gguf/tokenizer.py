"""The tokenizer of a source model as GGUF metadata (FORMATS.md §5.4), so llama.cpp tokenizes as HF does.

Two kinds, chosen by the files present (as llama.cpp's converter does):

* ``tokenizer.model`` → SentencePiece (``llama``): pieces, scores and piece types read with the
  `sentencepiece` package. llama.cpp merges pieces by score and normalizes nothing, which is what a
  SentencePiece BPE model with the identity normalizer does (Llama, Mistral); a unigram model or
  another normalizer would tokenize differently and is refused. Added tokens come from
  tokenizer_config.json's `added_tokens_decoder`, `add_space_prefix` from the model's normalizer
  (``add_dummy_prefix``); add_bos is on unless the tokenizer config turns it off (LlamaTokenizer's default).
* else ``tokenizer.json`` with a byte-level BPE model → ``gpt2``: tokens in id order (added tokens
  included: special ones CONTROL, others USER_DEFINED), merges as ``"left right"``, and `pre` — llama.cpp's
  name for the pre-tokenizer regex — recognised from the pre-tokenizer itself: GPT-2's ByteLevel regex
  → ``gpt-2``; a Split on Llama-3's or Qwen2's regex before a regex-free ByteLevel → ``llama-bpe`` /
  ``qwen2``. llama.cpp silently falls back to another regex for a `pre` it does not know, so anything
  else (another regex, a prefix space, a normalizer other than NFC, byte-fallback BPE without
  tokenizer.model, merges llama.cpp would split differently) is refused, naming what was found.

Ids missing from the vocabulary, and ids up to the config's `vocab_size`, become ``[PAD<id>]`` tokens of
type UNUSED, as the converter pads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats.base import read_json_object
from bitsmith.formats.gguf.constants import CHAT_TEMPLATE_FILE, SPM_MODEL, TOKENIZER_CONFIG, TOKENIZER_JSON

TokenType = gguf.TokenType

_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE = {
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL: "llama-bpe",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL: "qwen2",
}
"""Pre-tokenizer regexes of tokenizer.json files (Llama-3, Qwen2) → llama.cpp's `pre` running the same."""
IGNORE_MERGES = {"gpt-2": False, "qwen2": False, "llama-bpe": True}
"""Whether llama.cpp looks a whole word up before merging, per `pre`; the tokenizer.json must agree."""
BYTE_LEVEL = "gpt-2"
SPM_BPE = 2
"""SentencePiece's TrainerSpec.model_type of BPE, the one kind llama.cpp's `llama` tokenizer reproduces."""
SPM_NORMALIZER = "identity"
NORMALIZERS = (None, "NFC")
"""llama.cpp applies no normalizer; NFC changes no text that is already NFC (Qwen2 declares it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Vocab:
    """Everything `tokenizer.*` holds for one model."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: Mapping[str, int] = field(default_factory=dict)
    """``bos``/``eos``/``unk``/``pad`` → id (those the tokenizer has)."""
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for role, token_id in self.special_ids.items():
            adders[role](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_vocab(model_dir: Path, config: Mapping[str, Any]) -> Vocab:
    """The tokenizer of `model_dir` (see the module docstring); `vocab_size` comes from `config`."""
    tok_config = _tokenizer_config(model_dir)
    vocab_size = int(config["vocab_size"])
    if (model_dir / SPM_MODEL).is_file():
        return _sentencepiece(model_dir, tok_config, vocab_size)
    if (model_dir / TOKENIZER_JSON).is_file():
        return _byte_level_bpe(model_dir, tok_config, config, vocab_size)
    raise FormatError(f"GGUF: {model_dir} has neither {SPM_MODEL} nor {TOKENIZER_JSON}; the file needs a tokenizer")


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / TOKENIZER_CONFIG
    return read_json_object(path) if path.is_file() else {}


def _chat_template(model_dir: Path, tok_config: Mapping[str, Any]) -> str | None:
    """transformers keeps the template in chat_template.jinja (newer) or in tokenizer_config.json."""
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        return (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp's default is the one called "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(tok_config: Mapping[str, Any], ids: Mapping[str, int], fallback: Mapping[str, Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        text = _token_text(tok_config.get(f"{role}_token"))
        if text is not None:
            if text not in ids:
                raise FormatError(f"GGUF: {role}_token {text!r} of tokenizer_config.json is not in the vocabulary")
            found[role] = ids[text]
        elif isinstance(fallback.get(f"{role}_token_id"), int):
            found[role] = int(fallback[f"{role}_token_id"])
    return found


def _padded(vocab_size: int, entries: Mapping[int, tuple[str, int]], what: str) -> tuple[list[str], list[int]]:
    """Tokens and types by id, holes and the tail up to `vocab_size` filled with UNUSED ``[PAD<id>]``."""
    top = max(entries, default=-1) + 1
    if top > vocab_size:
        raise FormatError(f"GGUF: the {what} has ids up to {top - 1} but the config's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token_id, (text, kind) in entries.items():
        tokens[token_id], types[token_id] = text, kind
    return tokens, types


def _added(tok_config: Mapping[str, Any], tok_json: Mapping[str, Any]) -> dict[int, tuple[str, bool]]:
    """Added tokens by id → (text, special), from tokenizer.json and tokenizer_config.json."""
    added: dict[int, tuple[str, bool]] = {}
    for entry in tok_json.get("added_tokens") or []:
        added[int(entry["id"])] = (str(entry["content"]), bool(entry.get("special")))
    for token_id, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        added[int(token_id)] = (str(entry["content"]), bool(entry.get("special")))
    return added


def _added_type(special: bool) -> int:
    return int(TokenType.CONTROL if special else TokenType.USER_DEFINED)


def _byte_level_pre(tok_json: Mapping[str, Any]) -> str:
    """llama.cpp's `pre` for the tokenizer.json pre-tokenizer; `UnsupportedError` describing it otherwise."""
    normalizer = (tok_json.get("normalizer") or {}).get("type")
    if normalizer not in NORMALIZERS:
        raise UnsupportedError(f"GGUF: tokenizer normalizer {normalizer!r} has no llama.cpp equivalent")
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return BYTE_LEVEL
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space", False) and pattern in SPLIT_PRE):
            return SPLIT_PRE[pattern]
    raise UnsupportedError(f"GGUF: no llama.cpp pre-tokenizer is known to match {pre!r}")


def _merge(entry: Any) -> str:
    """One merge as llama.cpp reads it: ``"left right"``, split at the first space after position 0."""
    left, right = entry if isinstance(entry, list) else str(entry).split(" ", 1)
    if " " in left[1:]:
        raise UnsupportedError(f"GGUF: merge {entry!r} has a space llama.cpp would split at")
    return f"{left} {right}"


def _byte_level_bpe(
    model_dir: Path, tok_config: Mapping[str, Any], config: Mapping[str, Any], vocab_size: int
) -> Vocab:
    tok_json = read_json_object(model_dir / TOKENIZER_JSON)
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE" if model.get("byte_fallback") else repr(model.get("type"))
        raise UnsupportedError(f"GGUF: a {kind} tokenizer.json is only supported with its {SPM_MODEL}")
    pre = _byte_level_pre(tok_json)
    if bool(model.get("ignore_merges", False)) != IGNORE_MERGES[pre]:
        raise UnsupportedError(f"GGUF: pre-tokenizer {pre!r} needs ignore_merges={IGNORE_MERGES[pre]}")
    entries = {int(i): (text, int(TokenType.NORMAL)) for text, i in (model.get("vocab") or {}).items()}
    if len(entries) != len(model.get("vocab") or {}):
        raise FormatError(f"GGUF: {model_dir / TOKENIZER_JSON} maps several tokens to one id")
    added = _added(tok_config, tok_json)
    entries.update({i: (text, _added_type(special)) for i, (text, special) in added.items()})
    tokens, types = _padded(vocab_size, entries, TOKENIZER_JSON)
    ids = {text: i for i, (text, _) in sorted(entries.items(), reverse=True)}
    add_bos, add_eos = _template_adds(tok_json)
    return Vocab(
        model="gpt2", pre=pre, tokens=tokens, token_types=types,
        merges=[_merge(m) for m in model.get("merges") or []],
        special_ids=_special_ids(tok_config, ids, config),
        add_bos=bool(tok_config.get("add_bos_token", add_bos)),
        add_eos=bool(tok_config.get("add_eos_token", add_eos)),
        chat_template=_chat_template(model_dir, tok_config),
    )


def _template_adds(tok_json: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether the post-processor's single-sequence template starts / ends with a special token."""
    post = tok_json.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            single = step["single"]
            return "SpecialToken" in single[0], "SpecialToken" in single[-1]
    return False, False


def _sentencepiece(model_dir: Path, tok_config: Mapping[str, Any], vocab_size: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_model

    path = model_dir / SPM_MODEL
    processor = SentencePieceProcessor()
    proto = spm_model.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code, no stubs
    try:
        processor.LoadFromFile(str(path))
        proto.ParseFromString(path.read_bytes())
    except (OSError, RuntimeError) as e:
        raise FormatError(f"GGUF: {path} is not a SentencePiece model: {e}") from e
    if proto.trainer_spec.model_type != SPM_BPE:
        raise UnsupportedError(f"GGUF: {path} is a SentencePiece model of type {proto.trainer_spec.model_type}; "
                               f"llama.cpp reproduces BPE models ({SPM_BPE}) only")
    normalizer = proto.normalizer_spec
    if normalizer.name != SPM_NORMALIZER or normalizer.remove_extra_whitespaces:
        raise UnsupportedError(f"GGUF: {path} normalizes text ({normalizer.name!r}, remove_extra_whitespaces="
                               f"{normalizer.remove_extra_whitespaces}); llama.cpp does not")
    entries: dict[int, tuple[str, int]] = {}
    scores = [-10000.0] * vocab_size
    for i in range(processor.vocab_size()):
        kind = (TokenType.UNKNOWN if processor.IsUnknown(i) else TokenType.CONTROL if processor.IsControl(i)
                else TokenType.UNUSED if processor.IsUnused(i) else TokenType.BYTE if processor.IsByte(i)
                else TokenType.NORMAL)
        entries[i] = (processor.IdToPiece(i), int(kind))
        if i < vocab_size:
            scores[i] = processor.GetScore(i)
    for i, (text, special) in _added(tok_config, {}).items():
        entries[i] = (text, _added_type(special))
    tokens, types = _padded(vocab_size, entries, SPM_MODEL)
    ids = {text: i for i, (text, _) in sorted(entries.items(), reverse=True)}
    own = {"bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id(), "pad": processor.pad_id()}
    fallback = {f"{role}_token_id": i for role, i in own.items() if i >= 0}
    return Vocab(
        model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
        special_ids=_special_ids(tok_config, ids, fallback),
        add_bos=bool(tok_config.get("add_bos_token", True)),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        chat_template=_chat_template(model_dir, tok_config),
    )
