"""Tiny models of many transformers architectures, built from their configs with a fixed seed.

`build(name, vocab)` gives a random model in eval mode, float64 unless told. Sizes are the smallest each config accepts (hidden 16-32, 2 layers, 4 heads), so the
architecture matrix (`tests/test_architectures.py`) stays fast.
"""

import importlib

import torch

SEED = 0
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
_SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
            "max_position_embeddings": 64, "decoder_start_token_id": 2}
_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
       "decoder_start_token_id": 0}

# name: (config class, model class, config arguments)
SPECS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_LIKE),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64}),
    "opt": ("OPTConfig", "OPTForCausalLM", {
        "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64, "word_embed_proj_dim": 32}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {
        "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {
        "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        **_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **_LLAMA_LIKE, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {
        **_LLAMA_LIKE, "intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {
        **_LLAMA_LIKE, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "t5": ("T5Config", "T5ForConditionalGeneration", _T5),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", _T5),
    "bart": ("BartConfig", "BartForConditionalGeneration", {**_SEQ2SEQ, "forced_bos_token_id": None}),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", _SEQ2SEQ),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", _SEQ2SEQ),
    "m2m100": ("M2M100Config", "M2M100ForConditionalGeneration", _SEQ2SEQ),
    "marian": ("MarianConfig", "MarianMTModel", _SEQ2SEQ),
}
SEQ2SEQ = ("t5", "mt5", "bart", "mbart", "pegasus", "m2m100", "marian")
# grouped_mm has no float64 kernel: fnattr runs their experts eagerly (`eager_experts` finds
# them by the configs their experts read, whatever the architecture)
MOE = ("mixtral", "qwen3_moe", "olmoe", "granitemoe")
LOWER_PRECISION = ("mixtral", "qwen3_moe")  # also run in float32 and bfloat16 (grouped_mm)
NAMES = tuple(SPECS)


def build(name: str, vocab: int, dtype: torch.dtype | None = None, overrides: dict | None = None
          ) -> torch.nn.Module:
    """A tiny random `name` model with `vocab` tokens, in eval mode (seed `SEED`); `overrides`
    change config arguments."""
    config_cls, model_cls, kwargs = SPECS[name]
    transformers = importlib.import_module("transformers")
    torch.manual_seed(SEED)
    config = getattr(transformers, config_cls)(vocab_size=vocab, **IDS, **{**kwargs, **(overrides or {})})
    model = getattr(transformers, model_cls)(config)
    return model.to(dtype or torch.float64).eval()

# Cheap options for each method, so that the matrix stays fast; every other option is the default.
CHEAP: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 4}, "layer_integrated_gradients": {"n_steps": 2},
    "sequential_integrated_gradients": {"n_steps": 2}, "gradient_shap": {"n_samples": 2},
    "discretized_integrated_gradients": {"n_steps": 2, "n_neighbors": 8, "points_per_segment": 2},
    "lime": {"n_samples": 8, "seed": 0},
    "reagent": {"max_probe_steps": 4, "num_probes": 2, "keep_top_n": 1},
    # LRP attributes the logit by default; the matrix checks the probability among the step scores
    "attnlrp": {"step_scores": ("probability",)}, "cp_lrp": {"step_scores": ("probability",)},
}
# (name, method) cells that are expected to raise instead of giving scores.
# Why LRP's rules (fnattr.hooks.lrp) refuse an architecture: a module without a rule.
LRP_REFUSED: dict[str, str] = {
    "gemma2": "tanh soft-capping of logits", "phi3": "fused qkv_proj and gate_up_proj",
    "gpt_neox": "fused per-head query_key_value", "gpt_bigcode": "multi-query c_attn",
    "falcon": "fused query_key_value",
    "bloom": "fused per-head query_key_value, ALiBi", "mixtral": "routed experts",
    "qwen3_moe": "routed experts", "olmoe": "routed experts", "granitemoe": "routed experts",
}
UNSUPPORTED: dict[tuple[str, str], str] = {
    (name, method): "lrp_rules" for method in ("attnlrp", "cp_lrp") for name in LRP_REFUSED}
# LRP cells checked against the per-step reference (tests/methods/test_lrp.py)
LRP_REFERENCE = ("llama", "qwen2", "qwen3", "gemma3", "gpt2", "gptj", "bart", "t5")
# Cells that run but are not exact: DeepLIFT's rules pair input row i with reference row n + i,
# and an expert layer regroups tokens by expert, so the pairs break inside it; `delta` shows the
# gap (about 10% of the scores on the tiny MoE models, 1e-11 elsewhere). Strict xfail test.
APPROXIMATE: dict[tuple[str, str], str] = {
    (name, method): "DeepLIFT inside experts" for name in MOE for method in ("deeplift", "layer_deeplift")}
# Architectures outside transformers' attention interface: `attention` and `value_zeroing` reach
# them through each layer's attention module (`fnattr.hooks.value_zeroing.layer_attention`).
LEGACY_ATTENTION = ("gptj", "falcon", "bloom")


def dtypes(name: str) -> tuple[torch.dtype, ...]:
    """The dtypes the matrix runs every method in (the first with the exactness checks)."""
    return (torch.float64, torch.float32, torch.bfloat16) if name in LOWER_PRECISION else (torch.float64,)


def supported_table(methods: tuple[str, ...]) -> str:
    """README's "Supported models" table: what `tests/test_architectures.py` runs and checks."""
    lines = ["| architecture | model class | dtypes | methods | attention reached through | LRP |",
             "|---|---|---|---|---|---|"]
    for name, (_, model_cls, _) in SPECS.items():
        missing = [m for m in methods if (name, m) in UNSUPPORTED]
        shown = f"all {len(methods)}" if not missing else f"all but {', '.join(missing)}"
        rough = [m for m in methods if (name, m) in APPROXIMATE]
        shown += f"; {', '.join(rough)} not exact (see `delta`)" if rough else ""
        kinds = ", ".join(str(d).removeprefix("torch.") for d in dtypes(name))
        via = "its layers' attention modules" if name in LEGACY_ATTENTION else "the attention interface"
        lrp = (f"refused ({LRP_REFUSED[name]})" if name in LRP_REFUSED else
               "yes, equals the per-step reference" if name in LRP_REFERENCE else "yes")
        lines.append(f"| {name} | `{model_cls}` | {kinds} | {shown} | {via} | {lrp} |")
    return "\n".join(lines)
