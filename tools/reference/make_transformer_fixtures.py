#!/usr/bin/env python
"""Reference fixtures of laplace-rs for TRANSFORMER graph models with dict (integer) inputs.

    venv/bin/python tools/reference/make_transformer_fixtures.py             # all cases
    venv/bin/python tools/reference/make_transformer_fixtures.py hf_bert     # some cases
    venv/bin/python tools/reference/make_transformer_fixtures.py --export-only [cases]

Cases (float64, seeded from the case name, eval mode, classification C=3), written to
``crates/laplace/tests/fixtures/transformer/<case>/``:

* ``encoder_mha``  nn.Embedding(11,4,padding_idx=0) + learned position nn.Embedding(8,4)
                   (indexed by arange(T)), pre-LN nn.LayerNorm, nn.MultiheadAttention(4, 2,
                   batch_first=True, key_padding_mask = attention_mask == 0), residual,
                   LayerNorm + Linear(4,8)-GELU-Linear(8,4) residual, masked mean pooling,
                   Linear head ``classifier``; N=6, T=6, rows padded with id 0 (no real
                   token is the padding_idx: see README_transformer.md);
* ``decoder_sdpa`` Embedding(11,4) + position Embedding(6,4), nn.RMSNorm, q/k/v nn.Linear
                   (k without bias), F.scaled_dot_product_attention(is_causal=True), o proj,
                   RMSNorm + Linear-GELU(tanh)-Linear, final RMSNorm, Linear ``head`` on the
                   last token; input_ids only (no padding); N=6, T=5;
* ``hf_bert``      transformers.BertForSequenceClassification (hidden 4, 2 heads, 1 layer,
                   intermediate 8, vocab 13, max_position 8, type_vocab 1, eager attention,
                   random init, no download), forward(batch) -> .logits; {input_ids,
                   attention_mask}, rows padded with id 0; N=5, T=6;
* ``hf_gpt2``      transformers.GPT2ForSequenceClassification (n_embd 4, 2 heads, 1 layer,
                   n_inner 8, vocab 13, n_positions 8, pad_token_id 0, eager attention),
                   forward(batch) -> .logits; rows padded at the end; N=5, T=6;
* ``hf_bert_lora`` Laplace-LoRA: hf_bert's model (same weights, batch, labels) wrapped by
                   peft.get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=
                   ["query", "value"], lora_dropout=0.0, modules_to_save=["classifier"])),
                   LoRA A and B redrawn (peft's B = 0); theta = the trainable tensors only
                   (P=47: LoRA A / B of query and value, the classifier copy), every other
                   tensor frozen (requires_grad=False) and a constant of the exported graph.

Every value of expected.safetensors comes from a laplace-torch call with dict inputs
(``dict_key_x="input_ids"``, ``dict_key_y="labels"``): GGNInterface / EFInterface (the
torch.func backends), CurvlinopsEF / CurvlinopsHessian (curvlinops' autodiff operators);
each is compared with this file's own torch.func definition (functional_call over a flat
theta, jacrev over the dict batch; Hessians jacrev(grad)) at rel 1e-10; the script exits 1
on any disagreement. Every Hessian reference is also asserted symmetric (1e-12) and equal
to central finite differences of the gradient on random directions (1e-6). On models with
nn.LayerNorm the Hessians come from CurvlinopsHessian on a copy with LayerNorm written in
elementary ops (ElementaryLayerNorm): torch 2.15's vmapped LayerNorm backward has a wrong
derivative (LN_BUG, README_transformer.md).
KFAC factors (kron.safetensors) come from the hook-based definition below and are
cross-checked with laplace-torch CurvlinopsGGN/CurvlinopsEF.kron (curvlinops'
KFACLinearOperator, kfac_approx 'expand' | 'reduce') on Linear-only copies of each model
(hf_bert_lora: on the model itself, whose trainable tensors are all nn.Linear).
theta is always the trainable parameters in named_parameters() order (laplace-torch's
vectorization); only hf_bert_lora has frozen ones.
laplace-torch findings (what fails on dict inputs and why): README_transformer.md.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.func import functional_call, jacrev
from torch.func import grad as func_grad

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, HERE)

torch.set_default_dtype(torch.float64)
# nn.MultiheadAttention's inference fast path (no grad) returns nested tensors / zeros at
# padded positions; the slow path is what every transform (jacrev, vmap) runs anyway
torch.backends.mha.set_fastpath_enabled(False)

OUT_ROOT = os.path.join(REPO, "crates", "laplace", "tests", "fixtures", "transformer")
RTOL = 1e-10
CASES = ["encoder_mha", "decoder_sdpa", "hf_bert", "hf_gpt2", "hf_bert_lora"]
LIK = "classification"
DKX, DKY = "input_ids", "labels"


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------
# dict batches for laplace-torch
# --------------------------------------------------------------------------

class BatchDict(dict):
    """A dict of batched tensors that laplace-torch 0.3's torch.func ``gradients`` accepts.

    ``CurvatureInterface.gradients`` vmaps a per-sample loss over x and calls
    ``x.unsqueeze(0)`` on the sample, which a plain dict does not have
    (AttributeError). This dict has ``unsqueeze`` (applied to every value) and is a
    registered pytree node, so vmap slices every value along dim 0.
    """

    def unsqueeze(self, dim):
        return BatchDict({k: v.unsqueeze(dim) for k, v in self.items()})


pytree.register_pytree_node(
    BatchDict, lambda d: (list(d.values()), list(d.keys())),
    lambda vals, keys: BatchDict(zip(keys, vals)),
    serialized_type_name="make_transformer_fixtures.BatchDict")


@contextlib.contextmanager
def hf_vmap_safe():
    """Always materialize HuggingFace attention masks while active.

    transformers' mask construction asks ``padding_mask.all()`` (bidirectional) or
    ``fast_all(padding_mask)`` (causal) to decide whether the mask can be skipped in
    favour of SDPA's own ``is_causal``; under ``torch.func.vmap`` over the input that is
    data-dependent control flow and raises. The skip is only a speed-up: with both
    predicates returning False the mask is always built, with the same values.
    """
    try:
        from transformers import masking_utils as mu
    except ImportError:
        yield
        return
    saved = (mu._ignore_bidirectional_mask_sdpa, mu._ignore_causal_mask_sdpa)
    mu._ignore_bidirectional_mask_sdpa = lambda *a, **k: False
    mu._ignore_causal_mask_sdpa = lambda *a, **k: False
    try:
        yield
    finally:
        mu._ignore_bidirectional_mask_sdpa, mu._ignore_causal_mask_sdpa = saved


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------

def seed_of(name):
    return int(hashlib.sha256(("transformer/" + name).encode()).hexdigest()[:8], 16) % (2**31)


class EncoderMHA(nn.Module):
    def __init__(self, vocab=11, d=4, heads=2, ff=8, max_pos=8, num_classes=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_pos, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ff, d)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, batch):
        ids, am = batch["input_ids"], batch["attention_mask"]
        pos = torch.arange(ids.size(1), device=ids.device)
        h = self.tok(ids) + self.pos(pos)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, key_padding_mask=am == 0, need_weights=False)[0]
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        m = am.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.classifier(pooled)


class DecoderSDPA(nn.Module):
    def __init__(self, vocab=11, d=4, heads=2, ff=8, max_pos=5, num_classes=3):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_pos, d)
        self.norm1 = nn.RMSNorm(d)                      # eps=None: machine epsilon
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, ff)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(ff, d)
        self.norm_f = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)

    def _split(self, t):
        return t.reshape(t.size(0), t.size(1), self.heads, -1).transpose(1, 2)

    def forward(self, batch):
        ids = batch["input_ids"]
        pos = torch.arange(ids.size(1), device=ids.device)
        h = self.tok(ids) + self.pos(pos)
        a = self.norm1(h)
        att = F.scaled_dot_product_attention(self._split(self.q(a)), self._split(self.k(a)),
                                             self._split(self.v(a)), is_causal=True)
        att = att.transpose(1, 2).reshape(h.size(0), h.size(1), -1)
        h = h + self.o(att)
        h = h + self.fc2(self.act(self.fc1(self.norm2(h))))
        h = self.norm_f(h)
        return self.head(h[:, -1])


def hf_classes():
    _quiet_transformers()
    from transformers import BertForSequenceClassification, GPT2ForSequenceClassification

    class BertDictClassifier(BertForSequenceClassification):
        """forward(batch dict) -> logits; parameter names as BertForSequenceClassification."""

        def forward(self, batch):
            return super().forward(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits

    class GPT2DictClassifier(GPT2ForSequenceClassification):
        """forward(batch dict) -> logits; parameter names as GPT2ForSequenceClassification."""

        def forward(self, batch):
            return super().forward(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits

    return BertDictClassifier, GPT2DictClassifier


def randomize_(model, w_scale=1.2):
    """Non-trivial weights: norms' affine params away from 1 / 0, Linear ~ w_scale/sqrt(in)."""
    with torch.no_grad():
        for mn, m in model.named_modules():
            for pn, p in m.named_parameters(recurse=False):
                tn = type(m).__name__
                if tn in ("LayerNorm", "RMSNorm"):
                    p.copy_((1.0 + 0.3 * torch.randn_like(p)) if pn == "weight"
                            else 0.2 * torch.randn_like(p))
                elif tn == "Embedding":
                    p.copy_(torch.randn_like(p))
                elif pn.endswith("bias"):
                    p.copy_(0.3 * torch.randn_like(p))
                elif p.ndim == 2:
                    fan_in = p.shape[0] if tn == "Conv1D" else p.shape[1]
                    p.copy_(w_scale * torch.randn_like(p) / math.sqrt(fan_in))
                else:
                    p.copy_(torch.randn_like(p))


def pad_batch(M, T, vocab, lengths, gen_low=1):
    ids = torch.randint(gen_low, vocab, (M, T))
    am = torch.zeros(M, T, dtype=torch.long)
    for n, L in enumerate(lengths):
        am[n, :L] = 1
    ids[am == 0] = 0
    return ids, am


