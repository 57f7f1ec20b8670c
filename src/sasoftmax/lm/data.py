"""Corpora, tokenizers, token caches and a deterministic batch sampler for language-model training.

Sources (``DataConfig.source``):

- ``"stdlib"`` (default): the ``.py`` files of the running Python's standard library (found with
  ``sysconfig.get_paths()["stdlib"]``; ``site-packages`` and test directories excluded), in sorted order. Needs no
  download and exists wherever Python does.
- Local text: a file, a folder (all files below it, recursively, sorted) or a glob; several separated by ``,``.
- ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset (needs the optional ``datasets`` package and network
  access; a clear ``RuntimeError`` otherwise). Text is read from the ``text`` column (``DataConfig.hf_text_field``).

Documents longer than ``DataConfig.doc_chars`` characters are cut (at line boundaries) into pieces, so that one big
file (a book) still yields a document-level split. Each piece ``"<name>#<index>"`` goes to the validation split
when a hash of that id falls under ``val_fraction``; the split depends only on the ids, never on the order of
processing.

Tokenizers: ``"bytes"`` (raw UTF-8 bytes, vocab 256) or ``"bpe"`` (byte-level BPE trained with the ``tokenizers``
package on the training split only, vocab ``DataConfig.vocab_size``, with an ``<|endoftext|>`` document separator).

The token streams are cached as flat memory-mapped arrays (``uint16`` when the vocabulary has fewer than 65536
entries, else ``uint32``) under ``cache_dir/<hash of sources + settings>/``, built in a temporary directory and
renamed into place, so concurrent builders and interrupted builds never leave a half-written cache.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataConfig",
    "Document",
    "TokenData",
    "ByteTokenizer",
    "BPETokenizer",
    "BatchSampler",
    "stdlib_root",
    "iter_documents",
    "split_documents",
    "load_token_data",
    "load_tokenizer",
]

CACHE_VERSION = 1
EOT = "<|endoftext|>"


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens.

    Attributes:
        source: ``"stdlib"``, ``"hf:NAME[:CONFIG][:SPLIT]"``, or comma-separated files / folders / globs.
        tokenizer: ``"bytes"`` (vocab 256) or ``"bpe"`` (byte-level BPE trained on the training split).
        vocab_size: BPE vocabulary size (ignored for ``"bytes"``).
        val_fraction: fraction of documents (by hash of their id) held out for validation, in (0, 1).
        doc_chars: documents longer than this many characters are cut into pieces at line boundaries.
        max_chars: stop reading the source after this many characters (0 = no limit); applied in source order.
        cache_dir: root of the token caches.
        hf_text_field: column holding the text for ``hf:`` sources.
        pack_documents: training rows keep their documents apart: a token attends only to its own document
            (documents end at the BPE tokenizer's end-of-text token; :func:`document_ids`). Evaluation unchanged.
    """

    source: str = "stdlib"
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    doc_chars: int = 32768
    max_chars: int = 0
    cache_dir: str = "data_cache"
    hf_text_field: str = "text"
    pack_documents: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"data.source must be a non-empty string, got {self.source!r}")
        if self.tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"data.tokenizer must be 'bytes' or 'bpe', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and not (260 <= self.vocab_size <= 1 << 20):
            raise ValueError(f"data.vocab_size must be in [260, 2**20] for the BPE tokenizer, got {self.vocab_size}")
        if not (0.0 < self.val_fraction < 1.0):
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.doc_chars < 1:
            raise ValueError(f"data.doc_chars must be >= 1, got {self.doc_chars}")
        if self.max_chars < 0:
            raise ValueError(f"data.max_chars must be >= 0 (0 = no limit), got {self.max_chars}")
        if not isinstance(self.pack_documents, bool):
            raise ValueError(f"data.pack_documents must be true or false, got {self.pack_documents!r}")
        if self.pack_documents and self.tokenizer != "bpe":
            raise ValueError("data.pack_documents needs tokenizer = 'bpe' (its end-of-text token separates the "
                             "documents; the byte tokenizer has none)")


@dataclass(frozen=True)
class Document:
    """One document: a stable id (used for the split) and its text."""

    id: str
    text: str


# --------------------------------------------------------------------------------------------- sources


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"data.source='stdlib': the standard library directory {root} does not exist")
    return root


_STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_files() -> list[tuple[str, Path]]:
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _STDLIB_EXCLUDE for part in rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), path))
    out.sort()
    return out


def _local_files(spec: str) -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_file():
            files.append((path.as_posix(), path))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            files.extend((p.as_posix(), p) for p in found)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True))
            files.extend((p.as_posix(), p) for p in found if p.is_file())
        else:
            raise ValueError(f"data.source: {item!r} is not a file, a folder or a glob matching anything")
    return files


