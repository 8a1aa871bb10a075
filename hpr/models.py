"""Model loading: the only module that knows how TransformerLens builds a model.

Everything else in hpr talks to a ``HookedTransformer`` through hook names
(:func:`resid_post_hook`, :func:`head_z_hook`) and the objects built here (:func:`load_checkpoint` for
checkpoints, :func:`new_hooked_transformer` for the toy world's model), so moving to TL 4's TransformerBridge
should touch this file only.

Weights are loaded *without* TL's processing (no LayerNorm folding, no centering of
writing weights or unembed, no value-bias folding), so activation norms are the
model's own.

TransformerLens 3.9 + transformers 5 traps, and how they are avoided:

* ``HookedTransformer.from_pretrained`` first maps the name through TL's list of
  official models and rejects local paths and unlisted hub ids. We never call it:
  this module does what its body does (config -> state dict -> ``HookedTransformer``
  -> ``load_and_process_state_dict``) with the HF config, tokenizer and model
  loaded by ``transformers`` ourselves (``local_files_only=True`` for directories).
  That also avoids its stdout ``print``.
* TL's ``convert_hf_model_config`` picks some architectures from *substrings of the
  name* ("llama", "gemma"): a directory called ``.../my-llama`` takes a branch that
  never reads the config and crashes. It can only read a config from a path, so we
  write the already-loaded config to a neutrally named temporary directory and
  convert that.
* TL's GPT-2 branch reads ``hf_config.n_ctx``, which transformers 5's ``GPT2Config``
  no longer has (it is ``n_positions``); it also ignores ``n_inner``. We add
  ``n_ctx`` to the temporary config and fix ``d_mlp`` afterwards. This breaks TL's
  own hub route for ``"gpt2"`` too, so hub ids take the same route as directories.
* TL 3.9 knows Gemma 2 only as the fixed configs of Google's released sizes, chosen by hub name
  (``google/gemma-2-2b`` ...); for any other name its table raises "not currently supported". We
  build the same HookedTransformerConfig from the checkpoint's HF config (:func:`_gemma2_cfg_dict`):
  attention scaled by ``query_pre_attn_scalar`` (not ``head_dim``), soft-capping, sliding/global
  layers from ``layer_types``. TL's weight conversion for it is used as is (it scales the embedding by
  sqrt(d_model), adds Gemma's 1 to the RMSNorm weights and reads the unembedding through ``lm_head``,
  which is the embedding for tied checkpoints).
* TL's GPT-NeoX branch ignores the rotary base (``rope_theta``, in ``rope_parameters`` in
  transformers 5) and keeps TL's default 10000; we set it from the config. TL's Mistral branch caps
  ``n_ctx`` at 2048 (TL allocates ``n_ctx``-sized masks and rotary tables per layer); left as is.
* TL ignores sliding-window attention where HF applies it (e.g. Qwen2 with ``use_sliding_window``).
  Rather than return a model whose attention differs beyond the window, we compare the per-layer
  windows of both configs and refuse a mismatch (:func:`_check_attention_windows`).
* Model types outside :data:`SUPPORTED_MODEL_TYPES` are refused before anything is converted: TL may
  well convert more, but nothing here checks that their activations are the HF model's.
* ``HF_HUB_OFFLINE`` is read by huggingface_hub once, at import; we re-read it per
  call so that setting it later (tests, notebooks) still prevents network access.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

log = logging.getLogger(__name__)

# model_type values whose TL conversion is tested against HF (tests/test_models.py); load_model
# refuses every other one with a ValueError naming these.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3_text", "gpt_neox")

# model_type values that lm-evaluation-harness scores with a BOS token (its HFLM turns add_bos_token on for
# every model type containing "gemma"); every other model is scored without one, as lm-eval does.
BOS_MODEL_TYPES = ("gemma2", "gemma3_text")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Substrings that send TL's convert_hf_model_config down a name-based branch.
_TL_NAME_MARKERS = ("llama", "gemma")


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Any of these in a checkpoint folder means a tokenizer was saved with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine (None: :func:`default_device`), or a
    ``ValueError`` saying what to use instead."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return resolved
    raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")


_IDENTITY_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "n_key_value_heads",
    "original_architecture",
)


FINGERPRINT_PREFIX = "sha256:"  # a full-weights fingerprint; older records hold a bare sampled one
_FINGERPRINT_CHUNK = 2**22  # values hashed at a time: bounds the float32 copy of a large tensor to 16 MB
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights' state, fingerprint)


def _architecture(model) -> bytes:
    return json.dumps({k: str(getattr(model.cfg, k, None)) for k in _IDENTITY_FIELDS}).encode()


def _weights_state(model) -> tuple:
    """Changes whenever a parameter is replaced or written in place through torch (its version counter); a
    write through ``param.data`` escapes torch's count, and so this cache."""
    return tuple((name, p.data_ptr(), p._version, p.dtype, p.device) for name, p in model.named_parameters())