def build_case(name):
    if name == "hf_bert_lora":
        return build_lora_case(name)
    seed = seed_of(name)
    torch.manual_seed(seed)
    glob = None
    if name == "encoder_mha":
        model = EncoderMHA()
        randomize_(model)
        with torch.no_grad():
            model.classifier.weight.mul_(2.0)
        M, T = 6, 6
        ids, am = pad_batch(M, T, 11, [6, 4, 6, 3, 5, 6])
        x = {"input_ids": ids, "attention_mask": am}
        ll = "classifier"
        desc = ("encoder: nn.Embedding(11,4,padding_idx=0) + position nn.Embedding(8,4)"
                "(arange(T)); pre-LN: nn.LayerNorm(4), nn.MultiheadAttention(4, 2 heads, "
                "batch_first=True, key_padding_mask=attention_mask==0, need_weights=False), "
                "residual; nn.LayerNorm(4), Linear(4,8), GELU, Linear(8,4), residual; masked "
                "mean pooling over attention_mask; Linear(4,3) 'classifier'; rows 1,3,4 padded "
                "(lengths 6,4,6,3,5,6, padded ids 0 = padding_idx; no real token is 0)")
    elif name == "decoder_sdpa":
        model = DecoderSDPA()
        randomize_(model)
        with torch.no_grad():
            model.head.weight.mul_(2.0)
        M, T = 6, 5
        x = {"input_ids": torch.randint(0, 11, (M, T))}
        ll = "head"
        desc = ("decoder: nn.Embedding(11,4) + position nn.Embedding(5,4)(arange(T)); "
                "nn.RMSNorm(4, eps=None); q, k (no bias), v nn.Linear(4,4); 2 heads "
                "(reshape, transpose); F.scaled_dot_product_attention(is_causal=True); "
                "transpose, reshape; o nn.Linear(4,4); residual; nn.RMSNorm(4, eps=1e-6), "
                "Linear(4,8), GELU(approximate='tanh'), Linear(8,4), residual; "
                "nn.RMSNorm(4, eps=1e-6); last token h[:, -1]; Linear(4,3) 'head'; "
                "input_ids only, no padding")
    elif name == "hf_bert":
        Bert, _ = hf_classes()
        from transformers import BertConfig
        cfg = BertConfig(vocab_size=13, hidden_size=4, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8, max_position_embeddings=8,
                         type_vocab_size=1, num_labels=3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=0,
                         attn_implementation="eager")
        model = Bert(cfg)
        randomize_(model)
        with torch.no_grad():
            model.classifier.weight.mul_(2.0)
        M, T = 5, 6
        ids, am = pad_batch(M, T, 13, [6, 4, 6, 2, 5])
        x = {"input_ids": ids, "attention_mask": am}
        ll, glob = "classifier", "classifier.*"
        desc = ("transformers.BertForSequenceClassification(BertConfig(vocab_size=13, "
                "hidden_size=4, num_hidden_layers=1, num_attention_heads=2, "
                "intermediate_size=8, max_position_embeddings=8, type_vocab_size=1, "
                "num_labels=3, dropout 0, pad_token_id=0, attn_implementation='eager')), "
                "random init, subclass with forward(batch) = super().forward(input_ids, "
                "attention_mask).logits (absolute position ids, token_type_ids = zeros "
                "buffer, GELU (erf), pooler tanh on token 0); rows 1,3,4 padded with id 0 "
                f"(lengths 6,4,6,2,5); transformers {__import__('transformers').__version__}")
    elif name == "hf_gpt2":
        _, GPT2 = hf_classes()
        from transformers import GPT2Config
        cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=4, n_layer=1, n_head=2,
                         n_inner=8, num_labels=3, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         attn_implementation="eager")
        model = GPT2(cfg)
        randomize_(model)
        with torch.no_grad():
            model.score.weight.mul_(2.0)
        M, T = 5, 6
        ids, am = pad_batch(M, T, 13, [6, 3, 5, 6, 4])
        x = {"input_ids": ids, "attention_mask": am}
        ll, glob = "score", "score.*"
        desc = ("transformers.GPT2ForSequenceClassification(GPT2Config(vocab_size=13, "
                "n_positions=8, n_embd=4, n_layer=1, n_head=2, n_inner=8, num_labels=3, "
                "pad_token_id=0, dropout 0, attn_implementation='eager')), random init, "
                "subclass with forward(batch) = super().forward(input_ids, attention_mask)"
                ".logits (Conv1D projections, gelu_new, causal mask + padding mask; 'score' "
                "Linear(4,3,bias=False) on every position, then the last non-pad token "
                "(input_ids != pad_token_id) is gathered); rows 1,2,4 padded at the end with "
                f"id 0 (lengths 6,3,5,6,4); transformers {__import__('transformers').__version__}")
    else:
        raise KeyError(name)
    model = model.to(torch.float64).eval()
    y = torch.randint(0, 3, (M,))
    return dict(name=name, model=model, x=x, y=y, C=3, likelihood=LIK, description=desc,
                seed=seed, ll=ll, glob=glob, M=M, T=T)


# LoRA (peft) on hf_bert, as laplace-torch users run Laplace-LoRA
LORA_CONFIG = dict(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                   bias="none", modules_to_save=["classifier"])


