"""Hugging Face ``transformers`` models and text data (the optional ``hf`` extra).

``--model hf:DIR`` loads a model saved with ``save_pretrained`` (``hf:ORG/NAME``: from the local
hub cache; nothing is downloaded). The model class follows from the config's architecture:

========================  ==========================  =============================================
architecture ends with    kind                        what the wrapped model returns
========================  ==========================  =============================================
``ForCausalLM``,          ``causal-lm``               next-token logits (batch, tokens, vocab)
``LMHeadModel``
``ForSequence             ``sequence-classification`` class logits (batch, classes)
Classification``
``ForImageClassification`` ``image-classification``   class logits (batch, classes)
anything else             ``embedding``               the mean-pooled last hidden state (batch, dim)
========================  ==========================  =============================================

sensplan scans models that take one tensor. :class:`HFModel` gives a transformer that form: text
goes in as one int64 tensor of shape (batch, 2, tokens), the token ids and the attention mask
(:func:`tokenize_text`, :func:`tokenize_records` build it), images as pixels. GPT-2's ``Conv1D``
layers (a Linear with its weight transposed) become ``nn.Linear`` on loading, so every projection is
a Linear that the methods, the cost model and the container already know.

The output head (``lm_head``, a classifier) is out of the scan's scope by default, as embeddings
are (they are not Linear layers): ``--model-arg include_head=true`` scans the head too.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensplan._errors import DataSpecError, ModelSpecError, UserInputError, first_line
from sensplan.sensitivity._models import swap_module

KINDS = ("causal-lm", "sequence-classification", "image-classification", "embedding")
INSTALL = 'pip install "sensplan[hf]"'


def require_transformers(what: str) -> Any:
    """The ``transformers`` module, or a UserInputError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserInputError(f"{what} needs the Hugging Face extra: {INSTALL}.") from None
    transformers.logging.set_verbosity_error()  # its advice goes to users of its own API
    transformers.utils.logging.disable_progress_bar()
    return transformers