@torch.no_grad()
def model_fingerprint(model) -> str:
    """``sha256:`` + the sha256 of the architecture and of every value of every parameter (as float32, so
    the same for the same weights on any device, and in any dtype that holds them exactly): any change to
    any weight changes it. About a second per GB of float32 weights on one CPU core, so it is computed once
    per model and state of its weights (cached on the model object), not per ``editor.applied()``."""
    state = _weights_state(model)
    cached = _fingerprints.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    digest = hashlib.sha256(_architecture(model))
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        flat = param.detach().reshape(-1)
        for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
            chunk = flat[start : start + _FINGERPRINT_CHUNK].to("cpu", torch.float32)
            digest.update(chunk.numpy().tobytes())
    fingerprint = FINGERPRINT_PREFIX + digest.hexdigest()
    _fingerprints[model] = (state, fingerprint)
    return fingerprint


@torch.no_grad()
def check_finite_weights(model, source: str) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such parameter: every score and every
    fitted editor would otherwise come out NaN, and the failure would surface far from its cause."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(
                f"{source}: the model's weights hold {bad:,} NaN or infinite value(s) in {name}; the checkpoint "
                "is damaged: restore it, or convert or download it again"
            )


@contextlib.contextmanager
def weights_put_back(model):
    """For a block that puts back every weight it changes, bit for bit (representation tuning's swap): a
    fingerprint cached before it stays valid after it ends cleanly, instead of being recomputed at the next
    editor check. After an error the cache is left stale, so the next check recomputes it."""
    cached = _fingerprints.get(model)
    valid = cached is not None and cached[0] == _weights_state(model)
    yield
    if valid:
        _fingerprints[model] = (_weights_state(model), cached[1])


@torch.no_grad()
def sampled_model_fingerprint(model, per_tensor: int = 64) -> str:
    """The fingerprint run folders and editors recorded before full hashing: sha256 of the architecture and
    of ``per_tensor`` evenly strided values of every parameter. It misses a change between the samples, so it
    is only read, to compare with such an old record."""
    digest = hashlib.sha256(_architecture(model))
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def fingerprint_like(recorded: str, model) -> str:
    """``model``'s fingerprint in the form of ``recorded`` (full, or an old record's sampled one), to compare."""
    if recorded.startswith(FINGERPRINT_PREFIX):
        return model_fingerprint(model)
    return sampled_model_fingerprint(model)


def short_fingerprint(fingerprint: str) -> str:
    """The first 16 hex digits, for messages."""
    return fingerprint.removeprefix(FINGERPRINT_PREFIX)[:16]


