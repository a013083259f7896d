"""Tiny random-init Hugging Face models and a small tokenizer, built in-process (no download).

``save(kind, folder)`` writes a ``save_pretrained`` folder that ``--model hf:FOLDER`` loads: a
byte-level BPE tokenizer trained on Python's own ``pydoc_data`` text, plus a 2-layer model of the
kind: ``gpt2`` (GPT-2 LM, fused ``Conv1D`` projections), ``llama`` (Llama LM with grouped-query
attention: 4 query heads on 2 KV heads, gated MLP, RMSNorm), ``mixtral`` (a Mixtral LM: the
Llama attention with a sparse MoE block of 4 experts, 2 per token, stored fused), ``bert`` (BERT sequence classifier,
3 labels), ``vit`` (ViT image classifier on 8x8 images, 10 labels; no tokenizer).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def corpus() -> str:
    """Python's pydoc topics (about 465k characters of English and code), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=1)
def _trained_tokenizer(vocab: int) -> str:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([corpus()], vocab_size=vocab, min_frequency=2, show_progress=False,
                            special_tokens=["<pad>", "<eos>", "<unk>"])
    return tok._tokenizer.to_str()  # type: ignore[attr-defined, no-any-return]


def tokenizer(vocab: int = 320):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer(vocab)),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   model_max_length=64)


def build(kind: str, seed: int = 0, vocab: int = 320):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, num_labels=3, pad_token_id=0)
        return tf.BertForSequenceClassification(cfg)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
                               tie_word_embeddings=False)
        return tf.MixtralForCausalLM(cfg)
    if kind == "vit":
        cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48, num_labels=10)
        return tf.ViTForImageClassification(cfg)
    if kind == "qwen2":  # Llama-like, with no head_dim in its config
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "gptneox":  # a query_key_value with each head's q, k and v rows together
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
        return tf.GPTNeoXForCausalLM(cfg)
    if kind == "gptj":  # fc_in / fc_out
        cfg = tf.GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                            n_inner=48, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return tf.GPTJForCausalLM(cfg)
    if kind == "phi3":  # fused qkv_proj [Q | K | V] and gate_up_proj
        cfg = tf.Phi3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=0, tie_word_embeddings=False)
        return tf.Phi3ForCausalLM(cfg)
    if kind in ("falcon-mqa", "falcon-gqa"):  # one KV head for all queries (Falcon-7B); grouped (Falcon-40B)
        cfg = tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_kv_heads=2, multi_query=kind == "falcon-mqa",
                              new_decoder_architecture=kind == "falcon-gqa", alibi=False, bias=False,
                              ffn_hidden_size=48, max_position_embeddings=64, pad_token_id=0,
                              bos_token_id=1, eos_token_id=1)
        return tf.FalconForCausalLM(cfg)
    if kind in ("bigcode-mqa", "bigcode"):  # GPTBigCode (StarCoder): a multi-query c_attn; or per-head q, k, v
        cfg = tf.GPTBigCodeConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                  multi_query=kind == "bigcode-mqa", pad_token_id=0, bos_token_id=1,
                                  eos_token_id=1)
        return tf.GPTBigCodeForCausalLM(cfg)
    if kind == "distilbert":  # q_lin / k_lin / v_lin / out_lin, lin1 / lin2
        cfg = tf.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                  max_position_embeddings=64, num_labels=3, pad_token_id=0)
        return tf.DistilBertForSequenceClassification(cfg)
    if kind == "deberta":  # query_proj / key_proj / value_proj
        cfg = tf.DebertaV2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64, num_labels=3, pad_token_id=0)
        return tf.DebertaV2ForSequenceClassification(cfg)
    raise ValueError(kind)


def save(kind: str, folder: str | Path, seed: int = 0, model=None) -> Path:
    """A save_pretrained folder of ``kind`` (``model``: a trained one to save instead)."""
    folder = Path(folder)
    m = model if model is not None else build(kind, seed)
    m.eval().save_pretrained(folder)
    if kind != "vit":
        tokenizer().save_pretrained(folder)
    return folder


def text_model(kind: str, root: str | Path, n: int, seq_len: int = 16):
    """A saved tiny ``kind`` (``root/kind``) with text windows of the test corpus tokenized for it:
    ``(ModelSpec("hf:root/kind"), the EvalSet of n windows)``."""
    from sensplan.sensitivity import DataSpec, ModelSpec, load_eval_set

    root = Path(root)
    folder = save(kind, root / kind)
    text = root / "corpus.txt"
    text.write_text(corpus()[:20000])
    return ModelSpec(f"hf:{folder}"), load_eval_set(DataSpec("text", str(text), tokenizer=str(folder),
                                                            seq_len=seq_len), n=n)
