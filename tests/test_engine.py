"""The inference engine's speed work (issue #29) changes no answer: merged adapters predict what unmerged ones do,
the position-only lm_head equals the full logits, the prompt memos equal fresh tokenization, and the new inference
keys reach the actors (and, on a GPU, torch). Tiny model, CPU, fp32; the exactness of the packed computation itself
is tests/test_predict.py's."""

from __future__ import annotations

import json
import math

import pytest
import torch

import _tiny
from mecpe.labels import EMOTIONS

TEST_FILE = _tiny.DATA_DIR / "NUSTM_SemEval-2024_ECAC" / "data" / "Subtask_2_test.json"


@pytest.fixture(scope="module")
def convs():
    recs = json.loads(TEST_FILE.read_text(encoding="utf-8"))
    return [_tiny.make_conversation(r, str(TEST_FILE)) for r in recs[:5]]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA adapters (r8, all-linear) on the tiny base with large random B: they change the answers."""
    from peft import get_peft_model

    from mecpe import modeling
    from mecpe.config import LoraSettings, ModelConfig, QuantizationConfig

    out = {}
    for k, stage in enumerate(("emotion", "cause")):
        base, _ = modeling.load(ModelConfig(base=_tiny.tiny_model_dir()), QuantizationConfig(mode="none"))
        peft = get_peft_model(base, modeling.get_peft_config(LoraSettings(r=8, alpha=16, target_modules="all-linear")))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        path = tmp_path_factory.mktemp("adapters") / stage
        peft.save_pretrained(str(path))
        out[stage] = str(path)
    return out


@pytest.fixture(autouse=True)
def _keep_storage_settings():
    """The predictor built in this process configures its S3 settings, as in an actor; later tests must not inherit
    them (the S3 tests of the same session then missed their endpoint)."""
    from mecpe import storage

    previous = storage.configure(None)
    storage.configure(previous)
    yield
    storage.configure(previous)


def _spec(adapters, merge, quant="none", ensemble=(), bias=None, mode="average"):
    from mecpe import storage
    from mecpe.config import ModelConfig, PromptConfig, QuantizationConfig
    from mecpe.infer.stages import PredictorSpec

    return PredictorSpec(model=ModelConfig(base=_tiny.tiny_model_dir()), quantization=QuantizationConfig(mode=quant),
                         adapters=adapters, prompt=PromptConfig(max_prompt_tokens=1024), emotion_method="score",
                         emotion_bias=bias, cause_input="predicted", max_new_tokens=24, max_batch_tokens=4096,
                         reuse_prefix=True, storage_settings=storage.S3Settings().as_dict(), merge_adapters=merge,
                         emotion_ensemble=tuple(ensemble), emotion_ensemble_mode=mode)


def _both_stages(actor, convs):
    emo = actor._predict("emotion", convs, [None] * len(convs)).results
    shown = [{u.id: u.emotion or "neutral" for u in c.utterances} for c in convs]  # gold: many cause prompts
    return emo, actor._predict("cause", convs, shown).results


def test_merged_adapters_predict_what_unmerged_do(adapters, convs):
    """inference.merge_adapters: each stage's own base with its adapter merged gives the labels and causes of the
    shared base with switched adapters (scores equal up to float reassociation), and the adapters matter (the plain
    base answers otherwise), so the comparison could fail."""
    from mecpe.infer.stages import EmotionCausePredictor

    merged = EmotionCausePredictor(_spec(adapters, True))
    shared = EmotionCausePredictor(_spec(adapters, False))
    assert merged.merged and not shared.merged
    assert merged.models["emotion"] is not merged.models["cause"]
    assert not any("lora" in n for n, _ in merged.models["emotion"].named_parameters())
    assert shared.models["emotion"] is shared.models["cause"]
    emo_m, cause_m = _both_stages(merged, convs)
    emo_s, cause_s = _both_stages(shared, convs)
    assert [{u: r.label for u, r in c.items()} for c in emo_m] == [{u: r.label for u, r in c.items()} for c in emo_s]
    for cm, cs in zip(emo_m, emo_s):
        for u in cm:
            assert cm[u].scores == pytest.approx(cs[u].scores, abs=1e-4)
    assert cause_m == cause_s and sum(len(c) for c in cause_m) > 5
    plain = EmotionCausePredictor(_spec({}, True))
    emo_p, cause_p = _both_stages(plain, convs)
    assert not plain.merged
    assert emo_p != emo_s and cause_p != cause_s


@pytest.mark.parametrize("merge", [False, True])
def test_emotion_ensemble_averages_the_members_label_probabilities(adapters, convs, merge):
    """inference.emotion_ensemble: each label's ensemble score is the log of the members' mean probability, each
    member scoring as it does alone (both adapters on one base, switched, or a merged base each); the bias applies
    to the average; the members disagree, so the average is neither of them."""
    from mecpe.infer.stages import EmotionPredictor
    from mecpe.predict import pick_label

    def emotions(spec):
        out = EmotionPredictor(spec)._predict("emotion", convs, [None] * len(convs))
        return out.results, out.stats

    (first, s1), (second, s2) = (emotions(_spec({"emotion": adapters[k]}, merge)) for k in ("emotion", "cause"))
    bias = tuple(0.5 if e == "joy" else 0.0 for e in EMOTIONS)
    both, stats = emotions(_spec({"emotion": adapters["emotion"]}, merge, ensemble=[adapters["cause"]], bias=bias))
    assert stats.prompts == s1.prompts + s2.prompts == 2 * sum(len(c.utterances) for c in convs)
    differ = 0
    for a, b, e in zip(first, second, both):
        for u in e:
            mean = [math.log((math.exp(x) + math.exp(y)) / 2) for x, y in zip(a[u].scores, b[u].scores)]
            assert e[u].scores == pytest.approx(mean, abs=1e-4)
            assert e[u].label == pick_label(e[u].scores, bias) and e[u].status == "scored"
            differ += max(abs(x - y) for x, y in zip(a[u].scores, b[u].scores)) > 0.1
    assert differ > 5


def test_emotion_soup_is_one_model_of_the_members_mean_weights(adapters, convs):
    """inference.emotion_ensemble_mode=soup: the emotion stage runs one plain model whose every weight is the mean of
    the members merged alone (the members differ), in one scoring pass rather than one per member, and its labels
    are that model's."""
    from mecpe.infer.stages import EmotionPredictor
    from mecpe.modeling import load_merged
    from mecpe.predict import predict_emotions

    spec = _spec({"emotion": adapters["emotion"]}, True, ensemble=[adapters["cause"]], mode="soup")
    actor = EmotionPredictor(spec)
    soup = actor.models["emotion"]
    assert list(actor.names["emotion"]) == ["emotion"] and list(actor.models) == ["emotion"]
    a, b = (dict(load_merged(spec.model, spec.quantization, adapter=adapters[k])[0].named_parameters())
            for k in ("emotion", "cause"))
    differ = 0
    for name, weight in soup.named_parameters():
        assert torch.allclose(weight.float(), (a[name].float() + b[name].float()) / 2, atol=1e-6), name
        differ += not torch.equal(a[name], b[name])
    assert differ > 10
    out = actor._predict("emotion", convs, [None] * len(convs))
    assert out.stats.prompts == sum(len(c.utterances) for c in convs)
    alone = predict_emotions(soup, actor.tokenizer, actor.builder, convs, method="score",
                             max_batch_tokens=spec.max_batch_tokens, reuse_prefix=True)
    assert [{u: r.scores for u, r in c.items()} for c in out.results] == \
        [{u: r.scores for u, r in c.items()} for c in alone.results]