def resid_post_hook(layer: int) -> str:
    """Hook name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def head_z_hook(layer: int) -> str:
    """Hook name of the per-head attention outputs (before W_O) of block ``layer``."""
    return f"blocks.{layer}.attn.hook_z"


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` -> float32; accepts torch dtypes and names like "bfloat16" or "torch.float16"."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def model_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """:func:`_resolve_dtype`, refusing float16 on a CPU.

    CPU float16 kernels are slow or missing for some ops, and float16's range (max 65504) is easily
    exceeded by the residual streams of unnormalised models; bfloat16 takes the same memory and has
    float32's range and proper CPU kernels. Callers that can fail early (``hpr reproduce``) call this
    before doing any work.
    """
    resolved = _resolve_dtype(dtype)
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("dtype float16 needs a GPU; on a CPU use bfloat16 (same memory) or float32")
    return resolved


def load_checkpoint(
    name_or_path: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> HookedTransformer:
    """Load a Hugging Face checkpoint as an (unprocessed) ``HookedTransformer``.

    ``name_or_path`` is a local checkpoint directory (config.json + weights + tokenizer; loaded fully
    offline) or a hub id (needs network or the hub cache). Names ("toy", "smollm2") and GGUF files are
    :func:`hpr.sources.load_model`'s.
    """
    device = check_device(device)
    dtype = model_dtype(dtype, device)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json in it)")
        return _load_hf(str(path.resolve()), device, dtype, local_files_only=True, hub=False)

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(
            f"Model {name_or_path!r}: no such directory, and not a valid Hugging Face hub id"
        ) from None
    return _load_hf(name_or_path, device, dtype, local_files_only=_hub_offline(), hub=True)


def _hub_offline() -> bool:
    """Offline mode as huggingface_hub defines it, but read now rather than at its import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _fetching(src: str, hub: bool, offline: bool):
    """Turn a hub download failure into an error that names the offline alternative, and an unreadable local
    checkpoint (truncated or garbage weights, a broken tokenizer) into one that names the folder."""
    if not hub:
        try:
            yield
        except Exception as e:  # noqa: BLE001 - safetensors, tokenizers and torch each raise their own types
            raise ValueError(
                f"{src}: the checkpoint cannot be read ({' '.join(str(e).split())[:300]}); "
                "save it again (save_pretrained) or point at another folder"
            ) from e
        return
    try:
        yield
    except OSError as e:
        why = (
            " (offline mode is on and it is not in the local hub cache)"
            if offline
            else " (with no network, HF_HUB_OFFLINE=1 skips ~30 s of retries)"
        )
        raise OSError(
            f"Could not fetch {src!r} from the Hugging Face Hub{why}, and no local directory "
            f"of that name exists. Without network access, download the checkpoint elsewhere "
            f"(e.g. `hf download {src} --local-dir DIR`), copy DIR here and pass its path "
            f"instead. Cause: {e}"
        ) from e


def _check_supported(model_type: str) -> None:
    """Refuse model types whose conversion nothing here has compared with HF."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported: hpr loads only architectures whose "
            f"TransformerLens conversion it checks against Hugging Face, which are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )


@contextlib.contextmanager
def _converting(model_type: str):
    """Turn TL's assorted conversion failures into one ValueError."""
    try:
        yield
    except (NotImplementedError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"TransformerLens could not convert model_type {model_type!r}: {e}. "
            f"Supported (tested) architectures: {', '.join(SUPPORTED_MODEL_TYPES)}."
        ) from e


def _check_vocabulary(src: str, tokenizer, d_vocab: int) -> None:
    """Refuse a tokenizer whose vocabulary or special tokens (BOS, EOS, padding) have ids past the embedding:
    they would fail mid-run with an IndexError. Tokens added beyond the vocabulary that the model never sees
    (transformers adds ``<|endoftext|>`` to some converted GGUF tokenizers) are let through."""
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    top = max([tokenizer.vocab_size - 1] + [i for i in specials if i is not None])
    if top >= d_vocab:
        raise ValueError(
            f"{src}: the tokenizer has token ids up to {top:,} but the model's embedding only {d_vocab:,} rows; "
            "save the checkpoint with the tokenizer it was trained with"
        )