def model_dir(name: str) -> str:
    """The local folder of ``hf:NAME``: an existing directory, else the local hub cache's snapshot of
    the repository ``NAME`` (never downloaded). A ModelSpecError says how to get it otherwise."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelSpecError(f"hf:{name} is a folder without config.json: not a Hugging Face model "
                                 f"folder. Point --model hf:DIR at the folder save_pretrained wrote.")
        return os.path.realpath(name)
    require_transformers(f"--model hf:{name}")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return str(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache: one message below
            pass
    raise ModelSpecError(
        f"hf:{name} is neither a folder nor a model in the local Hugging Face cache, and sensplan "
        f"never downloads. Save it once where the network is reachable (python -c \"from "
        f"transformers import AutoModel; AutoModel.from_pretrained('{name}').save_pretrained('DIR')\" "
        f"or hf download {name}) and pass --model hf:DIR.")


def _kind_of(arch: str) -> str:
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if arch.endswith("ForImageClassification"):
        return "image-classification"
    return "embedding"


class HFModel(nn.Module):
    """A ``transformers`` model behind sensplan's one-tensor interface (see the module docstring).

    ``model`` is the Hugging Face model; ``kind`` one of :data:`KINDS`; ``head`` the FQN (in this
    wrapper) of the output head, out of scope unless ``include_head``."""

    model: Any  # a transformers PreTrainedModel (its API is not typed as nn.Module's)

    def __init__(self, model: Any, kind: str, *, include_head: bool = False, source: str = "",
                 conv1d: list[str] | None = None, experts: list[str] | None = None) -> None:
        super().__init__()
        self.conv1d = list(conv1d or [])  # the modules that were GPT-2 Conv1D (names inside ``model``)
        self.experts = list(experts or [])  # the fused MoE experts split per expert (see _moe)
        if kind not in KINDS:
            raise ModelSpecError(f"kind must be one of {', '.join(KINDS)}. Got {kind!r}.")
        self.model = model
        self.kind = kind
        self.source = source
        self.include_head = include_head
        self._takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {m: n for n, m in self.named_modules()}
        self.head = names.get(out, "") if out is not None else ""
        if not self.head and kind in ("sequence-classification", "image-classification"):
            self.head = next((n for n, m in self.named_modules()
                              if n.endswith(("classifier", "score", "classifier.out_proj"))
                              and isinstance(m, nn.Linear)), "")

    @property
    def config(self) -> Any:
        return self.model.config

    def out_of_scope(self) -> dict[str, str]:
        """Layers the scan leaves out by default, with the reason (sensplan's scope hook)."""
        out: dict[str, str] = {}
        if self.kind == "embedding":  # the mean-pooled output never reads a BERT-style pooler
            out.update({n: "the pooler: the embedding is the mean of the last hidden states, which never "
                           "reads it (compressing it would look free)"
                        for n, m in self.named_modules() if ".pooler." in f".{n}." and isinstance(m, nn.Linear)})
        if self.include_head or not self.head:
            return out
        what = "the language-model head (lm_head)" if self.kind == "causal-lm" else "the output head"
        out[self.head] = (f"{what}: left out of scope by default, as the embeddings are; "
                          f"--model-arg include_head=true scans it")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # pixels
            out = self.model(pixel_values=x)
            if self.kind == "embedding":
                pooled: torch.Tensor = out.last_hidden_state.mean(dim=1)
                return pooled
            return out.logits  # type: ignore[no-any-return]
        if x.dim() != 3 or x.shape[1] != 2:
            raise UserInputError(f"A text model takes (batch, 2, tokens) int64 inputs (token ids and "
                                 f"attention mask). Got {tuple(x.shape)}: use text data (text:FILE, "
                                 f"jsonl:FILE:FIELD, csv:FILE:FIELD, datasets:DIR:FIELD) with --model hf:DIR.")
        x = x.long()  # a float zero input (a rebuild's example input) is a valid all-padding batch
        ids, mask = x[:, 0], x[:, 1]
        # no KV cache: nothing to keep between calls, and no object every layer writes to
        extra = {"use_cache": False} if self.kind == "causal-lm" or self._takes_use_cache else {}
        out = self.model(input_ids=ids, attention_mask=mask, **extra)
        if self.kind == "embedding":
            h = out.last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            emb: torch.Tensor = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return emb
        return out.logits  # type: ignore[no-any-return]


    def export_pretrained(self, folder: str | os.PathLike[str]) -> dict[str, Any]:
        """Write this (compressed) model as a ``save_pretrained`` folder where its config can say the
        new shapes: the MLP width equal in every layer, and heads removed only where the config has
        an explicit ``head_dim`` (Llama-style). Weights are written in float32 (quantized ones as
        their dequantized values: the folder loads in ``transformers`` but is not smaller). Returns
        ``{"saved": True, "path", "max_abs_diff"}`` (the reloaded model's outputs against this one's
        on a probe input), or ``{"saved": False, "reason"}``."""
        import copy

        from sensplan.sensitivity._moe import fuse_experts_
        from sensplan.sensitivity._transformers import find_groups

        require_transformers("Writing a save_pretrained folder")
        cfg: Any = copy.deepcopy(self.model.config)
        # the embedding's width by the config (ALBERT's and ELECTRA's embedding_size, RemBERT's
        # input_embedding_size, OPT's word_embed_proj_dim; else the hidden size)
        hidden = next((int(getattr(cfg, k)) for k in ("embedding_size", "input_embedding_size", "word_embed_proj_dim",
                                                      "hidden_size", "n_embd", "d_model", "dim")
                       if isinstance(getattr(cfg, k, None), int)), None)
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        width = getattr(emb, "embedding_dim", None)
        if hidden is not None and isinstance(width, int) and width != hidden:
            return {"saved": False, "reason": f"the hidden width (the residual stream) was pruned from {hidden} to "
                                              f"{width}, and a transformers config derives every layer's shapes "
                                              f"(and the head size) from one hidden size"}
        groups = find_groups(self)
        widths = sorted({g.channels for g in groups if g.kind == "mlp" and g.expert is None})
        if len(widths) > 1:
            return {"saved": False, "reason": f"the MLP width differs between layers ({widths[0]} to "
                                              f"{widths[-1]}), and a transformers config holds one"}
        heads = [g for g in groups if g.kind == "heads"]
        derived = (f"heads were removed, and {type(cfg).__name__} derives the head size from the hidden size and "
                   f"the head count")
        tried = ""  # the reason to give if the folder written with an explicit head_dim does not reload
        original_q = int(getattr(cfg, "num_attention_heads", 0) or 0)
        original_kv = int(getattr(cfg, "num_key_value_heads", None) or original_q)
        # a channel is a KV head with its query heads; with multi-query attention, one query head
        q_heads = {g.channels if g.shared_kv else g.channels * (original_q // max(1, original_kv)) for g in heads}
        kv_heads = {original_kv if g.shared_kv else g.channels for g in heads}
        if heads and (kv_heads != {original_kv} or q_heads != {original_q}):
            if len(kv_heads) > 1 or len(q_heads) > 1:
                return {"saved": False, "reason": "the number of attention heads differs between layers, "
                                                  "and a transformers config holds one"}
            if not isinstance(getattr(cfg, "head_dim", None), int):
                # many attention classes read config.head_dim when it is set (Qwen2's does): try it,
                # and keep the folder only if it reloads to the same outputs
                hidden_size = getattr(cfg, "hidden_size", None)
                if not isinstance(hidden_size, int) or not original_q or hidden_size % original_q:
                    return {"saved": False, "reason": derived}
                cfg.head_dim = hidden_size // original_q
                tried = derived
            cfg.num_attention_heads = q_heads.pop()
            if hasattr(cfg, "num_key_value_heads"):
                cfg.num_key_value_heads = kv_heads.pop()
        if widths:
            # Falcon's ffn_hidden_size, DistilBERT's hidden_dim
            key = next((k for k in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim")
                        if hasattr(cfg, k)), None)
            if key is None:
                return {"saved": False, "reason": f"{type(cfg).__name__} has no MLP width to set"}
            setattr(cfg, key, widths[0])
        experts = sorted({g.channels for g in groups if g.expert is not None})
        if len(experts) == 1:  # every expert at one width: the config's expert width says it
            key = next((k for k in ("moe_intermediate_size", "intermediate_size") if hasattr(cfg, k)), None)
            if key == "intermediate_size" and widths and widths[0] != experts[0]:
                return {"saved": False, "reason": f"the experts' width ({experts[0]}) and the MLPs' ({widths[0]}) "
                                                  f"differ, and {type(cfg).__name__} holds one intermediate_size"}
            if key is not None:
                setattr(cfg, key, experts[0])
        hooked = [n for n, m in self.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            return {"saved": False, "reason": f"{hooked[0]} runs a hook (e.g. quantized activations) that a "
                                              f"transformers model cannot hold"}
        out: Any = copy.deepcopy(self.model)
        linear_to_conv1d_(out, self.conv1d)
        unfused = fuse_experts_(out, self.experts, cfg)
        if unfused:
            return {"saved": False, "reason": unfused}
        out.config = cfg
        try:
            out.save_pretrained(folder)
            tok = self.source and os.path.isfile(os.path.join(self.source, "tokenizer_config.json"))
            if tok:
                load_tokenizer(self.source).save_pretrained(folder)
            loaded, info = type(out).from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                     output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - the config refuses the head count, or the shapes misfit
            if isinstance(e, ValueError) and not tried and \
                    getattr(cfg, "num_attention_heads", original_q) != original_q:
                # the attention refuses the head count (Falcon: "hidden_size must be divisible by num_heads")
                return {"saved": False, "reason": f"{derived} ({first_line(e, 120)})"}
            if isinstance(e, OSError) or (not tried and not isinstance(e, RuntimeError)):
                raise  # a full disk, a folder it cannot write: not the model's shapes
            # RuntimeError: shapes the config does not say (transformers: "ignore_mismatched_sizes")
            return {"saved": False, "reason": tried or (
                f"its tensor shapes no longer fit what {type(cfg).__name__} says, so transformers cannot reload the "
                f"folder ({_first_misfit(out, cfg, e)})")}
        odd = [*info.get("missing_keys", []), *info.get("unexpected_keys", []), *info.get("mismatched_keys", [])]
        if odd:
            return {"saved": False, "reason": tried or f"its layers no longer fit the architecture (e.g. {odd[0]}: "
                                                       f"a layer factorized or replaced)"}
        dev = next(self.parameters()).device
        back = HFModel(loaded.eval().to(dev), self.kind)
        conv1d_to_linear_(back.model)  # its experts stay fused: checked as transformers runs them
        probe = _probe_input(self).to(dev)
        with torch.no_grad():
            ours = self(probe)
            try:
                theirs = back(probe)
            except RuntimeError as e:  # e.g. transformers' grouped expert kernel on an odd width
                return {"saved": False, "reason": tried or f"the folder reloads, but transformers cannot run it "
                                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"}
            diff = float((theirs - ours).abs().max())
        if not diff <= 1e-4 * (float(ours.abs().max()) + 1.0):
            return {"saved": False, "reason": tried or f"the folder reloaded to different outputs (max difference "
                                              f"{diff:.3g})"}
        return {"saved": True, "path": str(folder), "max_abs_diff": diff,
                "note": "float32 weights (quantized ones as their dequantized values)"}


def _first_misfit(model: nn.Module, cfg: Any, error: Exception) -> str:
    """The first tensor whose shape differs from what ``cfg`` builds (on the meta device: no
    memory), for a message; transformers' own error refers to a report the user does not see."""
    try:
        with torch.device("meta"):
            ref = type(model)(cfg)
        shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        for k, v in model.state_dict().items():
            if k in shapes and tuple(v.shape) != shapes[k]:
                return f"e.g. {k} is {tuple(v.shape)}, the config makes {shapes[k]}"
    except Exception:  # noqa: BLE001 - only a message: fall back to transformers' own line
        pass
    return first_line(error, 120)


def _probe_input(model: HFModel) -> torch.Tensor:
    cfg = model.config
    if model.kind == "image-classification":
        size = int(getattr(cfg, "image_size", 224))
        return torch.randn(2, int(getattr(cfg, "num_channels", 3)), size, size,
                           generator=torch.Generator().manual_seed(0))
    vocab = int(getattr(cfg, "vocab_size", 100))
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return torch.stack([ids, torch.ones_like(ids)], dim=1)


def linear_to_conv1d_(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`conv1d_to_linear_` for the modules ``names`` (a ``save_pretrained`` folder of GPT-2
    must hold its ``Conv1D`` layout)."""
    if not names:
        return
    from transformers.pytorch_utils import Conv1D

    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            continue
        conv = Conv1D(lin.out_features, lin.in_features)
        with torch.no_grad():
            conv.weight.data = lin.weight.detach().t().contiguous().clone()
            conv.bias.data = lin.bias.detach().clone() if lin.bias is not None else torch.zeros(lin.out_features)
        swap_module(model, name, conv)


def conv1d_to_linear_(model: nn.Module) -> list[str]:
    """Replace every GPT-2 style ``Conv1D`` (y = x W + b, W of shape (in, out)) by the equal
    ``nn.Linear``; returns their names. Exact: the Linear computes the same products."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return []
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in swaps:
        lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        swap_module(model, name, lin)
    return [n for n, _ in swaps]


def _truthy(v: Any) -> bool:
    return v in (True, 1) or str(v).lower() in ("true", "1", "yes")


def load_hf_model(name: str, kwargs: dict[str, Any]) -> HFModel:
    """``hf:NAME`` as an :class:`HFModel` in float32, eval mode, on the CPU. ``kwargs`` (from
    ``--model-arg``): ``kind`` (one of :data:`KINDS`, to override the config's architecture) and
    ``include_head``."""
    transformers = require_transformers(f"--model hf:{name}")
    path = model_dir(name)
    unknown = set(kwargs) - {"kind", "include_head"}
    if unknown:
        raise ModelSpecError(f"--model hf:{name} takes --model-arg kind=... and include_head=true only. "
                             f"Got {', '.join(sorted(unknown))}.")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a broken or unknown config
        raise ModelSpecError(f"Cannot read the config of hf:{name} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}). Is it a transformers model "
                             f"folder, and is transformers recent enough for it?") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    if getattr(config, "is_encoder_decoder", False):
        raise ModelSpecError(f"hf:{name} is an encoder-decoder model ({arch or type(config).__name__}): it needs "
                             f"decoder inputs that sensplan's tasks do not give. sensplan scans causal LMs, encoders "
                             f"(embeddings), sequence and image classifiers. Scan a model of one of those kinds.")
    kind = str(kwargs.get("kind") or _kind_of(arch))
    if kind not in KINDS:
        raise ModelSpecError(f"--model-arg kind= must be one of {', '.join(KINDS)}. Got {kind!r}.")
    # the config's class, unless --model-arg kind asks for another head (a base encoder of a classifier);
    # an embedding is the base model's output, whatever head the folder was saved with (a masked LM)
    cls = getattr(transformers, arch, None) if arch and kind == _kind_of(arch) and kind != "embedding" else None
    if cls is None:
        auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification":
                "AutoModelForSequenceClassification", "image-classification":
                "AutoModelForImageClassification", "embedding": "AutoModel"}[kind]
        cls = getattr(transformers, auto)
    try:
        hf = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - missing weights, a config the class does not fit
        raise ModelSpecError(f"Loading hf:{name} as {getattr(cls, '__name__', cls)} failed: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if kind == "sequence-classification" and getattr(hf.config, "pad_token_id", None) is None:
        # decoder classifiers find each text's last token by the pad id: the attention mask pads with eos
        eos = getattr(hf.config, "eos_token_id", None)
        hf.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    from sensplan.sensitivity._moe import split_experts_

    swapped = conv1d_to_linear_(hf)
    experts = split_experts_(hf)  # fused MoE experts: one Linear pair per expert
    return HFModel(hf.eval(), kind, include_head=_truthy(kwargs.get("include_head", False)),
                   source=path, conv1d=swapped, experts=experts).eval()


# -- text data -------------------------------------------------------------------------------------

def load_tokenizer(path: str) -> Any:
    """The tokenizer saved beside a model (``hf:DIR``'s folder, or a hub name in the local cache)."""
    transformers = require_transformers("Text data (text:, jsonl:, csv:, datasets:)")
    try:
        folder = path if os.path.isdir(path) else model_dir(path)  # a tokenizer-only folder is fine
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ModelSpecError as e:
        raise DataSpecError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - no tokenizer files
        raise DataSpecError(f"No tokenizer could be read from {path!r} ({type(e).__name__}). Save it "
                            f"beside the model (tokenizer.save_pretrained(DIR)) or give --tokenizer DIR.") from None
    if tok.pad_token is None:  # GPT-2, Llama: records of different lengths pad with the end token
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def max_positions(path: str) -> int | None:
    """The longest input a model's config allows (None when it does not say)."""
    try:
        cfg = json.loads(Path(model_dir(path), "config.json").read_text())
    except (OSError, ValueError, ModelSpecError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return None


def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0


def tokenize_text(text: str, tok: Any, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens of ``text``: (windows, 2, seq_len) int64, the
    ids and an all-ones mask. The tail shorter than a window is dropped."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise DataSpecError(f"The text holds {len(ids)} tokens, fewer than one window of --seq-len "
                            f"{seq_len}. Give more text or a smaller --seq-len.")
    w = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return torch.stack([w, torch.ones_like(w)], dim=1)


def tokenize_records(texts: list[str], tok: Any, seq_len: int) -> torch.Tensor:
    """One row per text, with the tokenizer's special tokens, cut at ``seq_len`` and padded to the
    longest: (texts, 2, tokens) int64."""
    enc = tok(texts, truncation=True, max_length=seq_len, padding="longest", return_tensors="pt")
    ids = enc["input_ids"].long()
    mask = enc.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, _pad_id(tok)))
    return torch.stack([ids, mask], dim=1)


def read_records(kind: str, path: str, field: str, label: str | None) -> tuple[list[str], list[Any]]:
    """Texts (and labels, when ``label`` names a field) of a JSON-lines or CSV file."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise DataSpecError(f"The {kind} file {path!r} does not exist. Check --data.")
    rows: list[dict[str, Any]] = []
    if kind == "jsonl":
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataSpecError(f"{path}:{i} is not a JSON object ({e}). Each line of a "
                                        f"jsonl file holds one object.") from None
                if not isinstance(row, dict):
                    raise DataSpecError(f"{path}:{i} holds a {type(row).__name__}, not a JSON object.")
                rows.append(row)
    else:
        with p.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise DataSpecError(f"{path!r} holds no records.")
    for name in (field, label):
        if name is not None and name not in rows[0]:
            raise DataSpecError(f"{path!r} has no field {name!r} (its fields: "
                                f"{', '.join(map(str, list(rows[0])[:8]))}). Use "
                                f"{kind}:FILE:TEXT_FIELD[:LABEL_FIELD].")
    texts = [str(r.get(field, "")) for r in rows]
    labels = [r.get(label) for r in rows] if label is not None else []
    return texts, labels


def read_dataset(path: str, field: str, label: str | None) -> tuple[list[str], list[Any], list[str] | None]:
    """Texts and labels of a Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk``,
    read with ``datasets.load_from_disk`` (nothing is downloaded), and the class names when the
    label column is a ``ClassLabel`` (its labels are then its integer ids); None otherwise."""
    # the spec, not a flag: the same folder may be --data, --calib-data, --holdout-data or --train-data
    spec = f"datasets:{path}:{field}" + (f":{label}" if label else "")
    folder = Path(path)
    if not folder.is_dir():
        raise DataSpecError(f"{spec}: the folder {path!r} does not exist. Give the folder "
                            f"Dataset.save_to_disk wrote.")
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = [str(s) for s in json.loads((folder / "dataset_dict.json").read_text())["splits"]]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        example = f"datasets:{os.path.join(path, 'SPLIT')}:{field}" + (f":{label}" if label else "")
        raise DataSpecError(f"{spec}: {path!r} holds a DatasetDict (splits: {', '.join(splits) or 'none'}), "
                            f"not one data set. Name the split's folder: {example}, SPLIT one of them (a "
                            f"training split only for --train-data).")
    if not (folder / "state.json").is_file():
        raise DataSpecError(f"{spec}: {path!r} is not a folder written by Dataset.save_to_disk (it has "
                            f"no state.json). Give the folder Dataset.save_to_disk wrote.")
    try:
        import datasets
    except ImportError:
        raise DataSpecError(f"{spec}: reading a Hugging Face datasets folder needs the datasets "
                            f"package: pip install datasets.") from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 - a damaged folder, a newer format
        raise DataSpecError(f"{spec}: datasets.load_from_disk cannot read {path!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataSpecError(f"{spec}: {path!r} holds a {type(ds).__name__}, not one Dataset. Give one split's folder.")
    features = ds.features
    columns = list(features)
    for name in (field, label):
        if name is not None and name not in features:
            raise DataSpecError(f"{spec}: {path!r} has no column {name!r} (its columns: "
                                f"{', '.join(columns[:8])}{', ...' if len(columns) > 8 else ''}). Use "
                                f"datasets:DIR:TEXT_COLUMN[:LABEL_COLUMN].")

    def is_text(f: Any) -> bool:
        return isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")

    if not is_text(features[field]):
        strings = [c for c in columns if is_text(features[c])]
        raise DataSpecError(f"{spec}: the column {field!r} holds {features[field]}, not text. Name a string "
                            f"column (its string columns: {', '.join(strings) or 'none'}).")
    if len(ds) == 0:
        raise DataSpecError(f"{spec}: {path!r} holds no records.")
    plain = ds.with_format(None)  # a saved torch/numpy format would hand back tensors
    texts = ["" if t is None else str(t) for t in plain[field]]
    if label is None:
        return texts, [], None
    labels = list(plain[label])
    feature = features[label]
    whole = isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value)
                                                          and feature.dtype.startswith(("int", "uint")))
    if whole and any(v is None or int(v) < 0 for v in labels):  # -1: no label, e.g. a benchmark's test split
        raise DataSpecError(f"{spec}: some records have no label (-1), as in a benchmark's unlabelled "
                            f"test split. Use a labelled split, or leave the label column out of the "
                            f"spec for a task that needs none.")
    if isinstance(feature, datasets.ClassLabel):
        return texts, [int(v) for v in labels], [str(n) for n in feature.names]
    return texts, labels, None


def label_ids(labels: list[Any], path: str) -> tuple[np.ndarray, list[str]]:
    """Labels as class indices and the class names: whole numbers are the model's output indices;
    other values are numbered in sorted order."""
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in labels]
    if all(i is not None and i >= 0 for i in ints):
        y = np.array(ints, dtype=np.int64)
        return y, [str(i) for i in range(int(y.max()) + 1)]
    if any(v is None or v == "" for v in labels):
        raise DataSpecError(f"{path!r} has records without a label. Label every record, or leave "
                            f"the label field out of --data for a task that needs none.")
    classes = sorted({str(v) for v in labels})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[str(v)] for v in labels], dtype=np.int64), classes
