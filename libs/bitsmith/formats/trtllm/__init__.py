"""TensorRT-LLM's checkpoint (config.json + rank0.safetensors, the input of `trtllm-build`): FP8 or W4A16.

What pins each choice (FORMATS.md §4.2 and §10 keys; "TRT-layers" = TensorRT-LLM's own
`tensorrt_llm/quantization/layers.py`, read for this package) and what is a guess — the layout is "only
partly pinned" (§9):

Pinned
  * files `config.json` + `rank{r}.safetensors`; config fields architecture, dtype, logits_dtype,
    dims, norm_epsilon, position_embedding_type, mapping, quantization {quant_algo, kv_cache_quant_algo,
    group_size, has_zero_point, pre_quant_scale, exclude_modules} [TRT-ckpt]; head_size, rotary_base,
    rotary_scaling, use_parallel_embedding, embedding_sharding_dim, share_embedding_table, producer [MO-trt];
  * llama tensor names: vocab_embedding, input_layernorm, attention.qkv (q, k, v concatenated along the
    output dim), attention.dense, post_layernorm, mlp.fc = gate_proj, mlp.gate = up_proj, mlp.proj =
    down_proj, ln_f, lm_head, weights [out, in] [TRT-ckpt; MO-lu; MO-mcu];
  * FP8 per-tensor: `weights_scaling_factor` and `activation_scaling_factor` float32, shape (1,) as
    TRT-layers `FP8Linear` declares them; fp8 weight [out, in];
  * FP8 per-channel / per-token: `per_channel_scale` float32 (out_features,) (TRT-layers `Fp8RowwiseLinear`),
    no activation scale;
  * int4: ModelOpt's `pack_int4_in_uint8` layout (two output rows per byte, signed nibbles) viewed as int8
    [MO-mcu `pack_linear_weights`, MO-qu].

Guesses (not read from TensorRT-LLM's converter `models/llama/convert.py` nor its load-time preprocessing)
  * the stored shape of the int4 `weights_scaling_factor`: float32 [N, K/group_size] (ModelOpt's amax
    layout; TensorRT-LLM's parameter is (K/group_size, N) after its preprocessing transposes);
  * the fp8 weights stored as safetensors F8_E4M3 (older ModelOpt viewed them as int8);
  * sym GPTQ/RTN codes written as "W4A16_AWQ" with `pre_quant_scale` false rather than "W4A16_GPTQ", whose
    tensor set is not pinned (§9): the kernel path is the same groupwise int4 GEMM, and a symmetric grid
    has no zero point to store. Asymmetric grids are refused: `has_zero_point` true would need a `zero`
    tensor whose stored form is not pinned;
  * Qwen2 as architecture "Qwen2ForCausalLM" with `qwen_type` "qwen2" and its q/k/v biases fused into
    `attention.qkv.bias`; Mistral as "MistralForCausalLM" (sliding windows are not written);
  * `tie_word_embeddings` (bitsmith's own key, so the reader can invert the LM head copy; TensorRT-LLM's
    config keeps unknown keys as attributes), `attn_bias` / `mlp_bias` flags.

Fused q/k/v with per-tensor FP8 scales need one scale: the shards are requantized to the largest as ModelOpt
does before export (MO-uhf `requantize_resmooth_fused_llm_layers`) — see `writer.fuse_fp8`.
"""

from bitsmith.formats.trtllm.reader import TRTLLMCheckpoint, read_trtllm
from bitsmith.formats.trtllm.writer import write_trtllm

write = write_trtllm
read = read_trtllm

__all__ = ["TRTLLMCheckpoint", "read", "read_trtllm", "write", "write_trtllm"]