def _load_hf(
    src: str, device: torch.device, dtype: torch.dtype, local_files_only: bool, hub: bool
) -> HookedTransformer:
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig

    with _fetching(src, hub, offline=local_files_only):
        hf_config = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
    model_type = getattr(hf_config, "model_type", "?")
    _check_supported(model_type)

    with tempfile.TemporaryDirectory(prefix="hpr_tl_") as tl_dir:
        if any(m in tl_dir.lower() for m in _TL_NAME_MARKERS):
            raise RuntimeError(f"Temporary directory {tl_dir} would mislead TL; set TMPDIR")
        # Convert the config before loading weights, so unsupported models fail fast.
        with _converting(model_type):
            cfg = _hooked_config(loading, hf_config, tl_dir, src, device, dtype)
        _check_attention_windows(hf_config, cfg)
        if not hub and not any((Path(src) / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{src} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer "
                "beside the weights (tokenizer.save_pretrained(folder))"
            )
        tokenizer, hf_model = _hf_tokenizer_and_model(src, hf_config, dtype, local_files_only, hub)
        _check_vocabulary(src, tokenizer, cfg.d_vocab)
        # tl_dir stands in for the checkpoint: TL only needs an existing path here
        # (a hub id outside its list would be rejected); the weights come from hf_model.
        with _converting(model_type):
            state_dict = loading.get_pretrained_state_dict(tl_dir, cfg, hf_model, dtype=dtype)
    del hf_model

    with warnings.catch_warnings():
        # TL 3.9 deprecates HookedTransformer in favour of TransformerBridge; that move
        # is planned and will happen in this module. Don't warn users on every load.
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    # A string, not the torch.device: TL then records "cuda:1" rather than "cuda" in
    # cfg.device, which is where it later puts tokens.
    model.to(str(device), print_details=False)
    model.eval()
    # Inference only: no parameter records a graph unless a training step asks for it (LoRA, reptune do).
    model.requires_grad_(False)
    use_matmul_layout(model)
    # MC scoring follows lm-evaluation-harness, which adds no BOS token except for the Gemma family, which it
    # gives one because Gemma underperforms without it (hpr.encoding reads this flag).
    model.cfg.default_prepend_bos = model_type in BOS_MODEL_TYPES
    log.info("Loaded %s (%s) as HookedTransformer on %s, %s", src, model_type, device, dtype)
    return model


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_loading_info(src: str, hub: bool, info: dict) -> None:
    """Refuse a checkpoint whose weights file lacks tensors the model needs (transformers would initialise
    them at random) or holds tensors it does not know, naming the first few, how many, and the file.

    ``info`` is transformers' ``output_loading_info``: tied weights (an ``lm_head`` that is the embedding) and
    the keys an architecture declares ignorable are not in it."""
    problems = []
    for key, what in (
        ("missing_keys", "lacks {n} tensor(s) the model needs"),
        ("unexpected_keys", "holds {n} tensor(s) the model does not know"),
        ("mismatched_keys", "holds {n} tensor(s) of the wrong shape"),
    ):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            problems.append(f"{what.format(n=len(names))} ({shown})")
    if not problems:
        return
    files = [] if hub else [name for name in _WEIGHT_FILES if (Path(src) / name).is_file()]
    where = str(Path(src) / files[0]) if files else src
    raise ValueError(
        f"{where}: the checkpoint {' and '.join(problems)}, which would load as random weights or be dropped; "
        "save the checkpoint again (save_pretrained) or point at another folder"
    )


def _hf_tokenizer_and_model(src: str, hf_config, dtype: torch.dtype, local_files_only: bool, hub: bool):
    """The checkpoint's tokenizer and (frozen) HF model, refused if its weights file does not match the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _fetching(src, hub, offline=local_files_only):
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)
        loaded: Any = AutoModelForCausalLM.from_pretrained(  # (model, loading info) with output_loading_info
            src, config=hf_config, dtype=dtype, local_files_only=local_files_only, output_loading_info=True
        )
    hf_model, loading_info = loaded
    check_loading_info(src, hub, loading_info)
    hf_model.requires_grad_(False)
    return tokenizer, hf_model


def _hooked_config(
    loading, hf_config, tl_dir: str, src: str, device: torch.device, dtype: torch.dtype
) -> HookedTransformerConfig:
    """HookedTransformerConfig from an HF config, via TL's own conversion table where it has one."""
    from transformer_lens import HookedTransformerConfig

    if hf_config.model_type == "gemma2":
        cfg_dict = _gemma2_cfg_dict(hf_config)
    elif hf_config.model_type == "gemma3_text":
        cfg_dict = _gemma3_cfg_dict(hf_config)
    else:
        cfg_dict = _tl_cfg_dict(loading, hf_config, tl_dir)
    # What TL's get_pretrained_model_config adds on top (no LN folding, so the norm
    # type stays "LN"/"RMS"), with the real name instead of the temporary directory's.
    cfg_dict.update(
        model_name=src.rstrip("/").split("/")[-1],
        tokenizer_name=src,
        d_vocab=hf_config.vocab_size,
        init_weights=False,
        from_checkpoint=False,
        device=str(device),
        n_devices=1,
        dtype=dtype,
    )
    cfg_dict.setdefault("default_prepend_bos", True)
    return HookedTransformerConfig.from_dict(cfg_dict)


def _tl_cfg_dict(loading, hf_config, tl_dir: str) -> dict:
    """TL's ``convert_hf_model_config`` of ``hf_config`` (written to ``tl_dir``), with its gaps filled."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = hf_config.model_type
    tl_hf_config = copy.deepcopy(hf_config)
    if not tl_hf_config.architectures:  # TL dispatches on architectures[0]; bare configs lack it
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        tl_hf_config.architectures = [arch] if arch else None
    if model_type == "gpt2" and not hasattr(hf_config, "n_ctx"):
        tl_hf_config.n_ctx = hf_config.n_positions  # TL reads n_ctx (gone in transformers 5)
    tl_hf_config.save_pretrained(tl_dir)

    cfg_dict = loading.convert_hf_model_config(tl_dir, local_files_only=True)
    if model_type == "gpt2" and getattr(hf_config, "n_inner", None):
        cfg_dict["d_mlp"] = hf_config.n_inner  # TL assumes 4 * d_model
    if model_type == "gpt_neox":
        cfg_dict["rotary_base"] = _rope_theta(hf_config)  # TL keeps its default 10000
    return cfg_dict


def _rope_theta(hf_config) -> float:
    """The rotary base: in ``rope_parameters`` since transformers 5, a top-level attribute before."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))


# HF's layer_types entries -> TL's attn_types entries.
_TL_ATTN_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def _gemma2_cfg_dict(hf_config) -> dict:
    """Gemma 2's HookedTransformerConfig fields, read from its HF config.

    TL 3.9 has only fixed dicts for the released sizes, picked by hub name; these are the same
    fields, plus the ``original_architecture`` that TL's weight conversion dispatches on.
    """
    from transformer_lens.config.hooked_transformer_config import SOFTCAP_DISABLED

    layer_types = list(hf_config.layer_types)
    use_local_attn = hf_config.sliding_window is not None and "sliding_attention" in layer_types
    return {
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.head_dim,  # not necessarily hidden_size / num_attention_heads
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_activation,
        "initializer_range": hf_config.initializer_range,
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "use_normalization_before_and_after": True,  # pre/post attention and feedforward norms
        "positional_embedding_type": "rotary",
        "rotary_base": _rope_theta(hf_config),
        "use_attn_scale": True,
        # HF scales attention scores by query_pre_attn_scalar ** -0.5; TL divides them by attn_scale.
        "attn_scale": hf_config.query_pre_attn_scalar**0.5,
        "use_local_attn": use_local_attn,
        "window_size": hf_config.sliding_window if use_local_attn else None,
        "attn_types": [_TL_ATTN_TYPES[t] for t in layer_types] if use_local_attn else None,
        "attn_scores_soft_cap": hf_config.attn_logit_softcapping or SOFTCAP_DISABLED,
        "output_logits_soft_cap": hf_config.final_logit_softcapping or SOFTCAP_DISABLED,
        "original_architecture": "Gemma2ForCausalLM",
    }


def _gemma3_cfg_dict(hf_config) -> dict:
    """Gemma 3 (text-only: 270M, 1B)'s HookedTransformerConfig fields, read from its HF config.

    As Gemma 2 (TL 3.9 again has only fixed dicts picked by hub name), plus what Gemma 3 changed: RMS norms
    on queries and keys, one rotary base for the global layers and another for the sliding (local) ones
    (``rope_parameters`` per layer type), and no soft-capping.
    """
    cfg_dict = _gemma2_cfg_dict(hf_config)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    cfg_dict.update(
        use_qk_norm=True,
        rotary_base=rope["full_attention"]["rope_theta"],
        rotary_base_local=rope["sliding_attention"]["rope_theta"],
        original_architecture="Gemma3ForCausalLM",
    )
    return cfg_dict


def _hf_windows(hf_config) -> list[int | None]:
    """Per layer, the sliding window HF attends over (None: full causal attention)."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:  # Mistral: every layer slides when sliding_window is set
        return [window] * hf_config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in layer_types]


def _tl_windows(cfg: HookedTransformerConfig) -> list[int | None]:
    """Per layer, the sliding window the converted HookedTransformer attends over."""
    if not cfg.use_local_attn:
        return [None] * cfg.n_layers
    return [cfg.window_size if t == "local" else None for t in cfg.attn_types or ()]


def _check_attention_windows(hf_config, cfg: HookedTransformerConfig) -> None:
    """Refuse a conversion that drops (or invents) sliding-window attention: its outputs would match
    HF's only on sequences shorter than the window, so a short test would not catch it."""
    hf, tl = _hf_windows(hf_config), _tl_windows(cfg)
    if hf != tl:
        raise ValueError(
            f"This {hf_config.model_type} checkpoint attends over sliding windows (per layer: {hf}) "
            f"that TransformerLens's conversion does not reproduce ({tl}); hpr does not load a model "
            f"whose attention differs from the checkpoint's."
        )


# The order TransformerLens permutes each weight into before F.linear, on every forward pass: the unembed
# (``W_U.T.contiguous()``), Q/K/V (``"h m d -> (h d) m"``), the output (``"h d m -> m (h d)"``) and the gated
# MLP (``.T.contiguous()``). With the default layout each is a full copy per call: on CPU, 112 ms of a
# 210 ms GPT-2-small generation step went to copying W_U alone.
_FLINEAR_ORDER = {"W_U": (1, 0), "W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1), "W_O": (2, 0, 1)}
_GATED_MLP_ORDER = {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)}


def use_matmul_layout(model) -> None:
    """Store those weights as strided views of buffers already in TL's matmul order, so the per-call
    permute + contiguous becomes a view. Same values, same shapes, same results, bit for bit; the
    parameters stay ``nn.Parameter``s (``.contiguous()`` them before serialising)."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    for module in model.modules():
        orders = {**_FLINEAR_ORDER, **(_GATED_MLP_ORDER if isinstance(module, GatedMLP) else {})}
        for name, param in module._parameters.items():  # GQA's repeated K/V (``_W_K``) copy anyway
            order = orders.get(name)
            if param is None or order is None or param.dim() != len(order):
                continue
            inverse = tuple(order.index(i) for i in range(len(order)))
            with torch.no_grad():
                param.data = param.data.permute(order).contiguous().permute(inverse)


def new_hooked_transformer(cfg: dict, tokenizer, seed: int | None = None) -> HookedTransformer:
    """A freshly initialised ``HookedTransformer`` from a plain dict of ``HookedTransformerConfig`` fields."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return HookedTransformer(HookedTransformerConfig(**cfg, seed=seed), tokenizer=tokenizer, move_to_device=False)