def _liger_actor(adapters, liger: bool):
    import dataclasses

    from mecpe.infer.stages import EmotionCausePredictor

    return EmotionCausePredictor(dataclasses.replace(_spec(adapters, merge=True), liger_kernels=liger))


def test_liger_kernels_leave_a_cpu_model_as_it_is(adapters, convs):
    """``inference.liger_kernels`` on the CPU (the embedded default): Triton kernels need CUDA, so the actor reports
    them not applied, no module's forward is replaced, and the answers are the plain actor's."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device: the kernels apply (test_liger_kernels_predict_what_plain_kernels_do)")
    fused, plain = _liger_actor(adapters, True), _liger_actor(adapters, False)
    assert fused.fused_kernels is False
    for model in fused.models.values():
        for module in model.modules():
            assert "forward" not in module.__dict__, f"{type(module).__name__}.forward was replaced on the CPU"
    assert _both_stages(fused, convs) == _both_stages(plain, convs)


def test_liger_kernels_without_their_package_warn_and_change_nothing(caplog):
    """A CUDA actor asked for ``inference.liger_kernels`` where liger-kernel is missing: one warning naming the key
    and the extra, the model left as it is (the predictions go on without the kernels)."""
    import importlib.util
    import logging

    from mecpe import modeling
    from mecpe.config import ModelConfig

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    model, _ = modeling.load(ModelConfig(base=_tiny.tiny_model_dir()), None)
    with caplog.at_level(logging.WARNING, logger="mecpe.modeling"):
        assert modeling.fuse_kernels(model, "cuda:0") is False
    assert [r for r in caplog.records if "inference.liger_kernels" in r.getMessage() and ".[gpu]" in r.getMessage()]
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_liger_kernels_predict_what_plain_kernels_do(adapters, convs):
    """On a GPU with liger-kernel: the fused RMSNorm, SwiGLU and RoPE give the plain kernels' answers (fp32 tiny
    model: the scores agree to rounding)."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("needs a CUDA device and liger-kernel (the gpu extra)")
    plain = _liger_actor(adapters, False)
    want = _both_stages(plain, convs)
    fused = _liger_actor(adapters, True)  # patches modeling_llama's RoPE for the rest of this process (equivalent)
    assert fused.fused_kernels is True
    assert any("forward" in m.__dict__ for model in fused.models.values() for m in model.modules())
    emo, causes = _both_stages(fused, convs)
    assert [{u: r.label for u, r in c.items()} for c in emo] == [{u: r.label for u, r in c.items()} for c in want[0]]
    for got, ref in zip(emo, want[0]):
        for u in ref:
            assert got[u].scores == pytest.approx(ref[u].scores, abs=1e-3)
    assert causes == want[1]


