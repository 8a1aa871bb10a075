"""Build (corpus -> tokenizer -> tiny transformer) and cache the toy world's model.

The cache lives in ``$HPR_CACHE_DIR`` (default ``~/.cache/hpr-workbench``) under ``toy-<config key>/``.
A build is written to a temporary folder and renamed into place, so an interrupted build leaves
nothing half-written; a later call simply builds again.

The default world's build ships with the package (``shipped/``, 1.8 MB): training is bit-reproducible on one
machine, but floating point differs between CPUs, so a model built elsewhere scores a few points apart. The
cache starts as a copy of the shipped build, and every machine runs the same model; ``hpr build-toy
--rebuild`` trains it here instead. Each build records the machine it was trained on (:func:`machine`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hpr.cache import cache_root
from hpr.threads import one_thread
from hpr.toyworld.tokenizer import END_OF_DOC, train_tokenizer
from hpr.toyworld.world import ToyWorldConfig, build_world, generate_corpus

log = logging.getLogger(__name__)


def model_dir(config: ToyWorldConfig) -> Path:
    return cache_root() / f"toy-{config.key()}"


def _token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents, each preceded by the end-of-document token, as one long id stream."""
    eos = tokenizer.convert_tokens_to_ids(END_OF_DOC)
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.append(eos)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


@one_thread()
def _train(model, stream: torch.Tensor, config: ToyWorldConfig, progress: bool) -> list[float]:
    """The toy model's training, on one thread: the same weights on any machine (:mod:`hpr.threads`)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(config.seed)
    n_windows = (len(stream) - 1) // config.n_ctx
    windows = stream[: n_windows * config.n_ctx + 1]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    losses = []
    model.train()
    bar = tqdm(range(config.steps), desc="training toy model", disable=not progress, unit="step")
    for _ in bar:
        starts = torch.randint(0, n_windows, (config.batch_size,), generator=gen) * config.n_ctx
        batch = torch.stack([windows[s : s + config.n_ctx] for s in starts.tolist()])
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def build_toy_model(config: ToyWorldConfig, out_dir: Path, progress: bool = True) -> dict:
    """Build everything into ``out_dir`` (which must not exist). Returns the build record."""
    from hpr.models import new_hooked_transformer

    torch.manual_seed(config.seed)
    timings = {}
    t0 = time.perf_counter()
    world = build_world(config)
    docs = list(generate_corpus(world))
    timings["corpus_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(docs[:5000], config.vocab_size, out_dir / "tokenizer", config.tokenizer)
    stream = _token_stream(tokenizer, docs)
    timings["tokenizer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = new_hooked_transformer(_model_cfg(config, len(tokenizer)), tokenizer, seed=config.seed)
    losses = _train(model, stream, config, progress)
    timings["training_s"] = time.perf_counter() - t0

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "model.safetensors")
    record = {
        "config": dataclasses.asdict(config),
        "model_cfg": _model_cfg(config, len(tokenizer)),
        "timings": timings,
        "n_tokens": len(stream),
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "machine": machine(),
    }
    (out_dir / "build.json").write_text(json.dumps(record, indent=2))
    return record


def _model_cfg(config: ToyWorldConfig, d_vocab: int) -> dict:
    return dict(
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_head=config.d_model // config.n_heads,
        d_mlp=config.d_mlp,
        n_ctx=config.n_ctx,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        model_name="hpr-toy",
        default_prepend_bos=True,
    )


SHIPPED = Path(__file__).resolve().parent / "shipped"


def shipped_build(config: ToyWorldConfig) -> Path | None:
    """The build shipped with the package, if it is ``config``'s (the default world's)."""
    try:
        record = json.loads((SHIPPED / "build.json").read_text())
    except (OSError, ValueError):
        return None
    return SHIPPED if record.get("config") == json.loads(json.dumps(dataclasses.asdict(config))) else None


def machine() -> dict:
    """What decides a build's floating point: the CPU, torch and its BLAS."""
    import hashlib
    import platform

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first core's
    except OSError:
        pass
    flags = info.get("flags", "")  # the instruction sets, which pick the BLAS kernels
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
    }


def ensure_built(config: ToyWorldConfig, progress: bool = True, rebuild: bool = False) -> Path:
    """Return the cached model folder for ``config``: the cache as it is, else a copy of the shipped build
    when it is ``config``'s, else a new build (each written atomically). ``rebuild`` trains it on this
    machine whatever the cache holds."""
    final = model_dir(config)
    if (final / "build.json").exists() and not rebuild:
        return final
    shipped = None if rebuild else shipped_build(config)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{final.name}-", dir=final.parent))
    try:
        if shipped is not None:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        else:
            log.info("building toy world %s into %s", config.key(), final)
            build_toy_model(config, tmp, progress=progress)
        if rebuild and final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / "build.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_built(folder: Path, device=None, dtype=None):
    """Load a built toy model (a ``HookedTransformer`` with its tokenizer) from ``folder``."""
    from transformers import AutoTokenizer

    from hpr.models import new_hooked_transformer, use_matmul_layout

    record = json.loads((folder / "build.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = new_hooked_transformer(record["model_cfg"], tokenizer)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    model.eval()
    model.requires_grad_(False)  # inference only, as hpr.models.load_checkpoint
    model.to(dtype or torch.float32)
    model.to(device or "cpu")
    use_matmul_layout(model)
    return model
