"""Batched, exact inference on one model (no Ray, no files; ``mecpe.predict`` is its stage API, ``mecpe.infer``
wraps that in actors). One module per concern:

    packing.py    pure: segments, packed rows, their layout and attention visibility
    cache.py      the transformers KV cache with room for decoding, and the version shims, in one place
    runtime.py    model plumbing: device, compute dtype, inference mode, masks in the attention's form, one forward
    scoring.py    emotion label scoring: one forward without cache per batch of packed rows
    decoding.py   greedy "tree" decoding on packed rows and the decoders (free, trie, cause list)
    steps.py      decoding steps at fixed shapes (``inference.decode_step``: static, or one CUDA graph replay)
    attention.py  grouped-query SDPA over the engine's masks (no per-layer copy of the KV cache); FlexAttention
                  prefills over block masks (``inference.prefill_attention: flex``)
    ragged.py     label scoring over one flat sequence, variable-length attention calls without a mask
                  (``inference.prefill_attention: ragged``)
    compiled.py   the decoder stack under torch.compile for prefills: static buckets (flex, compiled) or the ragged
                  sequence's dynamic length (``ragged_compiled``)
    stats.py      ``StageStats``: the work counters each call returns

Everything runs on *packed rows*: a row holds a conversation prefix (``PromptIds.prefix``: chat head +
conversation, identical for all targets of a conversation) once, followed by one block per target utterance, and
usually several conversations (first-fit up to ``packing.ROW_TOKENS``, so there is little padding). A 4D attention
mask lets a block see its own prefix and itself only, and explicit positions put every token where it would be in
its own full prompt, so each prefix is computed and held once, never copied per question. Prompts shortened to fit
``max_prompt_tokens`` have their own prefix and form their own segments (grouping is by prefix token ids).

* **Emotion = scoring the seven answers** (default). A block is ``question + common answer tokens + the seven label
  continuations`` side by side; each continuation sees the block's shared tokens and itself only. One forward
  without KV cache gives every log-probability needed; the label whose whole answer (``utterance_N :: label</s>``,
  EOS included) is most probable wins, so the answer is always a valid label.
* **Decoding** (causes; emotions with ``method="generate"``) is "tree" decoding on the same rows: prefill, then
  each step feeds one token per unfinished block of a row and appends it to the row's cache, whose layers write
  into reserved room instead of concatenating (``DynamicCache`` copies the whole cache every step). Rows whose
  blocks all finished leave the batch; when EOS is the only allowed token it is appended without a forward.
* **Cause = constrained greedy decoding**: the answer's fixed start (``utterance_ids ::`` as far as the tokenizer
  makes it common to all answers) is forced into the prompt, then a state machine over the decoded text admits only
  canonical lists (`` [``, strictly increasing ids in 1..N, commas, ``]``) and EOS only after ``]``.

Memory: a forward holds at most ``max_batch_tokens`` padded columns (rows x (prefill tokens + decoding room)) of
activations / KV cache, plus a rows x columns^2 boolean mask; lm_head runs only at the (row, column) positions whose
next token is read (``runtime.forward_at``), not at whole columns of every row.

Host cost (issue #29: the GPU engine was bound by Python and kernel launches, not FLOPs): prompt pieces are
tokenized once per conversation / utterance id (``mecpe.prompts``), a batch's layout is filled by numpy from its
pieces' lengths and goes to the device as one tensor, and a decoding step syncs once (the chosen tokens, which the
state machines read) with a constant number of tensor operations whatever the number of live blocks. Decoding steps
attend through ``attention.grouped_sdpa``: the query heads sharing a key/value head stacked on the query axis, so no
layer repeats the KV cache (transformers' SDPA does whenever a mask is given). A step is still bound by the host
issuing its operators (~30 ms against ~10 ms of kernels on an H100: ``bench/results/2026-12-06-decode-h100``);
``inference.decode_step: graph`` runs the steps at fixed shapes (``steps.py``) and replays each as one CUDA graph
(the same answers, half the decoding time on an H100: ``bench/results/2026-12-06-engine-h100``).

Exactness: in fp32 the packed computation equals running every full prompt alone up to float reassociation
(tests: 1e-4). Padding keys are always masked; padding queries attend to themselves only, so no fully-masked
softmax row makes NaNs that could leak. Sliding-window layers (Gemma-2/3, Mistral, Qwen2 with a window) get masks
of their own, windowed by position (columns are not positions in a packed row), in prefill and decoding steps alike:
transformers would apply one 4D mask to every layer (``runtime.layer_masks``). Deterministic: greedy argmax, dropout
off (eval mode). Needs ``attn_implementation`` "sdpa" (default) or "eager": flash-attention kernels take no
arbitrary masks.
"""