def test_merge_setting():
    from mecpe.config import QuantizationConfig
    from mecpe.modeling import merges_adapters

    none, nf4 = QuantizationConfig(mode="none"), QuantizationConfig(mode="nf4")
    assert merges_adapters("auto", none) and not merges_adapters("auto", nf4)
    assert not merges_adapters(False, none) and merges_adapters(True, none)
    with pytest.raises(ValueError, match="mode none"):
        merges_adapters(True, nf4)


def test_new_inference_keys_reach_the_actor_spec():
    from mecpe import storage
    from mecpe.config import load_config
    from mecpe.infer.driver import predictor_spec

    cfg = load_config(None, ["inference.gpu_memory_gib=15", "inference.merge_adapters=false",
                             "inference.decode_step=graph", "inference.prefill_attention=flex",
                             "inference.liger_kernels=true"])
    spec = predictor_spec(cfg, storage.S3Settings())
    assert spec.gpu_memory_gib == 15 and spec.merge_adapters is False and spec.decode_step == "graph"
    assert spec.prefill_attention == "flex" and spec.liger_kernels is True
    assert predictor_spec(load_config(None, []), storage.S3Settings()).liger_kernels is False
    assert predictor_spec(load_config(None, []), storage.S3Settings()).merge_adapters == "auto"


def test_memory_cap_reaches_torch():
    """On CUDA the cap is the allocator's per-process fraction; without CUDA (or without a cap) nothing is set."""
    from mecpe.modeling import cap_gpu_memory

    assert cap_gpu_memory("cpu", 15) is None and cap_gpu_memory("cuda:0", None) is None
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the cap itself is checked on a GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    got = cap_gpu_memory("cuda:0", 2.0)
    try:
        assert got == pytest.approx(2 * 2**30 / total)
        assert torch.cuda.get_per_process_memory_fraction(0) == pytest.approx(got)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda:0")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