def _files_for(source: str) -> list[tuple[str, Path]] | None:
    """Files behind a source, or None for sources that are not file based (``hf:``)."""
    if source == "stdlib":
        return _stdlib_files()
    if source.startswith("hf:"):
        return None
    return _local_files(source)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _cut(text: str, limit: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` characters, at line boundaries where possible."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + limit, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _hf_texts(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    parts = cfg.source[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if not name:
        raise ValueError(f"data.source={cfg.source!r}: expected 'hf:NAME[:CONFIG][:SPLIT]'")
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise RuntimeError(
            f"data.source={cfg.source!r} needs the optional `datasets` package (pip install datasets)"
        ) from err
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network errors, missing datasets, ...
        raise RuntimeError(f"data.source={cfg.source!r}: could not load the dataset (offline?): {err}") from err
    if cfg.hf_text_field not in ds.column_names:
        raise ValueError(
            f"data.hf_text_field={cfg.hf_text_field!r} is not a column of {name!r} (columns: {ds.column_names})"
        )
    for i, row in enumerate(ds):
        yield f"{name}/{split}/{i}", str(row[cfg.hf_text_field])


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Yield the documents of ``cfg.source`` in a deterministic order, long ones cut into ``doc_chars`` pieces."""
    files = _files_for(cfg.source)
    texts: Iterator[tuple[str, str]]
    if files is None:
        texts = _hf_texts(cfg)
    else:
        texts = ((name, _read_text(path)) for name, path in files)
    budget = cfg.max_chars if cfg.max_chars > 0 else None
    for name, text in texts:
        if budget is not None:
            if budget <= 0:
                return
            text = text[:budget]
            budget -= len(text)
        if not text:
            continue
        for j, piece in enumerate(_cut(text, cfg.doc_chars)):
            yield Document(f"{name}#{j}", piece)


def _is_val(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split by hash of the document id: ``(train, val)``.

    When the hash puts every document on one side (tiny corpora) the last document (in the given order) is moved
    to validation / the first to training, so both splits are non-empty whenever there are two documents."""
    train = [d for d in docs if not _is_val(d.id, val_fraction)]
    val = [d for d in docs if _is_val(d.id, val_fraction)]
    if not val and len(train) >= 2:
        val = [train.pop()]
    if not train and len(val) >= 2:
        train = [val.pop(0)]
    return train, val


# --------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Raw UTF-8 bytes: vocab 256, no training, documents joined by a blank line."""

    kind = "bytes"
    vocab_size = 256

    def encode_documents(self, docs: Sequence[Document]) -> np.ndarray:
        """Token ids of the documents concatenated (``uint16``)."""
        data = b"\n\n".join(d.text.encode("utf-8") for d in docs)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "bytes"}))


class BPETokenizer:
    """Byte-level BPE (``tokenizers``), trained on the training documents, ``<|endoftext|>`` between documents."""

    kind = "bpe"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, docs: Sequence[Document], vocab_size: int) -> BPETokenizer:
        try:
            from tokenizers import ByteLevelBPETokenizer
        except ImportError as err:
            raise RuntimeError("data.tokenizer='bpe' needs the `tokenizers` package (pip install tokenizers)") from err
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            (d.text for d in docs), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False
        )
        return cls(bpe._tokenizer)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode_documents(self, docs: Sequence[Document], batch: int = 256) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size < 65536 else np.uint32
        parts: list[np.ndarray] = []
        for i in range(0, len(docs), batch):
            encs = self.tok.encode_batch([d.text for d in docs[i : i + batch]])
            for enc in encs:
                parts.append(np.asarray(enc.ids, dtype=dtype))
                parts.append(np.asarray([self.eot_id], dtype=dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.bpe.json"))
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "bpe", "file": "tokenizer.bpe.json"}))


def load_tokenizer(directory: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved in a token-cache directory."""
    directory = Path(directory)
    meta = json.loads((directory / "tokenizer.json").read_text())
    if meta["kind"] == "bytes":
        return ByteTokenizer()
    return BPETokenizer.load(directory / meta["file"])


# --------------------------------------------------------------------------------------------- token cache


@dataclass
class TokenData:
    """Tokenized train/validation streams (memory-mapped, read-only) and the cache directory holding them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    directory: Path
    meta: dict

    def split(self, name: str) -> np.ndarray:
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {name!r}")

    def tokenizer(self) -> ByteTokenizer | BPETokenizer:
        return load_tokenizer(self.directory)


def _cache_key(cfg: DataConfig) -> str:
    """Hash of the source (file names, sizes, mtimes) and every setting that changes the tokens."""
    h = hashlib.sha256()
    settings = dataclasses.asdict(cfg)
    settings.pop("cache_dir")
    settings.pop("pack_documents")  # (how rows are attended, not what the tokens are)
    if cfg.tokenizer == "bytes":
        settings.pop("vocab_size")
    h.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True).encode())
    files = _files_for(cfg.source)
    if files is not None:
        if not files:
            raise ValueError(f"data.source={cfg.source!r} is empty: no files found")
        for name, path in files:
            st = path.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _open(directory: Path, meta: dict) -> TokenData:
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        arrays.append(np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r", shape=(n,)))
    return TokenData(arrays[0], arrays[1], meta["vocab_size"], directory, meta)


def _build(cfg: DataConfig, tmp: Path) -> dict:
    docs = list(iter_documents(cfg))
    if not docs or not any(d.text.strip() for d in docs):
        raise ValueError(f"data.source={cfg.source!r} is empty: it holds no text")
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    if not train_docs or not val_docs:
        raise ValueError(
            f"data.source={cfg.source!r} has {len(docs)} document(s) of at most data.doc_chars={cfg.doc_chars} "
            "characters; need at least 2 for a train/validation split (lower data.doc_chars)"
        )
    tok: ByteTokenizer | BPETokenizer
    tok = ByteTokenizer() if cfg.tokenizer == "bytes" else BPETokenizer.train(train_docs, cfg.vocab_size)
    tok.save(tmp)
    meta = {"version": CACHE_VERSION, "config": dataclasses.asdict(cfg), "vocab_size": tok.vocab_size}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = tok.encode_documents(split_docs)
        meta["dtype"] = str(ids.dtype)
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_documents"] = len(split_docs)
        with open(tmp / f"{split}.bin", "wb") as f:
            f.write(ids.tobytes())
            f.flush()
            os.fsync(f.fileno())
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_token_data(cfg: DataConfig, *, rebuild: bool = False) -> TokenData:
    """Tokenize ``cfg.source`` once and return memory-mapped train/val streams.

    The cache lives in ``cfg.cache_dir/<key>`` where ``key`` hashes the source (names, sizes, mtimes) and the
    settings; a second call with the same inputs reuses it without reading the text. Raises ``ValueError`` naming
    the source when it has no text."""
    cfg.validate()
    root = Path(cfg.cache_dir)
    directory = root / _cache_key(cfg)
    meta_path = directory / "meta.json"
    if meta_path.exists() and not rebuild:
        return _open(directory, json.loads(meta_path.read_text()))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=root))
    try:
        meta = _build(cfg, tmp)
        if rebuild and directory.exists():
            shutil.rmtree(directory)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "meta.json").exists():  # not a concurrent builder finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _open(directory, meta)


# --------------------------------------------------------------------------------------------- sampling


class BatchSampler:
    """Random windows of a token stream, a pure function of ``(seed, step)``.

    At optimizer step ``step`` the global batch is ``batch_size * world_size * grad_accum`` windows of
    ``seq_len + 1`` tokens with offsets drawn from ``numpy.random.Generator(PCG64([seed, step]))``. Micro-step
    ``m`` of rank ``r`` takes windows ``[(m * world_size + r) * batch_size, ... + batch_size)``, so a run with K
    ranks and accumulation A sees the same global batch as one rank with accumulation K*A; resuming at ``step``
    needs no other state.

    Args:
        tokens: 1-D token stream (a memmap is fine).
        seq_len: model input length T; windows hold T+1 tokens (inputs and shifted targets).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or grad_accum < 1:
            raise ValueError(
                f"seq_len, batch_size and grad_accum must be >= 1, got {seq_len}, {batch_size}, {grad_accum}"
            )
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the token stream has {len(tokens)} tokens; seq_len={seq_len} needs at least {seq_len + 1}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    def offsets(self, step: int) -> np.ndarray:
        """All ``global_batch`` window offsets of optimizer step ``step``."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both ``(batch_size, seq_len)`` int64, for this rank's micro-step ``micro`` of ``step``."""
        if not (0 <= micro < self.grad_accum):
            raise ValueError(f"micro must be in [0, grad_accum={self.grad_accum}), got {micro}")
        start = (micro * self.world_size + self.rank) * self.batch_size
        offs = self.offsets(step)[start : start + self.batch_size]
        win = np.stack([np.asarray(self.tokens[o : o + self.seq_len + 1], dtype=np.int64) for o in offs])
        t = torch.from_numpy(win)
        return t[:, :-1], t[:, 1:]


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """The document index of each token of rows ``(B, T)`` cut from a stream of EOT-terminated documents: a new
    document starts after every end-of-text token (which belongs to the document it ends)."""
    ends = (tokens == eot_id).long()
    return ends.cumsum(dim=1) - ends


def eval_windows(tokens: np.ndarray, length: int, max_windows: int) -> np.ndarray:
    """Non-overlapping windows ``(n, length + 1)`` (int64) spread evenly over ``tokens``, ``n <= max_windows``.

    ``n = min(max_windows, (len(tokens) - 1) // length)`` and window ``i`` starts at ``i * ((len(tokens) - 1) // n)``
    (inputs plus the shifted target), so every length samples the whole split rather than only its first
    documents. Raises ``ValueError`` when the stream is shorter than one window."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    n = min(max_windows, (len(tokens) - 1) // length)
    if n < 1:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens; length {length} needs at least {length + 1}"
        )
    stride = (len(tokens) - 1) // n
    return np.stack([np.asarray(tokens[i * stride : i * stride + length + 1], dtype=np.int64) for i in range(n)])