def build_lora_case(name):
    """hf_bert's model, weights and batch wrapped by peft.get_peft_model(model,
    LoraConfig(**LORA_CONFIG)) (no task_type: PeftModel.forward(*args, **kwargs) passes the
    batch dict through to forward(batch)); theta = the trainable tensors (LoRA A / B of
    query and value, the classifier copy of modules_to_save); every other tensor frozen by
    peft. peft initializes A (kaiming-uniform) and B = 0; both are redrawn N(0,1)/sqrt(fan_in)
    from a generator seeded from the case name, so that B A != 0 and the curvature w.r.t. A is
    not zero."""
    _quiet_transformers()
    import peft
    from peft import LoraConfig, get_peft_model
    base = build_case("hf_bert")          # same weights, batch and labels as hf_bert
    seed = seed_of(name)
    model = get_peft_model(base["model"], LoraConfig(**LORA_CONFIG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    model = model.to(torch.float64).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(".lora_" in n or ".modules_to_save." in n
                                       for n in trainable), trainable
    desc = ("peft.get_peft_model(<the hf_bert model, same weights>, LoraConfig(r=2, "
            "lora_alpha=4 (scaling 2), target_modules=['query', 'value'], lora_dropout=0.0, "
            "bias='none', modules_to_save=['classifier'])) (no task_type: PeftModel.forward "
            "passes the batch dict to forward(batch)); LoRA A, B redrawn N(0,1)/sqrt(fan_in) "
            "(peft's B = 0 init would make the curvature w.r.t. A zero); theta = the 6 trainable "
            "tensors (query / value lora_A (2,4) and lora_B (4,2), the trainable classifier copy "
            "modules_to_save.default (3,4) + (3,)), every other tensor frozen by peft "
            "(requires_grad=False; the frozen classifier.original_module is not used); the "
            "hf_bert batch (rows 1,3,4 padded with id 0, lengths 6,4,6,2,5) and labels; "
            f"peft {peft.__version__}, transformers {__import__('transformers').__version__}")
    return dict(name=name, model=model, x=base["x"], y=base["y"], C=3, likelihood=LIK,
                description=desc, seed=seed, ll="base_model.model.classifier.modules_to_save."
                "default", glob="*lora_B*", M=base["M"], T=base["T"], lora=LORA_CONFIG)


def lora_meta(case, out):
    """meta.json 'lora': the config, theta, and where each frozen tensor is in the export."""
    import peft
    from safetensors import safe_open
    model, x = case["model"], case["x"]
    called, hooks = set(), []
    for mn, m in model.named_modules():
        hooks.append(m.register_forward_hook(lambda mod, i, o, mn=mn: called.add(mn)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    wpath = os.path.join(out, "weights.safetensors")
    wkeys = set()
    if os.path.exists(wpath):
        with safe_open(wpath, "pt") as fh:
            wkeys = set(fh.keys())
    frozen = {"weights": [], "constant": [], "unused": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not os.path.exists(wpath) or n in wkeys, n
            continue
        frozen["weights" if n in wkeys else "constant" if n.rsplit(".", 1)[0] in called
               else "unused"].append(n)
    return {
        "peft": peft.__version__,
        "get_peft_model": ("peft.get_peft_model(model, LoraConfig(" + ", ".join(
            f"{k}={v!r}" for k, v in case["lora"].items()) + ")); no task_type (PeftModel, "
            "forward(*args, **kwargs) -> the wrapped forward(batch)); modules_to_save=['classifier'] "
            "is what peft's task_type='SEQ_CLS' adds by itself (a trainable copy of the head)"),
        "scaling": case["lora"]["lora_alpha"] / case["lora"]["r"],
        "lora_forward": ("base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, dropout = "
                         "nn.Identity (lora_dropout=0.0); exported as Linear (base, frozen), "
                         "Linear (lora_A), Linear (lora_B), mul {scalar: scaling}, add"),
        "theta": [n for n, *_ in layout(model)[0]],
        "frozen_in_weights": frozen["weights"],
        "frozen_folded_into_constants": frozen["constant"],
        "frozen_unused": frozen["unused"],
        "frozen_note": ("frozen tensors are constants of the graph: not in model.json "
                        "'parameters'; those read by a module op (Linear, Embedding, LayerNorm) "
                        "are in weights.safetensors; tables read at constant indices (position "
                        "ids, token_type_ids buffer) are folded into 'constant' nodes; "
                        "classifier.original_module is not called (peft's ModulesToSaveWrapper "
                        "runs the trainable copy modules_to_save.default) and is not exported"),
    }


# --------------------------------------------------------------------------
# nn.LayerNorm in elementary ops (for the Hessian references)
# --------------------------------------------------------------------------

LN_BUG = (
    "torch 2.15 bug: torch.func's batching rule of aten::native_layer_norm_backward computes "
    "grad_weight = sum(grad_out * (x - mean) * rstd) from the saved mean / rstd, which carry no "
    "derivative, so a second derivative taken through a *vmapped* first derivative (jacrev / "
    "jacfwd / torch.func.hessian over jacrev, curvlinops' HVP = vmap(jvp(jacrev)), which "
    "laplace-torch's CurvlinopsHessian calls) misses the mean / rstd terms of d(dL/d "
    "LayerNorm.weight)/d(input): the LayerNorm-weight rows of H are wrong and H is not "
    "symmetric; the transposed entries (and torch.autograd double backward, jacrev(grad)) are "
    "right. README_transformer.md")


class ElementaryLayerNorm(nn.Module):
    """nn.LayerNorm written in elementary ops: (x - mean) / sqrt(var_biased + eps) * weight
    + bias over the normalized_shape dims; the same Parameters under the same names
    (weight, bias), so the model's theta (names, order, values) is unchanged."""

    def __init__(self, ln):
        super().__init__()
        self.normalized_shape, self.eps = tuple(ln.normalized_shape), ln.eps
        self.register_parameter("weight", ln.weight)
        self.register_parameter("bias", ln.bias)

    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        mu = x.mean(dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dims, keepdim=True)
        out = (x - mu) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


def has_layer_norm(model):
    return any(isinstance(m, nn.LayerNorm) for m in model.modules())


def layer_norm_frozen(model):
    """nn.LayerNorm present but none of its tensors trainable (hf_bert_lora): the wrong
    LayerNorm-weight rows of LN_BUG are then not part of theta."""
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return bool(lns) and not any(p.requires_grad for m in lns for p in m.parameters())


def elementary_layer_norm_copy(model, x):
    """A deep copy with every nn.LayerNorm replaced by ElementaryLayerNorm (see LN_BUG)."""
    m = copy.deepcopy(model)
    for mn, mod in list(m.named_modules()):
        if isinstance(mod, nn.LayerNorm):
            set_module(m, mn, ElementaryLayerNorm(mod))
    assert not has_layer_norm(m)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        assert rel(m(x), model(x)) < 1e-14
    return m


# --------------------------------------------------------------------------
# definition (torch.func over a flat theta, the whole dict batch at once)
# --------------------------------------------------------------------------

def layout(model):
    """theta: the trainable parameters (requires_grad) in named_parameters() order, as
    laplace-torch vectorizes them; frozen ones (hf_bert_lora's base weights) are not in it."""
    out, off = [], 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        out.append((n, off, p.numel(), tuple(p.shape)))
        off += p.numel()
    return out, off


def nll_vec(f, y):
    return -torch.log_softmax(f, -1).gather(-1, y.reshape(-1, 1)).squeeze(-1)


def lambda_of(f):
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - torch.einsum("nc,nk->nck", p, p)


def fnmatch_names(model, glob):
    import fnmatch
    return [n for n, p in model.named_parameters()
            if p.requires_grad and fnmatch.fnmatchcase(n, glob)]


def index_of(lay, names):
    return torch.cat([torch.arange(o, o + k) for n, o, k, s in lay if n in names])


def definition(case, x=None, what=None):
    model, y = case["model"], case["y"]
    x = case["x"] if x is None else x
    lay, P = layout(model)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def unflat(t):
        return {n: t[o:o + k].reshape(s) for n, o, k, s in lay}

    def fwd(t):
        return functional_call(model, unflat(t), (x,))

    def losses(t):
        return nll_vec(fwd(t), y)

    with torch.no_grad():
        f = fwd(theta)
    Lam = lambda_of(f)

    def quantities(u0, to_theta, hess=True):
        J = jacrev(lambda u: fwd(to_theta(u)))(u0).detach()
        ggn = torch.einsum("ncp,nck,nkq->pq", J, Lam, J)
        if what == "ggn":
            return J, None, ggn, None, None
        G = jacrev(lambda u: losses(to_theta(u)))(u0).detach()
        # jacrev(grad), not jacrev(jacrev): the inner derivative must not run under vmap
        # (torch 2.15's batched native_layer_norm_backward drops d(dL/d weight)/d input;
        # see elementary_layer_norm_copy and README_transformer.md)
        H = jacrev(func_grad(lambda u: losses(to_theta(u)).sum()))(u0).detach() if hess else None
        return J, G, ggn, G.T @ G, H

    d, info = {}, {"P": P, "layout": lay}
    J, G, ggn, ef, H = quantities(theta, lambda t: t)
    if what == "ggn":
        return {"ggn.diag": ggn.diagonal().clone(), "jacobians.f": f}, info
    loss = losses(theta).sum().detach().reshape(1)
    d.update({"loss": loss, "jacobians.J": J, "jacobians.f": f, "gradients.G": G,
              "gradients.loss": loss.clone(), "ggn.full": ggn, "ggn.diag": ggn.diagonal().clone(),
              "ef.full": ef, "ef.diag": ef.diagonal().clone(), "hessian.full": H,
              "hessian.diag": H.diagonal().clone()})
    # last layer = the final nn.Linear head
    ll = case["ll"]
    ll_names = [n for n, *_ in lay if n.rsplit(".", 1)[0] == ll]
    ll_idx = index_of(lay, ll_names)
    J, G, ggn, ef, H = quantities(theta[ll_idx].clone(), lambda u: theta.index_copy(0, ll_idx, u))
    d.update({"last_layer_jacobians.J": J, "last_layer_jacobians.f": f,
              "last_layer.ggn.full": ggn, "last_layer.ggn.diag": ggn.diagonal().clone(),
              "last_layer.ef.full": ef, "last_layer.ef.diag": ef.diagonal().clone(),
              "last_layer.hessian.full": H})
    # subnetwork (w.r.t. the S coordinates only, in the given order)
    idx = torch.as_tensor(case["subnet"])
    J, G, ggn, ef, H = quantities(torch.zeros(len(idx)), lambda u: theta.index_add(0, idx, u))
    d.update({"subnetwork.jacobians.J": J, "subnetwork.gradients.G": G,
              "subnetwork.ggn.full": ggn, "subnetwork.ggn.diag": ggn.diagonal().clone(),
              "subnetwork.ef.full": ef, "subnetwork.ef.diag": ef.diagonal().clone(),
              "subnetwork.hessian.full": H})
    info.update(ll=ll, ll_names=ll_names, ll_idx=ll_idx, P_ll=len(ll_idx))
    # name-selected subnetwork
    if case["glob"] is not None:
        g_names = fnmatch_names(model, case["glob"])
        gidx = index_of(lay, g_names)
        J, G, ggn, ef, H = quantities(torch.zeros(len(gidx)),
                                      lambda u: theta.index_add(0, gidx, u))
        d.update({"params_glob.jacobians.J": J, "params_glob.gradients.G": G,
                  "params_glob.ggn.full": ggn, "params_glob.ggn.diag": ggn.diagonal().clone(),
                  "params_glob.ef.full": ef, "params_glob.ef.diag": ef.diagonal().clone(),
                  "params_glob.hessian.full": H})
        info.update(glob_names=g_names, glob_idx=gidx)
    return d, info


def make_subnet(model, seed, n_target=40):
    rng = np.random.default_rng(seed + 1)
    lay, P = layout(model)
    frac = n_target / P
    picks = []
    for n, off, k, s in lay:
        m = min(k, max(1, int(round(frac * k))))
        picks.append(off + rng.choice(k, size=m, replace=False))
    idx = rng.permutation(np.concatenate(picks))
    while np.all(np.diff(idx) > 0):
        idx = rng.permutation(idx)
    assert len(np.unique(idx)) == len(idx)
    return idx.astype(np.int64)


# --------------------------------------------------------------------------
# laplace-torch
# --------------------------------------------------------------------------

def rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    nb = torch.linalg.norm(b.reshape(-1))
    diff = torch.linalg.norm((a - b).reshape(-1))
    return float(diff / nb) if nb > 0 else float(diff)


def fmt(e):
    return f"{e:.1e}"


def laplace_values(case, info):
    """{key: [(label, value or error string, factor vs definition)], tried in order}."""
    from laplace.curvature import CurvlinopsEF, CurvlinopsHessian, EFInterface, GGNInterface
    from laplace.utils import FeatureExtractor
    model, x, y, C = case["model"], case["x"], case["y"], case["C"]
    hf = case["name"].startswith("hf_")
    xb = BatchDict(x)
    idx = torch.as_tensor(case["subnet"])
    ll = info["ll"]
    kw = dict(dict_key_x=DKX, dict_key_y=DKY)
    gpt2 = case["name"] == "hf_gpt2"

    def fresh(ll_mode=None, base=None):
        m = copy.deepcopy(model if base is None else base)
        m.output_size = C
        if ll_mode is not None:
            red = None if ll_mode == "plain" else ll_mode
            m = FeatureExtractor(m, last_layer_name=ll, feature_reduction=red)
            m.output_size = C
        return m

    def attempt(label, fn, fac=1.0, post=lambda r: r):
        try:
            with hf_vmap_safe() if label.startswith("[vmap-safe]") else contextlib.nullcontext():
                v = post(fn())
            v = v.detach().clone()
        except Exception as e:  # noqa: BLE001
            v = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return (label, v, fac)

    # the dict variants laplace-torch's vmap-based gradients() is tried with
    ef_inputs = [("x", x, ""), ("BatchDict(x)", xb, "")]
    if hf:
        ef_inputs.append(("BatchDict(x)", xb, "[vmap-safe] "))

    def ef_cands(make, call, post=lambda r: r, what=""):
        return [attempt(f"{pre}{what.format(xn=xn)}", lambda xv=xv: call(make(), xv), 1.0, post)
                for xn, xv, pre in ef_inputs]

    out = {}
    lbl = "GGNInterface(model, 'classification', dict_key_x='input_ids', dict_key_y='labels')"
    out["jacobians.J"] = [attempt(lbl + ".jacobians(x)[0]",
                                  lambda: GGNInterface(fresh(), LIK, **kw).jacobians(x)[0])]
    out["jacobians.f"] = [attempt(lbl + ".jacobians(x)[1]",
                                  lambda: GGNInterface(fresh(), LIK, **kw).jacobians(x)[1])]
    for shape in ("full", "diag"):
        out[f"ggn.{shape}"] = [attempt(f"{lbl}.{shape}(x, y)[1]",
                                       lambda s=shape: getattr(GGNInterface(fresh(), LIK, **kw), s)(x, y)[1])]
        out[f"loss[ggn.{shape}]"] = [attempt(f"{lbl}.{shape}(x, y)[0]",
                                             lambda s=shape: getattr(GGNInterface(fresh(), LIK, **kw), s)(x, y)[0].reshape(1))]
    elbl = "EFInterface(model, 'classification', dict_key_x='input_ids', dict_key_y='labels')"
    out["gradients.G"] = ef_cands(lambda: EFInterface(fresh(), LIK, **kw),
                                  lambda b, xv: b.gradients(xv, y)[0], what=elbl + ".gradients({xn}, y)[0]")
    out["gradients.loss"] = ef_cands(lambda: EFInterface(fresh(), LIK, **kw),
                                     lambda b, xv: b.gradients(xv, y)[1].reshape(1),
                                     what=elbl + ".gradients({xn}, y)[1]")
    for shape in ("full", "diag"):
        out[f"ef.{shape}"] = ef_cands(lambda: EFInterface(fresh(), LIK, **kw),
                                      lambda b, xv, s=shape: getattr(b, s)(xv, y)[1],
                                      what=elbl + f".{shape}({{xn}}, y)[1]")
        out[f"loss[ef.{shape}]"] = ef_cands(lambda: EFInterface(fresh(), LIK, **kw),
                                            lambda b, xv, s=shape: getattr(b, s)(xv, y)[0].reshape(1),
                                            what=elbl + f".{shape}({{xn}}, y)[0]")
    clef = "CurvlinopsEF(model, 'classification', dict_key_x='input_ids')"
    out["ef.full"].append(attempt(clef + ".full(x, y)[1]",
                                  lambda: CurvlinopsEF(fresh(), LIK, **kw).full(x, y)[1]))
    out["ef.diag"].append(attempt("diagonal of " + clef + ".full(x, y)[1]",
                                  lambda: CurvlinopsEF(fresh(), LIK, **kw).full(x, y)[1].diagonal()))

    # ---- last layer
    fe_modes = ["plain"] + (["pick_last"] if gpt2 else [])
    out["last_layer_jacobians.J"], out["last_layer_jacobians.f"] = [], []
    for kind, cls in (("ggn", GGNInterface), ("ef", EFInterface)):
        for shape in ("full", "diag"):
            out[f"last_layer.{kind}.{shape}"] = []
    ll_idx = info["ll_idx"]
    for mode in fe_modes:
        fe = (f"FeatureExtractor(model, last_layer_name={ll!r}"
              + (f", feature_reduction={mode!r}" if mode != "plain" else "") + ")")
        lb = f"GGNInterface({fe}, last_layer=True, dict_key_x='input_ids')"
        out["last_layer_jacobians.J"].append(attempt(
            lb + ".last_layer_jacobians(x)[0]",
            lambda m=mode: GGNInterface(fresh(m), LIK, last_layer=True, **kw).last_layer_jacobians(x)[0]))
        out["last_layer_jacobians.f"].append(attempt(
            lb + ".last_layer_jacobians(x)[1]",
            lambda m=mode: GGNInterface(fresh(m), LIK, last_layer=True, **kw).last_layer_jacobians(x)[1]))
        for shape in ("full", "diag"):
            out[f"last_layer.ggn.{shape}"].append(attempt(
                f"{lb}.{shape}(x, y)[1]",
                lambda m=mode, s=shape: getattr(GGNInterface(fresh(m), LIK, last_layer=True, **kw), s)(x, y)[1]))
            # laplace-torch 0.3's EFInterface with last_layer=True differentiates w.r.t.
            # names that are not the model's ('weight', 'bias'): zeros. Other calls next.
            for xn, xv, pre in ef_inputs:
                out[f"last_layer.ef.{shape}"].append(attempt(
                    f"{pre}EFInterface({fe}, last_layer=True, dict_key_x='input_ids').{shape}({xn}, y)[1]",
                    lambda m=mode, s=shape, xv=xv: getattr(EFInterface(fresh(m), LIK, last_layer=True, **kw), s)(xv, y)[1]))
    fe = f"FeatureExtractor(model, last_layer_name={ll!r})"
    cl = f"CurvlinopsEF({fe}, last_layer=True, dict_key_x='input_ids').full(x, y)[1]"
    out["last_layer.ef.full"].append(attempt(
        cl, lambda: CurvlinopsEF(fresh("plain"), LIK, last_layer=True, **kw).full(x, y)[1]))
    out["last_layer.ef.diag"].append(attempt(
        "diagonal of " + cl,
        lambda: CurvlinopsEF(fresh("plain"), LIK, last_layer=True, **kw).full(x, y)[1].diagonal()))
    # the last layer as a subnetwork (its theta indices): correct whatever the head reads
    sl = "(model, subnetwork_indices=<last-layer indices>, dict_key_x='input_ids')"
    out["last_layer_jacobians.J"].append(attempt(
        f"GGNInterface{sl}.jacobians(x)[0]",
        lambda: GGNInterface(fresh(), LIK, subnetwork_indices=ll_idx, **kw).jacobians(x)[0]))
    out["last_layer_jacobians.f"].append(attempt(
        f"GGNInterface{sl}.jacobians(x)[1]",
        lambda: GGNInterface(fresh(), LIK, subnetwork_indices=ll_idx, **kw).jacobians(x)[1]))
    for shape in ("full", "diag"):
        out[f"last_layer.ggn.{shape}"].append(attempt(
            f"GGNInterface{sl}.{shape}(x, y)[1]",
            lambda s=shape: getattr(GGNInterface(fresh(), LIK, subnetwork_indices=ll_idx, **kw), s)(x, y)[1]))
        out[f"last_layer.ef.{shape}"] += ef_cands(
            lambda: EFInterface(fresh(), LIK, subnetwork_indices=ll_idx, **kw),
            lambda b, xv, s=shape: getattr(b, s)(xv, y)[1], what=f"EFInterface{sl}.{shape}({{xn}}, y)[1]")

    # ---- subnetworks (random index set; name glob)
    subsets = [("subnetwork", idx, "idx")]
    if case["glob"] is not None:
        subsets.append(("params_glob", info["glob_idx"], f"<indices of {case['glob']!r}>"))
    for pre, sidx, sname in subsets:
        sl = f"(model, subnetwork_indices={sname}, dict_key_x='input_ids')"
        out[f"{pre}.jacobians.J"] = [attempt(
            f"GGNInterface{sl}.jacobians(x)[0]",
            lambda s=sidx: GGNInterface(fresh(), LIK, subnetwork_indices=s, **kw).jacobians(x)[0])]
        out[f"{pre}.gradients.G"] = ef_cands(
            lambda s=sidx: EFInterface(fresh(), LIK, subnetwork_indices=s, **kw),
            lambda b, xv: b.gradients(xv, y)[0], what=f"EFInterface{sl}.gradients({{xn}}, y)[0]")
        for shape in ("full", "diag"):
            out[f"{pre}.ggn.{shape}"] = [attempt(
                f"GGNInterface{sl}.{shape}(x, y)[1]",
                lambda s=sidx, sh=shape: getattr(GGNInterface(fresh(), LIK, subnetwork_indices=s, **kw), sh)(x, y)[1])]
            out[f"{pre}.ef.{shape}"] = ef_cands(
                lambda s=sidx: EFInterface(fresh(), LIK, subnetwork_indices=s, **kw),
                lambda b, xv, sh=shape: getattr(b, sh)(xv, y)[1],
                what=f"EFInterface{sl}.{shape}({{xn}}, y)[1]")
    out["loss"] = out.pop("loss[ggn.full]")

    # ---- Hessian (curvlinops' HessianLinearOperator, autodiff; dict via batch_size_fn).
    # On a model with nn.LayerNorm, the call on the model itself is wrong (LN_BUG) and is
    # kept as the first candidate (its error vs the definition is recorded in `sources`);
    # the same call on elementary_layer_norm_copy(model) follows.
    bases = [("model", model)]
    if has_layer_norm(model):
        bases.append(("<copy of model with every nn.LayerNorm replaced by ElementaryLayerNorm "
                      "((x - mean) / sqrt(var_biased + eps) * weight + bias, same Parameters "
                      "and names; LN_BUG)>", elementary_layer_norm_copy(model, x)))
    for key in ("hessian.full", "hessian.diag", "subnetwork.hessian.full",
                "last_layer.hessian.full") + (("params_glob.hessian.full",)
                                              if case["glob"] is not None else ()):
        out[key] = []
    for bname, base in bases:
        hl = f"CurvlinopsHessian({bname}, 'classification', dict_key_x='input_ids').full(x, y)[1]"
        Hres = attempt(hl, lambda b=base: CurvlinopsHessian(fresh(base=b), LIK, **kw).full(x, y)[1])
        H = Hres[1]
        ok = torch.is_tensor(H)
        out["hessian.full"].append(Hres)
        out["hessian.diag"].append(("diagonal of " + hl, H.diagonal().clone() if ok else H, 1.0))
        out["subnetwork.hessian.full"].append(
            (hl + "[idx][:, idx] (laplace-torch has no subnetwork Hessian: CurvlinopsHessian "
             "with subnetwork_indices falls back to CurvatureInterface.full, "
             "NotImplementedError)", H[idx][:, idx] if ok else H, 1.0))
        if case["glob"] is not None:
            gi = info["glob_idx"]
            out["params_glob.hessian.full"].append(
                (hl + f"[<indices of {case['glob']!r}>] rows and columns",
                 H[gi][:, gi] if ok else H, 1.0))
        fe_name = f"FeatureExtractor({bname}, last_layer_name={ll!r})"
        out["last_layer.hessian.full"].append(attempt(
            f"CurvlinopsHessian({fe_name}, last_layer=True, dict_key_x='input_ids').full(x, y)[1]",
            lambda b=base: CurvlinopsHessian(fresh("plain", base=b), LIK, last_layer=True,
                                             **kw).full(x, y)[1]))
    if layer_norm_frozen(model):
        # frozen LayerNorm (hf_bert_lora): the call on the model itself is right as well
        # (LN_BUG's wrong rows are those of the LayerNorm weights, not in theta); keep the
        # ElementaryLayerNorm copy as the reference, as for the other LayerNorm models, and
        # the model itself second (process() reports its agreement)
        for key in ("hessian.full", "hessian.diag", "subnetwork.hessian.full") + (
                ("params_glob.hessian.full",) if case["glob"] is not None else ()):
            out[key] = out[key][::-1]
    return out


def expected_keys(case):
    keys = [
        "loss", "jacobians.J", "jacobians.f", "last_layer_jacobians.J", "last_layer_jacobians.f",
        "gradients.G", "gradients.loss", "ggn.full", "ggn.diag", "ef.full", "ef.diag",
        "last_layer.ggn.full", "last_layer.ggn.diag", "last_layer.ef.full", "last_layer.ef.diag",
        "subnetwork.jacobians.J", "subnetwork.gradients.G", "subnetwork.ggn.full",
        "subnetwork.ggn.diag", "subnetwork.ef.full", "subnetwork.ef.diag",
        "hessian.full", "hessian.diag", "last_layer.hessian.full", "subnetwork.hessian.full",
    ]
    if case["glob"] is not None:
        keys += ["params_glob.jacobians.J", "params_glob.gradients.G", "params_glob.ggn.full",
                 "params_glob.ggn.diag", "params_glob.ef.full", "params_glob.ef.diag",
                 "params_glob.hessian.full"]
    return keys


# --------------------------------------------------------------------------
# KFAC definition (hooks + autograd), project convention
# --------------------------------------------------------------------------

def explicit_mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                         attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention (batch_first, self-attention, no attn_mask) with its two
    projections called as nn.Linear modules: ``self.in_proj_lin`` (the fused
    in_proj_weight / in_proj_bias) and ``self.out_proj``, so that forward hooks see them."""
    assert self.batch_first and attn_mask is None and not is_causal
    assert query is key and key is value
    M, T, E = query.shape
    H = self.num_heads
    q, k, v = self.in_proj_lin(query).chunk(3, dim=-1)
    q, k, v = (t.reshape(M, T, H, E // H).transpose(1, 2) for t in (q, k, v))
    mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.out_proj(o.transpose(1, 2).reshape(M, T, E)), None


def kfac_replica(model):
    """A copy whose nn.MultiheadAttention modules run explicit_mha_forward.

    Returns (copy, {replica parameter name: original parameter name})."""
    m = copy.deepcopy(model)
    for mn, mod in list(m.named_modules()):
        if isinstance(mod, nn.MultiheadAttention):
            E = mod.embed_dim
            lin = nn.Linear(E, 3 * E, bias=mod.in_proj_bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.in_proj_weight)
                if lin.bias is not None:
                    lin.bias.copy_(mod.in_proj_bias)
            del mod.in_proj_weight, mod.in_proj_bias
            mod.in_proj_lin = lin
            mod.forward = types.MethodType(explicit_mha_forward, mod)
    names = {n: n.replace("in_proj_lin.weight", "in_proj_weight")
             .replace("in_proj_lin.bias", "in_proj_bias") for n, _ in m.named_parameters()}
    assert sorted(names.values()) == sorted(n for n, _ in model.named_parameters())
    return m, names


def is_conv1d(m):
    return type(m).__name__ == "Conv1D"


def kfac_records(model, x, y, curv, ref_f):
    """Per Linear / Conv1D module: inputs a (M, R, D) and output vectors g (K, M, R, O);
    per Embedding: indices (M, R) and output vectors g (K, M, R, D)."""
    recs, hooks = {}, []
    M = y.shape[0]
    for mn, m in model.named_modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue                                    # frozen (LoRA base weights)
        if isinstance(m, nn.Linear) or is_conv1d(m):
            def hook(mod, inp, out, mn=mn):
                assert mn not in recs, f"{mn} called twice"
                recs[mn] = dict(module=mod, inp=inp[0].detach(), out=out)
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.Embedding):
            def ehook(mod, inp, out, mn=mn):
                assert mn not in recs, f"{mn} called twice"
                idx = inp[0]
                if idx.dim() == 1:                      # an un-batched index (arange(T))
                    idx, out = idx.unsqueeze(0), out.unsqueeze(0)
                if idx.shape[0] != M:                   # (1, T) position ids: per sample
                    assert idx.shape[0] == 1
                    idx = idx.expand(M, *idx.shape[1:])
                    out = out.expand(M, *out.shape[1:])
                out = out.clone()                       # a per-sample node to differentiate at
                recs[mn] = dict(module=mod, inp=idx.detach(), out=out)
                return out
            hooks.append(m.register_forward_hook(ehook))
    f = model(x)
    for h in hooks:
        h.remove()
    assert rel(f.detach(), ref_f) < 1e-13, f"KFAC replica output differs: {rel(f.detach(), ref_f)}"
    C = f.shape[1]
    fd = f.detach()
    if curv == "ggn":
        p = torch.softmax(fd, -1)
        S = torch.diag_embed(p.sqrt()) - torch.einsum("nc,nk->nck", p, p.sqrt())
        assert rel(S @ S.transpose(1, 2), lambda_of(fd)) < 1e-13
        V = [S[:, :, k] for k in range(C)]
    else:
        V = [torch.softmax(fd, -1) - F.one_hot(y, C).to(fd)]
    names = list(recs)
    outs = [recs[n]["out"] for n in names]
    gs = {n: [] for n in names}
    for k, v in enumerate(V):
        grads = torch.autograd.grad((f * v).sum(), outs, retain_graph=k < len(V) - 1,
                                    allow_unused=True)
        for n, g in zip(names, grads):
            gs[n].append(torch.zeros_like(recs[n]["out"]) if g is None else g.detach())
    res = {}
    for n in names:
        m, a_in = recs[n]["module"], recs[n]["inp"]
        g = torch.stack(gs[n])
        if isinstance(m, nn.Embedding):
            a = a_in.reshape(M, -1)
        else:
            a = a_in.reshape(M, -1, a_in.shape[-1])
        g = g.reshape(g.shape[0], M, -1, g.shape[-1])
        assert a.shape[1] == g.shape[2]
        res[n] = (m, a, g)
    return res


def linear_factors(a, g, approx, N):
    R = a.shape[1]
    if approx == "expand":
        A = torch.einsum("nri,nrj->ij", a, a) / (N * R)
        B = torch.einsum("knri,knrj->ij", g, g)
    else:
        am, gsum = a.mean(1), g.sum(2)
        A = torch.einsum("ni,nj->ij", am, am) / N
        B = torch.einsum("kni,knj->ij", gsum, gsum)
    return A, B


def embed_factors(m, idx, g, N):
    """Embedding as a Linear over one-hot inputs, expand: a = counts / (N R), B = sum gg^T."""
    R = idx.shape[1]
    counts = torch.bincount(idx.reshape(-1), minlength=m.num_embeddings).to(g.dtype)
    a = counts / (N * R)
    if m.padding_idx is not None:
        a[m.padding_idx] = 0.0          # torch gives the padding_idx row no gradient
    B = torch.einsum("knri,knrj->ij", g, g)
    return a, B, counts


def dense(block):
    mats = [torch.diag(t) if t.ndim == 1 else t for t in block]
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def kfac_all(case, d):
    """Blocks in theta order plus the extra (Linear-equivalent) blocks."""
    model, x, y = case["model"], case["x"], case["y"]
    N = y.shape[0]
    rep, names = kfac_replica(model)
    rep_owner = {}
    for mn, m in rep.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            rep_owner[names[f"{mn}.{pn}" if mn else pn]] = (mn, m, pn)
    lay, _ = layout(model)
    tensors, meta, extra_meta = {}, [], []
    with torch.no_grad():
        ref_f = model(x)
    for curv in ("ggn", "ef"):
        recs = kfac_records(rep, x, y, curv, ref_f)
        diag = d[f"{curv}.diag"]
        for approx in ("expand", "reduce"):
            meta = []
            for b, (n, off, k, s) in enumerate(lay):
                mn, m, pn = rep_owner[n]
                omod = dict(model.named_modules()).get(n.rsplit(".", 1)[0] if "." in n else "")
                layer = type(omod).__name__ if omod is not None else type(m).__name__
                fused = isinstance(omod, nn.MultiheadAttention)
                if mn in recs and not isinstance(m, nn.Embedding) and not fused:
                    _, a, g = recs[mn]
                    A, B = linear_factors(a, g, approx, N)
                    if pn == "weight":
                        if is_conv1d(m):
                            blk, kind = [A, B], ("Conv1D weight (in, out): [A, B] = A (x) B on "
                                                 "the (in, out) row-major layout")
                        else:
                            blk, kind = [B, A], "Linear weight: [B, A]"
                        if B.numel() == 1 and A.numel() == 1:
                            blk = [B * A]
                    else:
                        blk, kind = [B], ("Conv1D" if is_conv1d(m) else "Linear") + " bias: [B]"
                    R = a.shape[1]
                else:
                    blk = [diag[off:off + k].clone()]
                    kind = f"{layer} {pn}: [d], d = the exact diagonal (ggn.diag / ef.diag)"
                    R = None
                for fi, t in enumerate(blk):
                    tensors[f"{curv}.{approx}.{b}.{fi}"] = t.contiguous()
                tensors[f"{curv}.{approx}.{b}.product"] = dense(blk).clone()
                meta.append(dict(index=b, param=n, shape=list(s), offset=off, numel=k,
                                 module=n.rsplit(".", 1)[0] if "." in n else "", layer=layer,
                                 block=kind, positions_R=R,
                                 factor_shapes=[list(t.shape) for t in blk]))
                # extra Linear-equivalent blocks: fused MHA in_proj (expand and reduce)
                if fused and mn in recs:
                    _, a, g = recs[mn]
                    A, B = linear_factors(a, g, approx, N)
                    xb = [B, A] if pn == "weight" else [B]
                    for fi, t in enumerate(xb):
                        tensors[f"{curv}.{approx}.linear.{b}.{fi}"] = t.contiguous()
                    tensors[f"{curv}.{approx}.linear.{b}.product"] = dense(xb).clone()
                    if curv == "ggn" and approx == "expand":
                        extra_meta.append(dict(
                            key=f"<ggn|ef>.<expand|reduce>.linear.{b}", param=n,
                            block=("fused in_proj " + pn + " as the nn.Linear(E, 3E) it is: "
                                   + ("[B (3E x 3E), A (E x E)]" if pn == "weight" else "[B]")),
                            factor_shapes=[list(t.shape) for t in xb], positions_R=a.shape[1]))
            # extra Embedding blocks (expand only): [a, B], a = one-hot A's diagonal
        for b, (n, off, k, s) in enumerate(lay):
            mn, m, pn = rep_owner[n]
            if isinstance(m, nn.Embedding) and mn in recs:
                _, idx, g = recs[mn]
                a, B, counts = embed_factors(m, idx, g, N)
                tensors[f"{curv}.embed.{b}.0"] = a.contiguous()
                tensors[f"{curv}.embed.{b}.1"] = B.contiguous()
                tensors[f"{curv}.embed.{b}.product"] = torch.kron(torch.diag(a), B)
                if curv == "ggn":
                    extra_meta.append(dict(
                        key=f"<ggn|ef>.embed.{b}", param=n, block=(
                            "Embedding (vocab, dim) as a Linear over one-hot inputs, expand: "
                            "[a, B], product diag(a) (x) B on the (vocab, dim) row-major table; "
                            f"a = counts / (N*R) with N={N}, R={idx.shape[1]}"
                            + (f"; a[{m.padding_idx}] = 0 (padding_idx: torch gives that row "
                               "no gradient)" if m.padding_idx is not None else "")),
                        counts=[int(c) for c in counts.tolist()],
                        factor_shapes=[[m.num_embeddings], list(B.shape)], positions_R=idx.shape[1]))
    for mb in meta:
        b = mb["index"]
        zs = [c for c in ("ggn", "ef") if float(torch.linalg.norm(tensors[f"{c}.reduce.{b}.product"]))
              < 1e-12 * float(torch.linalg.norm(tensors[f"{c}.expand.{b}.product"]))]
        if zs:
            mb["reduce_structurally_zero"] = (
                f"{'/'.join(zs)} reduce: B is rounding noise (~1e-30): the sum over positions of "
                "this layer's output gradients is exactly 0 mathematically (attention keys: "
                "softmax is invariant to adding one vector to every key); compare with an "
                "absolute tolerance")
    tensors["n_data"] = torch.tensor([float(N)])
    return tensors, meta, extra_meta


# ---- curvlinops cross-checks

class OneHotLinear(nn.Module):
    """An Embedding written as nn.Linear(vocab, dim, bias=False) over one-hot inputs."""

    def __init__(self, emb, M):
        super().__init__()
        self.lin = nn.Linear(emb.num_embeddings, emb.embedding_dim, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(emb.weight.T)
        self.vocab, self.M = emb.num_embeddings, M

    def forward(self, idx):
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.shape[0] != self.M:
            idx = idx.expand(self.M, *idx.shape[1:])
        return self.lin(F.one_hot(idx, self.vocab).to(self.lin.weight.dtype))


class Conv1DAsLinear(nn.Linear):
    pass


def set_module(root, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def curvlinops_kron(m, x, y, C, curv, approx, N):
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
    m.output_size = C
    kw = dict(dict_key_x=DKX, dict_key_y=DKY)
    be = CurvlinopsGGN(m, LIK, stochastic=False, **kw) if curv == "ggn" else CurvlinopsEF(m, LIK, **kw)
    _, kron = be.kron(x, y, N=N, kfac_approx=approx)
    # laplace-torch's block order: named_modules() order, weight then bias
    order = []
    for mn, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters(recurse=False)):
            order.append(f"{mn}.weight")
            if mod.bias is not None:
                order.append(f"{mn}.bias")
    assert len(order) == len(kron.kfacs), (order, len(kron.kfacs))
    return {n: [t.detach().clone() for t in blk] for n, blk in zip(order, kron.kfacs)}


def kron_checks(case, tensors, meta):
    from laplace.curvature import CurvlinopsGGN
    model, x, y, C = case["model"], case["x"], case["y"], case["C"]
    N = y.shape[0]
    checks, problems = {}, []
    try:
        m = copy.deepcopy(model)
        m.output_size = C
        CurvlinopsGGN(m, LIK, stochastic=False, dict_key_x=DKX).kron(x, y, N=N)
        accepted = True
        checks["curvlinops_on_full_model"] = "accepted (unexpected)"
        if all(isinstance(mod, nn.Linear) or not any(
                p.requires_grad for p in mod.parameters(recurse=False))
               for mod in model.modules()):
            # hf_bert_lora: the trainable tensors are LoRA A / B and the classifier copy,
            # all nn.Linear; the copy below is then the model itself (asserted there)
            checks["curvlinops_on_full_model"] = (
                "accepted: every trainable tensor is an nn.Linear weight / bias (the frozen "
                "Embedding / LayerNorm / base Linear tensors are ignored); 'curvlinops_linear' "
                "therefore runs on an unmodified deep copy of the model itself")
    except Exception as e:  # noqa: BLE001
        accepted = False
        checks["curvlinops_on_full_model"] = f"refused: {type(e).__name__}: {str(e)[:150]}"
    except Exception as e:  # noqa: BLE001
        checks["curvlinops_on_full_model"] = f"refused: {type(e).__name__}: {str(e)[:150]}"

    # (1) Linear-only copy: MHA explicit (out_proj / fused in_proj as nn.Linear), Conv1D ->
    #     nn.Linear(in, out) with weight W^T, every non-Linear tensor frozen
    rep, names = kfac_replica(model)
    conv_names = []
    for mn, mod in list(rep.named_modules()):
        if is_conv1d(mod):
            lin = Conv1DAsLinear(mod.weight.shape[0], mod.weight.shape[1], bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_module(rep, mn, lin)
            conv_names.append(mn)
    for mn, mod in rep.named_modules():
        for pn, p in mod.named_parameters(recurse=False):
            p.requires_grad_(isinstance(mod, nn.Linear) and p.requires_grad)
    with torch.no_grad():
        assert rel(rep(x), model(x)) < 1e-13
    if accepted:
        assert not conv_names and names == {n: n for n in names} and [
            n for n, p in rep.named_parameters() if p.requires_grad] == [
            n for n, p in model.named_parameters() if p.requires_grad]
    by_param = {mb["param"]: mb for mb in meta}
    res = {}
    for curv in ("ggn", "ef"):
        for approx in ("expand", "reduce"):
            cl = curvlinops_kron(rep, x, y, C, curv, approx, N)
            errs = {}
            for rn, blk in cl.items():
                mn = rn.rsplit(".", 1)[0]
                pn = rn.rsplit(".", 1)[1]
                orig = rn.replace("in_proj_lin.weight", "in_proj_weight").replace(
                    "in_proj_lin.bias", "in_proj_bias")
                b = by_param[orig]["index"]
                if "in_proj_lin" in rn:
                    mine = tensors[f"{curv}.{approx}.linear.{b}.product"]
                    theirs = dense(blk)
                    tag = orig + " (extra 'linear' block)"
                elif mn in conv_names and pn == "weight":
                    # curvlinops: B (x) A on the (out, in) layout; ours: A (x) B on (in, out)
                    o, i = blk[0].shape[0], blk[1].shape[0]
                    theirs = dense(blk).reshape(o, i, o, i).permute(1, 0, 3, 2).reshape(o * i, o * i)
                    mine = tensors[f"{curv}.{approx}.{b}.product"]
                    tag = orig + " (Conv1D, compared on the (in, out) layout)"
                else:
                    mine, theirs, tag = tensors[f"{curv}.{approx}.{b}.product"], dense(blk), orig
                # floor: a reduce block can be structurally zero (rounding noise ~1e-32), e.g.
                # attention keys: sum_t dl/dk_t = 0 (softmax is shift invariant)
                ekey = f"{curv}.expand.{'linear.' if 'in_proj_lin' in rn else ''}{b}.product"
                scale = float(torch.linalg.norm(tensors[ekey]))
                den = max(float(torch.linalg.norm(theirs)), 1e-8 * scale)
                errs[tag] = float(torch.linalg.norm(mine - theirs)) / den
            res[f"{curv}.{approx}"] = {"max_rel_err_product": max(errs.values()), "per_block": errs}
            if max(errs.values()) > RTOL:
                problems.append(f"curvlinops {curv}.{approx}: max rel err {max(errs.values()):.2e}")
    checks["curvlinops_linear"] = {
        "call": ("laplace-torch Curvlinops{GGN,EF}(copy, 'classification', dict_key_x="
                 "'input_ids').kron(x, y, N=%d, kfac_approx='expand'|'reduce') on a copy in "
                 "which every non-Linear tensor is frozen (requires_grad=False)" % N
                 + ("; nn.MultiheadAttention run with its fused in_proj and out_proj as "
                    "nn.Linear modules (F.multi_head_attention_forward reads out_proj.weight "
                    "directly, so no hook sees it)" if any(isinstance(mm, nn.MultiheadAttention)
                                                           for mm in model.modules()) else "")
                 + ("; HF Conv1D replaced by nn.Linear(in, out) with weight W^T (curvlinops "
                    "does not know Conv1D); the curvlinops B (x) A is permuted to the Conv1D "
                    "(in, out) layout" if conv_names else "")
                 + ("; frozen nn.Linear tensors (LoRA base layers, pooler, the classifier's "
                    "original_module) stay frozen" if any(
                        isinstance(mm, nn.Linear) and not mm.weight.requires_grad
                        for mm in model.modules()) else "")),
        "results": res}

    # (2) Embeddings as one-hot Linears (expand): a vs curvlinops A's diagonal, B vs B
    emb = copy.deepcopy(model)
    M = y.shape[0]
    enames = [mn for mn, mod in emb.named_modules()
              if isinstance(mod, nn.Embedding) and mod.weight.requires_grad]
    if not enames:
        checks["curvlinops_embedding_one_hot"] = "skipped: no trainable nn.Embedding"
        return checks, problems
    pads = {}
    for mn in enames:
        e = emb.get_submodule(mn)
        pads[mn] = e.padding_idx
        set_module(emb, mn, OneHotLinear(e, M))
    for mn, mod in emb.named_modules():
        for pn, p in mod.named_parameters(recurse=False):
            p.requires_grad_(isinstance(mod, nn.Linear) and mn.endswith(".lin")
                             and mn[:-4] in enames)
    with torch.no_grad():
        assert rel(emb(x), model(x)) < 1e-13
    eres = {}
    for curv in ("ggn", "ef"):
        cl = curvlinops_kron(emb, x, y, C, curv, "expand", N)
        errs = {}
        for rn, (Bc, Ac) in cl.items():
            mn = rn[:-len(".lin.weight")]
            b = by_param[f"{mn}.weight"]["index"]
            a_mine, B_mine = tensors[f"{curv}.embed.{b}.0"], tensors[f"{curv}.embed.{b}.1"]
            a_cl = Ac.diagonal().clone()
            off = float((Ac - torch.diag(a_cl)).abs().max())
            if pads[mn] is not None:
                a_cl[pads[mn]] = 0.0
            errs[f"{mn}.weight"] = {"a": rel(a_mine, a_cl), "B": rel(B_mine, Bc),
                                    "A_offdiag_max": off}
            if max(errs[f"{mn}.weight"].values()) > RTOL:
                problems.append(f"curvlinops embed {curv} {mn}: {errs[f'{mn}.weight']}")
        eres[f"{curv}.expand"] = errs
    checks["curvlinops_embedding_one_hot"] = {
        "call": ("laplace-torch Curvlinops{GGN,EF}(...).kron(x, y, N=%d, kfac_approx='expand') "
                 "on a copy with every nn.Embedding replaced by nn.Linear(vocab, dim, "
                 "bias=False)(one_hot(idx)) (weight = table^T; position ids broadcast to the "
                 "batch), only those weights trainable; a compared with the diagonal of "
                 "curvlinops' A (its padding_idx entry set to 0), B with B" % N),
        "results": eres}
    return checks, problems


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def round3(o):
    if isinstance(o, float):
        return o if not math.isfinite(o) else float(f"{o:.3g}")
    if isinstance(o, dict):
        return {k: round3(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [round3(v) for v in o]
    return o


def write_json(path, o):
    with open(path, "w") as fh:
        json.dump(o, fh, indent=1)
        fh.write("\n")


def try_export(case, out):
    """export + graph_interp check; returns (export_check string, ok)."""
    import importlib
    x, model = case["x"], case["model"]
    try:
        import laplace_export
        import graph_interp
        importlib.reload(laplace_export)
        importlib.reload(graph_interp)
        laplace_export.export(model, x, out)
    except Exception as e:  # noqa: BLE001
        for fn in ("model.json", "weights.safetensors"):
            if os.path.exists(os.path.join(out, fn)):
                os.remove(os.path.join(out, fn))
        return f"EXPORT FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", False
    try:
        g = graph_interp.GraphModel.load(out)
        with torch.no_grad():
            f_mod, f_int = model(x), g(dict(x))
        e_int = rel(f_int, f_mod)
    except Exception as e:  # noqa: BLE001
        return (f"exported; graph_interp FAILED: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}"), False
    ok = e_int <= 1e-12
    return (f"graph_interp(model.json, weights.safetensors) vs module output: rel {fmt(e_int)}"
            + ("" if ok else " (> 1e-12: MISMATCH)")), ok


def padding_invariance(case, d):
    """Changing padded token ids must not change ggn.diag (encoder_mha, hf_bert)."""
    x = case["x"]
    am = x["attention_mask"]
    ids2 = x["input_ids"].clone()
    g = torch.Generator().manual_seed(case["seed"] + 7)
    vocab = case["model"].get_input_embeddings().num_embeddings if hasattr(
        case["model"], "get_input_embeddings") else case["model"].tok.num_embeddings
    repl = torch.randint(1, vocab, ids2.shape, generator=g)
    ids2[am == 0] = repl[am == 0]
    assert (ids2 != x["input_ids"]).any()
    d2, _ = definition(case, x={**x, "input_ids": ids2}, what="ggn")
    e_f = rel(d2["jacobians.f"], d["jacobians.f"])
    e = rel(d2["ggn.diag"], d["ggn.diag"])
    assert e <= 1e-12 and e_f <= 1e-12, f"{case['name']}: padding changes ggn.diag: rel {e}"
    return (f"padded input_ids replaced by random ids in [1, {vocab}) ({int((am == 0).sum())} "
            f"positions): ggn.diag rel change {fmt(e)}, logits rel change {fmt(e_f)} (asserted "
            "<= 1e-12)")


HESS_SYM_TOL, HESS_FD_TOL, HESS_FD_DIRS, HESS_FD_EPS = 1e-12, 1e-6, 3, 1e-5


def hessian_checks(case, info, expected):
    """Every Hessian reference: symmetric (max|H - H^T| / max|H| <= 1e-12) and equal to a
    central finite difference of the gradient on HESS_FD_DIRS random unit directions
    v of its coordinates S: |H v - (g_S(th + e v) - g_S(th - e v)) / 2e| / |H v| <= 1e-6,
    g = torch.func.grad of the summed loss (first order, checked against gradients.G);
    hessian.diag = the diagonal of hessian.full. Returns (report, problems)."""
    model, x, y = case["model"], case["x"], case["y"]
    lay, P = info["layout"], info["P"]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def g(t):
        return func_grad(lambda u: nll_vec(functional_call(
            model, {n: u[o:o + k].reshape(s) for n, o, k, s in lay}, (x,)), y).sum())(t)

    problems = []
    e_g = rel(g(theta), expected["gradients.G"].sum(0))
    if e_g > 1e-12:
        problems.append(f"FD gradient disagrees with gradients.G: rel {e_g:.1e}")
    subsets = {"hessian.full": torch.arange(P), "last_layer.hessian.full": info["ll_idx"],
               "subnetwork.hessian.full": torch.as_tensor(case["subnet"])}
    if case["glob"] is not None:
        subsets["params_glob.hessian.full"] = info["glob_idx"]
    gen = torch.Generator().manual_seed(case["seed"] + 13)   # not the global RNG
    report = {"gradient_vs_gradients.G": e_g}
    for key, S in subsets.items():
        H = expected[key]
        asym = float((H - H.T).abs().max() / H.abs().max())
        fds = []
        for _ in range(HESS_FD_DIRS):
            v = torch.randn(len(S), generator=gen)
            v = v / torch.linalg.norm(v)
            dt = torch.zeros(P).index_add(0, S, v)
            fd = (g(theta + HESS_FD_EPS * dt) - g(theta - HESS_FD_EPS * dt))[S] / (2 * HESS_FD_EPS)
            fds.append(rel(fd, H @ v))
        report[key] = {"asym": asym, "fd_rel": max(fds)}
        if asym > HESS_SYM_TOL:
            problems.append(f"{key}: not symmetric, max|H - H^T| / max|H| = {asym:.1e}")
        if max(fds) > HESS_FD_TOL:
            problems.append(f"{key}: disagrees with finite differences of the gradient: "
                            f"rel {max(fds):.1e}")
    if not torch.equal(expected["hessian.diag"], expected["hessian.full"].diagonal()):
        problems.append("hessian.diag is not the diagonal of hessian.full")
    return report, problems


def save_data(case, out):
    arrs = {k: v.numpy().astype(np.int64) for k, v in case["x"].items()}
    np.savez(os.path.join(out, "data.npz"), **arrs, y=case["y"].numpy().astype(np.int64))


def process(name):
    from safetensors.torch import save_file
    case = build_case(name)
    model, x, y = case["model"], case["x"], case["y"]
    case["subnet"] = make_subnet(model, case["seed"])
    out = os.path.join(OUT_ROOT, name)
    os.makedirs(out, exist_ok=True)
    export_check, export_ok = try_export(case, out)

    d, info = definition(case)
    lt = laplace_values(case, info)
    problems, sources, expected, agree = [], {}, {}, {}
    derived = ("hessian.diag", "subnetwork.hessian.full", "params_glob.hessian.full")
    h_at = 0   # index of the chosen hessian.full candidate; the derived keys use the same call
    for key in expected_keys(case):
        ref, bad, chosen = d[key], [], None
        cands = lt[key][h_at:] if key in derived else lt[key]
        for label, val, fac in cands:
            if isinstance(val, str):
                bad.append(f"{label} raised {val}")
                continue
            if tuple(val.shape) != tuple(ref.shape):
                bad.append(f"{label}: shape {tuple(val.shape)} vs {tuple(ref.shape)}")
                continue
            e = rel(val, fac * ref)
            if e > RTOL:
                bad.append(f"{label}: rel {e:.1e} vs the definition")
                continue
            chosen = (label, val, fac, e)
            break
        if chosen is None:
            problems.append(f"{key}: no laplace-torch call agrees: " + "; ".join(bad))
            continue
        label, val, fac, e = chosen
        if key == "hessian.full":
            h_at = [c[0] for c in lt[key]].index(label)
        also = []
        if layer_norm_frozen(model) and "hessian" in key and not key.startswith("last_layer"):
            for lb2, v2, f2 in cands[[c[0] for c in cands].index(label) + 1:]:
                if torch.is_tensor(v2):
                    e2 = rel(v2, f2 * ref)
                    also.append(f"{lb2} (rel {fmt(e2)})")
                    if e2 > RTOL:
                        problems.append(f"{key}: {lb2} disagrees: rel {e2:.1e}")
        expected[key] = (val / fac).contiguous()
        agree[key] = e
        sources[key] = (f"laplace-torch {label}; agrees with the torch.func definition "
                        f"(rel {fmt(e)})."
                        + (" Disagreeing / failing calls tried first: " + "; ".join(bad) + "."
                           if bad else "")
                        + (" Also agreeing (the LayerNorm tensors are frozen, so LN_BUG's wrong "
                           "LayerNorm-weight rows are not part of theta): " + "; ".join(also)
                           + "." if also else ""))
    for k in ("loss[ggn.diag]", "loss[ef.full]", "loss[ef.diag]"):
        vals = [v for _, v, _ in lt[k] if torch.is_tensor(v)]
        if not vals or rel(vals[0], d["loss"]) > RTOL:
            problems.append(f"{k}: disagrees with the definition or failed")
    hchecks, hprob = hessian_checks(case, info, expected)
    problems += hprob
    if has_layer_norm(model):
        for key in [k for k in sources if "ElementaryLayerNorm" in sources[k].split(";")[0]]:
            sources[key] += (" On the ElementaryLayerNorm copy: torch 2.15's vmap batching rule "
                             "of native_layer_norm_backward makes every vmap-based Hessian "
                             "through nn.LayerNorm wrong (meta.json hessian_checks "
                             "'layer_norm_bug', README_transformer.md).")
    touched = sorted({n for n, o, k, s in info["layout"]
                      if np.any((case["subnet"] >= o) & (case["subnet"] < o + k))})
    pad_check = (padding_invariance(case, d)
                 if name in ("encoder_mha", "hf_bert", "hf_bert_lora") else None)

    tensors, kmeta, extra_meta = kfac_all(case, d)
    checks, kprob = kron_checks(case, tensors, kmeta)
    problems += kprob

    # ---- write
    save_data(case, out)
    np.save(os.path.join(out, "subnetwork.npy"), case["subnet"])
    for k, v in expected.items():
        assert v.dtype == torch.float64 and torch.isfinite(v).all(), k
    save_file(expected, os.path.join(out, "expected.safetensors"))
    save_file(tensors, os.path.join(out, "kron.safetensors"),
              metadata={"kron_blocks": json.dumps([[mb["param"]] for mb in kmeta])})
    inputs = {k: {"dtype": "int", "shape": list(v.shape[1:])} for k, v in x.items()}
    meta = {
        "likelihood": LIK, "n_outputs": case["C"], "n_params": info["P"],
        "n_data": int(y.shape[0]), "inputs": inputs, "seq_len": case["T"],
        "description": case["description"] + (
            f"; last layer = module '{info['ll']}' ({info['P_ll']} params: "
            f"{', '.join(info['ll_names'])}); subnetwork: {len(case['subnet'])} indices, "
            f"unsorted, touching {len(touched)} of {len(info['layout'])} tensors; seed "
            f"{case['seed']}"),
        "parameters": [n for n, *_ in info["layout"]],
        "export_check": export_check,
        "sources": sources,
    }
    if case["glob"] is not None:
        meta["params_glob"] = {
            "glob": case["glob"], "matches": info["glob_names"],
            "indices": [int(i) for i in info["glob_idx"]],
            "keys": "params_glob.{jacobians.J, gradients.G, ggn.full, ggn.diag, ef.full, "
                    "ef.diag, hessian.full}: w.r.t. the parameters whose names match the glob "
                    "(fnmatch: '*' any run, '?' one), in theta order"}
    if case.get("lora"):
        meta["lora"] = lora_meta(case, out)
    if pad_check:
        meta["padding_invariance"] = pad_check
    meta["hessian_checks"] = {
        "check": (f"max|H - H^T| / max|H| (asserted <= {HESS_SYM_TOL:g}); fd_rel = max over "
                  f"{HESS_FD_DIRS} random unit directions v of the Hessian's coordinates of "
                  f"|H v - (g(th + e v) - g(th - e v)) / 2e| / |H v|, e = {HESS_FD_EPS:g}, "
                  "g = torch.func.grad of the summed loss (asserted <= "
                  f"{HESS_FD_TOL:g}); hessian.diag == diagonal of hessian.full"),
        **round3(hchecks)}
    if has_layer_norm(model):
        meta["hessian_checks"]["layer_norm_bug"] = LN_BUG + (
            ". Hence: hessian.* / subnetwork / params_glob Hessians = CurvlinopsHessian on a copy "
            "with every nn.LayerNorm replaced by ElementaryLayerNorm; the definition they are "
            "compared with is jacrev(torch.func.grad(sum of losses)) on the model itself")
        if layer_norm_frozen(model):
            meta["hessian_checks"]["layer_norm_bug"] += (
                ". Here every LayerNorm tensor is frozen (not in theta), so the wrong rows are "
                "not part of the Hessian and CurvlinopsHessian on the model itself agrees as well "
                "(sources: 'Also agreeing'); the Hessian still flows through the frozen "
                "LayerNorms to the LoRA tensors upstream of them")
    write_json(os.path.join(out, "meta.json"), meta)
    kmeta_out = {
        "case": name, "likelihood": LIK, "n_data": int(y.shape[0]), "seq_len": case["T"],
        "definition": (
            "tools/reference/make_transformer_fixtures.py kfac_all: forward hooks on every "
            "nn.Linear and HF Conv1D (nn.MultiheadAttention run with its fused in_proj and "
            "out_proj called as nn.Linear modules; checked equal to the model), one autograd "
            "backward per vector; GGN vectors = columns of S = diag(sqrt p) - p sqrt(p)^T; "
            "EF vector = softmax(f) - onehot(y). A Linear over (M, T, D) is a convolution "
            "with R = T positions (padded positions included; R = 1 for a Linear on pooled / "
            "last-token features): expand A = sum_{n,t} a a^T / (N R), B = sum_{n,k,t} g g^T; "
            "reduce A = sum_n abar abar^T / N (abar = mean over t), B = sum_{n,k} gsum gsum^T "
            "(gsum = sum over t). Weight blocks: nn.Linear [B, A] on (out, in); HF Conv1D "
            "[A, B] on its (in, out) weight (A (in x in) first); biases [B]. Every other "
            "tensor (Embedding, LayerNorm / RMSNorm weight and bias, nn.MultiheadAttention "
            "in_proj_weight / in_proj_bias) is [d], d = that tensor's exact ggn.diag / "
            "ef.diag (expected.safetensors)."
            + (" Only modules with a trainable tensor are hooked and have blocks (peft LoRA: "
               "lora_A / lora_B, nn.Linear(in, r) / nn.Linear(r, out) without bias, over the "
               "(M, T, .) sequence, R = T; the classifier copy modules_to_save.default on the "
               "pooled features, R = 1); the frozen tensors are not in theta. g of lora_B is "
               "the gradient w.r.t. lora_B's own output (before * scaling)."
               if case.get("lora") else "")),
        "keys": ("'<ggn|ef>.<expand|reduce>.<b>.<f>': factor f of block b; '<...>.<b>.product': "
                 "dense first (x) second on the row-major flattened tensor (a 1-D factor is a "
                 "diagonal); 'n_data' [1] = N; safetensors metadata 'kron_blocks' = JSON list "
                 "of lists of parameter names per block. Extra keys (not blocks of the "
                 "default layout): '<ggn|ef>.embed.<b>.0' = a (vocab,), '.1' = B (dim, dim), "
                 "'.product' = diag(a) (x) B for Embedding tensor b (expand); "
                 "'<ggn|ef>.<expand|reduce>.linear.<b>.<f>|product' = the nn.Linear block of "
                 "a fused nn.MultiheadAttention in_proj tensor b (weight [B, A], bias [B])."),
        "blocks": kmeta,
        "extra_blocks": extra_meta,
        "checks": round3(checks),
        "problems": problems,
    }
    write_json(os.path.join(out, "kron_meta.json"), kmeta_out)
    for fn in os.listdir(out):
        os.chmod(os.path.join(out, fn), 0o644)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: P={info['P']} keys={len(expected)} kron keys={len(tensors)} size={size} "
          f"problems={len(problems)}; {export_check}", flush=True)
    print(f"  max rel err vs definition: {fmt(max(agree.values()) if agree else float('nan'))}; "
          f"kron vs curvlinops: " + ", ".join(
              f"{k} {fmt(v['max_rel_err_product'])}"
              for k, v in checks["curvlinops_linear"]["results"].items()), flush=True)
    print("  hessian checks: " + ", ".join(
        f"{k} asym {fmt(v['asym'])} fd {fmt(v['fd_rel'])}" for k, v in hchecks.items()
        if isinstance(v, dict)), flush=True)
    if pad_check:
        print("  " + pad_check, flush=True)
    for p in problems:
        print("  PROBLEM:", p, flush=True)
    return not problems, export_ok


def export_only(names):
    ok = True
    for name in names:
        case = build_case(name)
        out = os.path.join(OUT_ROOT, name)
        mp = os.path.join(out, "meta.json")
        if not os.path.exists(mp):
            print(f"{name}: no meta.json (run the full script first)")
            ok = False
            continue
        check, eok = try_export(case, out)
        with open(mp) as fh:
            meta = json.load(fh)
        meta["export_check"] = check
        write_json(mp, meta)
        for fn in os.listdir(out):
            os.chmod(os.path.join(out, fn), 0o644)
        print(f"{name}: {check}", flush=True)
        ok &= eok
    return ok


def main(argv):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if argv and argv[0] == "--export-only":
        with sdpa_kernel(SDPBackend.MATH):
            ok = export_only(argv[1:] or CASES)
        sys.exit(0 if ok else 2)
    names = argv or CASES
    ok, exp_ok = True, True
    for n in names:
        # the math SDPA backend is twice differentiable; CPU flash attention's backward
        # ('_scaled_dot_product_flash_attention_for_cpu_backward') has no derivative, so
        # no Hessian (torch.func or curvlinops) runs through it
        with sdpa_kernel(SDPBackend.MATH):
            a, b = process(n)
        ok &= a
        exp_ok &= b
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT_ROOT) for f in fs)
    print(f"total size of {OUT_ROOT}: {total} bytes")
    if not ok:
        print("SOME CHECKS FAILED", file=sys.stderr)
        sys.exit(1)
    if not exp_ok:
        print("EXPORT FAILED for some cases (everything else written); rerun with "
              "--export-only later", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