@pytest.mark.parametrize("path", ["2d-keep", "pre-hook"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_position_logits_equal_full_logits(convs, monkeypatch, arch, path):
    """``forward_at`` runs lm_head at the chosen (row, column) positions only; the logits equal those of the full
    forward there, whether the installed transformers takes a 2D boolean logits_to_keep or (older releases, as on
    the GPU image) the output layer's pre-hook picks the positions; and with the additive SDPA mask as with the
    boolean one. Gemma-3 softcaps its logits after lm_head (set here), which the pre-hook path must keep."""
    from transformers import AutoModelForCausalLM

    from mecpe.engine import runtime
    from mecpe.engine.runtime import attention_mask, forward, forward_at

    src = _tiny.tiny_model_dir() if arch == "llama" else _tiny.tiny_gemma3_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if arch == "gemma3":
        model.config.final_logit_softcapping = 3.0
    assert runtime.keeps_positions(type(model))
    if path == "pre-hook":
        monkeypatch.setattr(runtime, "keeps_positions", lambda cls: False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (3, 17), generator=g)
    allowed = torch.ones((17, 17), dtype=torch.bool).tril()[None, None].expand(3, 1, 17, 17)
    pos = torch.arange(17).expand(3, 17)
    at = [(0, 3), (0, 16), (1, 0), (2, 5), (2, 9)]
    with torch.inference_mode():
        full, _ = forward(model, ids, attention_mask(model, allowed, pos, pos), pos, None, 0, use_cache=False)
        got, _ = forward_at(model, ids, attention_mask(model, allowed, pos, pos), pos, None, at, use_cache=False)
        added, _ = forward_at(model, ids, attention_mask(model, allowed, pos, pos, torch.float32), pos, None, at,
                              use_cache=False)
    assert got.shape == (len(at), full.shape[-1])
    if arch == "gemma3":
        assert full.abs().max() <= 3.0
    want = full[[i for i, _ in at], [c for _, c in at]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(added, want, atol=1e-5, rtol=1e-5)
    assert not model.lm_head._forward_pre_hooks  # the hook goes with the forward


def test_prompt_memos_equal_fresh_tokenization(convs):
    """The builder's memos (questions, answers, one prefix per conversation) give the ids a fresh builder gives, for
    every target of several conversations built in turn, and all targets of a conversation share one prefix."""
    from mecpe import modeling
    from mecpe.prompts import PromptBuilder

    tok = modeling.load_tokenizer(_tiny.tiny_model_dir(), for_inference=True)
    memo = PromptBuilder(tok, max_prompt_tokens=1024)
    for conv in convs + convs[:2]:
        shown = {u.id: u.emotion or "neutral" for u in conv.utterances}
        prompts = [memo.emotion_prompt(conv, u.id) for u in conv.utterances]
        assert all(p.prefix is prompts[0].prefix for p in prompts)
        for u, p in zip(conv.utterances, prompts):
            fresh = PromptBuilder(tok, max_prompt_tokens=1024)
            assert p == fresh.emotion_prompt(conv, u.id)
            assert memo.cause_prompt(conv, u.id, shown) == fresh.cause_prompt(conv, u.id, shown)
            assert [memo.emotion_answer(u.id, e) for e in EMOTIONS] == [fresh.emotion_answer(u.id, e)
                                                                        for e in EMOTIONS]
    short = PromptBuilder(tok, max_prompt_tokens=60)  # shortened prompts keep their own prefixes
    conv = max(convs, key=lambda c: len(c.utterances))
    got = [short.emotion_prompt(conv, u.id) for u in conv.utterances]
    assert len({tuple(p.prefix) for p in got}) > 1
    assert got == [PromptBuilder(tok, max_prompt_tokens=60).emotion_prompt(conv, u.id) for u in conv.utterances]


@pytest.mark.parametrize("additive", [False, True])
def test_grouped_sdpa_equals_transformers_sdpa(additive):
    """The decoding steps' attention: grouped query heads stacked along the query axis over the cache as it is, against
    transformers' SDPA function (which repeats the key/value heads); a mask shared by the heads, rows of it empty but
    one key (a finished slot), and a prefill-sized call that keeps transformers' path."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mecpe.engine.attention import grouped_sdpa
    from mecpe.engine.runtime import mask_form

    g = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    for q_len, keys in ((5, 37), (1, 37), (40, 40)):
        query = torch.randn(2, 6, q_len, 8, generator=g)
        key, value = torch.randn(2, 2, keys, 8, generator=g), torch.randn(2, 2, keys, 8, generator=g)
        allowed = torch.rand(2, 1, q_len, keys, generator=g) < 0.4
        allowed[..., 0] = True
        mask = mask_form(allowed, "sdpa", torch.float32 if additive else None)
        want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        got, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.3)
        assert got.shape == want.shape == (2, q_len, 6, 8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the stacked mask is built once per mask object (one per forward, shared by its layers)
    from mecpe.engine.attention import _stacked_mask

    with torch.inference_mode():
        mask = mask_form(torch.ones(2, 1, 5, 37, dtype=torch.bool), "sdpa", torch.float32 if additive else None)
        first = _stacked_mask(mask, 3, 37)
        assert _stacked_mask(mask, 3, 37) is first and first.shape == (2, 1, 15, 37) and first.stride(-2) % 16 == 0
        assert _stacked_mask(mask, 3, 30) is not first


def test_inference_switches_to_grouped_sdpa_and_back():
    """The engine's inference block runs a model on SDPA through the grouped function, and leaves it on SDPA (a
    training model scored by the validation callback); the additive SDPA mask's rows are 16-aligned (no pad copy)."""
    from mecpe import modeling
    from mecpe.config import ModelConfig, QuantizationConfig
    from mecpe.engine.attention import NAME
    from mecpe.engine.runtime import inference, mask_form

    model, _ = modeling.load(ModelConfig(base=_tiny.tiny_model_dir()), QuantizationConfig(mode="none"))
    assert model.config._attn_implementation == "sdpa"
    with inference(model):
        assert model.config._attn_implementation == NAME
        assert all(layer.self_attn.config._attn_implementation == NAME for layer in model.model.layers)
    assert model.config._attn_implementation == "sdpa"
    m = mask_form(torch.ones(3, 1, 5, 37, dtype=torch.bool), "sdpa", torch.bfloat16)
    assert m.shape == (3, 1, 5, 37) and m.stride(-2) % 16 == 0 and m.stride(0) % 16 == 0
