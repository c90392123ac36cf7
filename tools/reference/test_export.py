#!/usr/bin/env python
"""Self-test of tools/laplace_export.py ``export`` (graph form) and graph_interp.py.

    venv/bin/python tools/reference/test_export.py

Round trips (module output == interpreter output, float64, rel <= 1e-12) for torchvision
resnet18 / mobilenet_v3_small (weights=None, random BN statistics, eval mode, 3x32x32),
the graph fixture models of make_graph_fixtures.py and small models exercising the
functional ops; then the refusals (unsupported op / module named with its module path,
training-mode BN / Dropout, a module called twice, training dropout) and the
interpreter's strictness. The same models through the torch.export path (tracer="export").

Transformers (the torch.export path, docs/model-format.md "Transformer ops and integer
inputs"), float64 round trips at rel <= 1e-12 with a padded batch {input_ids,
attention_mask} (rows of lengths 9, 6, 3, 9), the float32 export, and padding invariance
(changed padded token ids leave the rows' outputs unchanged, interpreter and module):
(a) an encoder with nn.MultiheadAttention (mean pooling / CLS) and nn.TransformerEncoder,
(b) a decoder block with nn.RMSNorm and causal F.scaled_dot_product_attention (mean pooling
/ last non-padded token), (c) HF BertForSequenceClassification (eager, sdpa), (d) HF
GPT2ForSequenceClassification (eager, sdpa; no padding invariance: GPT-2 finds the last
token by pad_token_id); refusals of the torch.export path and the interpreter's
strictness on the new ops.

peft LoRA (Laplace-LoRA as laplace-torch users run it: get_peft_model, base weights frozen,
theta = the adapters): (e) LoRA on BERT query / value with modules_to_save=['classifier'],
(f) LoRA on GPT-2's Conv1D c_attn (laplace-torch's huggingface example), (g) a float-input
MLP (torch.fx cannot trace PeftModel: auto -> torch.export), (h) peft wrapping an HF model
called as model(**batch); frozen tensors are constants (not in "parameters", read by
module ops from weights.safetensors), each adapter is Linear(lora_A), Linear(lora_B),
mul {scalar: lora_alpha / r}, add.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import graph_interp  # noqa: E402
import make_graph_fixtures as mg  # noqa: E402
from laplace_export import ExportError, export, graph_spec  # noqa: E402

torch.set_default_dtype(torch.float64)
FAILS = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        FAILS.append(msg)


def roundtrip(name, model, x, output_key=None, tracer="auto"):
    with tempfile.TemporaryDirectory() as d:
        spec = export(model, x, d, output_key=output_key, tracer=tracer)
        g = graph_interp.GraphModel.load(d)
        with torch.no_grad():
            ref = model(x)
            if output_key is not None:
                ref = ref[output_key]
            out = g(x)
        e = float((out - ref).norm() / ref.norm())
        size = os.path.getsize(os.path.join(d, "weights.safetensors"))
    ops = sorted({n["op"] for n in spec["nodes"]})
    check(e <= 1e-12, f"{name}: interpreter vs module rel {e:.1e} ({len(spec['nodes'])} nodes, "
                      f"P={sum(p.numel() for p in model.parameters())}, weights {size} B, ops {ops})")
    check(spec["parameters"] == [n for n, p in model.named_parameters() if p.requires_grad],
          f"{name}: parameters list = named_parameters order")
    return spec


def raises(name, fn, *needles, exc=Exception):
    try:
        fn()
    except exc as e:  # noqa: BLE001
        msg = str(e)
        check(all(n in msg for n in needles), f"{name}: raised {type(e).__name__}: {msg[:160]}")
        return
    check(False, f"{name}: did not raise")


# ------------------------------------------------------------------ models
class Ops(nn.Module):
    """Functional ops: size()-based view, getitem slice/select, scalar reverse ops,
    transpose, sum, unsqueeze/squeeze, torch.add, dict input, dict output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, batch):
        x, z = batch["image"], batch["extra"]
        h = F.relu6(self.conv(x))                       # (M, 4, 5, 5)
        h = h[:, 1:4, ::2, -1]                          # (M, 3, 3)  slice, slice, select
        h = 1.0 - h.transpose(1, 2) / 2                 # reverse sub, div
        h = h.contiguous().view(h.size(0), -1)          # (M, 9)
        h = torch.add(h[..., :6], z).unsqueeze(1).squeeze(1)
        h = self.bn(F.leaky_relu(h, 0.2)) + torch.sigmoid(h).sum(-1, keepdim=True)
        return {"logits": self.fc(F.gelu(-h, approximate="tanh")), "aux": h}


class Interp(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 2, 3), Up())
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class Up(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class FDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.3))


# ------------------------------------------------------------------ transformer models
VOCAB, T_MAX = 40, 16


class EncBlock(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, H, dropout=0.1, batch_first=True)
        self.ln2 = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.drop = nn.Dropout(0.1)

    def forward(self, h, kpm):
        x = self.ln1(h)
        h = h + self.drop(self.attn(x, x, x, key_padding_mask=kpm)[0])
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class EncoderClassifier(nn.Module):
    """(a) token + learned position embedding (constant arange), pre-LN blocks with
    nn.MultiheadAttention(batch_first=True, key_padding_mask from attention_mask), GELU MLP,
    final LayerNorm, masked mean pooling or the CLS (first) token, Linear head."""

    def __init__(self, D=16, H=2, C=3, L=2, pool="mean"):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D, padding_idx=0)
        self.pos = nn.Embedding(T_MAX, D)
        self.blocks = nn.ModuleList([EncBlock(D, H) for _ in range(L)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, C)
        self.pool = pool

    def forward(self, batch):
        ids, am = batch["input_ids"], batch["attention_mask"]
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        kpm = am == 0
        for b in self.blocks:
            h = b(h, kpm)
        h = self.norm(h)
        if self.pool == "mean":
            m = am.unsqueeze(-1).to(h.dtype)
            h = (h * m).sum(1) / m.sum(1)
        else:
            h = h[:, 0]
        return self.head(h)


class DecoderClassifier(nn.Module):
    """(b) Embedding, RMSNorm, q/k/v Linears, heads, F.scaled_dot_product_attention(
    is_causal=True), tanh-GELU MLP, masked mean pooling or the last non-padded token
    (x[arange(B), lengths - 1]), Linear head."""

    def __init__(self, D=16, H=2, C=3, pool="mean"):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm1 = nn.RMSNorm(D)
        self.q, self.k, self.v = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.o = nn.Linear(D, D)
        self.norm2 = nn.RMSNorm(D, eps=1e-6)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, C)
        self.H, self.pool = H, pool

    def forward(self, batch):
        ids, am = batch["input_ids"], batch["attention_mask"]
        B, T = ids.shape
        h = self.emb(ids)
        x = self.norm1(h)
        q, k, v = (f(x).view(B, T, self.H, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h)), approximate="tanh"))
        if self.pool == "mean":
            m = am.unsqueeze(-1).to(h.dtype)
            h = (h * m).sum(1) / m.sum(1)
        else:
            h = h[torch.arange(B), am.sum(1) - 1]
        return self.head(h)


class HFWrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, batch):
        return self.m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def bert(impl):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=T_MAX, num_labels=3,
                     pad_token_id=0)
    cfg._attn_implementation = impl
    return HFWrap(BertForSequenceClassification(cfg)).eval()


def gpt2(impl):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=T_MAX,
                     num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = impl
    return HFWrap(GPT2ForSequenceClassification(cfg)).eval()


def token_batch(lengths=(9, 6, 3, 9), T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    am = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
    ids[am == 0] = 0                                   # pad token 0, right padding
    return {"input_ids": ids, "attention_mask": am}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def transformer_case(name, make, padinv=True, tol32=1e-5):
    """Round trip in float64 (<= 1e-12) and float32, ops, padding invariance."""
    from collections import Counter
    torch.manual_seed(0)
    model = make()
    batch = token_batch()
    with tempfile.TemporaryDirectory() as d:
        spec = export(model, batch, d)
        g = graph_interp.GraphModel.load(d)
        with torch.no_grad():
            ref, out = model(batch), g(batch)
    ops = dict(sorted(Counter(n["op"] for n in spec["nodes"]).items()))
    check(rel(out, ref) <= 1e-12, f"{name}: interpreter vs module rel {rel(out, ref):.1e} "
          f"({len(spec['nodes'])} nodes, P={sum(p.numel() for p in model.parameters())})")
    print(f"     {name} ops: {ops}")
    check([(i["name"], i["dtype"]) for i in spec["inputs"]] ==
          [("input_ids", "int"), ("attention_mask", "int")], f"{name}: integer inputs by name")
    check(spec["parameters"] == [n for n, p in model.named_parameters() if p.requires_grad],
          f"{name}: parameters list = named_parameters order")
    if padinv:
        b2 = {k: v.clone() for k, v in batch.items()}
        pad = b2["attention_mask"] == 0
        b2["input_ids"][pad] = torch.randint(3, VOCAB, (int(pad.sum()),),
                                             generator=torch.Generator().manual_seed(7))
        rows = pad.any(1)
        with torch.no_grad():
            out2, ref2 = g(b2), model(b2)
        e_g, e_m = rel(out2[rows], out[rows]), rel(ref2[rows], ref[rows])
        check(e_g <= 1e-12 and e_m <= 1e-12 and rel(out2, ref2) <= 1e-12,
              f"{name}: padding invariance, changed padded tokens of rows "
              f"{rows.nonzero().view(-1).tolist()}: graph rel {e_g:.1e}, module rel {e_m:.1e}")
    # float32
    torch.manual_seed(0)
    m32 = make().float().eval()
    with tempfile.TemporaryDirectory() as d:
        export(m32, batch, d)
        g32 = graph_interp.GraphModel.load(d)
        with torch.no_grad():
            r32, o32 = m32(batch), g32(batch)
        w32 = {str(t.dtype) for t in g32.tensors.values()}
    check(o32.dtype == torch.float32 and w32 == {"torch.float32"} and rel(o32, r32) <= tol32,
          f"{name}: float32 export, interpreter vs module rel {rel(o32, r32):.1e}")
    return spec


class SortMix(nn.Module):
    def forward(self, h):
        return torch.sort(h, dim=-1).values


class WithSort(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.mix = SortMix()
        self.fc = nn.Linear(4, 2)

    def forward(self, batch):
        return self.fc(self.mix(self.emb(batch["input_ids"])).mean(1))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.out = nn.Linear(4, VOCAB, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, batch):
        return self.out(self.emb(batch["input_ids"]).mean(1))


class EmbTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, batch):
        return self.fc((self.emb(batch["input_ids"]) + self.emb(batch["input_ids"] + 1)).mean(1))


class FunctionalParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.W = nn.Parameter(torch.randn(4, 2))

    def forward(self, batch):
        return (self.emb(batch["input_ids"]) @ self.W).mean(1)


class MergeBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.proj = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, batch):
        h = self.emb(batch["input_ids"])
        B, T, D = h.shape
        h = self.proj(h.reshape(B * T, D)).reshape(B, T, D)
        return self.fc(h.mean(1))


class CrossAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, batch):
        h = self.emb(batch["input_ids"])
        return self.fc(self.attn(h, h[:, :2], h[:, :2])[0].mean(1))


def transformer_tests():
    transformer_case("(a) encoder, nn.MultiheadAttention, mean pooling",
                     lambda: EncoderClassifier(pool="mean").eval())
    transformer_case("(a) encoder, nn.MultiheadAttention, CLS token",
                     lambda: EncoderClassifier(pool="cls").eval())
    transformer_case("(a') nn.TransformerEncoder(norm_first, src_key_padding_mask), CLS",
                     lambda: TELClassifier().eval())
    transformer_case("(b) decoder, RMSNorm, causal SDPA, mean pooling",
                     lambda: DecoderClassifier(pool="mean").eval())
    transformer_case("(b) decoder, RMSNorm, causal SDPA, last non-padded token",
                     lambda: DecoderClassifier(pool="last").eval())
    for impl in ("eager", "sdpa"):
        transformer_case(f"(c) BertForSequenceClassification, {impl}", lambda: bert(impl))
    for impl in ("eager", "sdpa"):
        spec = transformer_case(f"(d) GPT2ForSequenceClassification, {impl}",
                                lambda: gpt2(impl), padinv=False)
        lin = [n for n in spec["nodes"] if n["op"] == "Linear"]
        check(all(n["attrs"].get("weight_layout") == "in_out" for n in lin[:-1]) and
              "weight_layout" not in lin[-1]["attrs"] and
              any(n["op"] == "GELU" and n["attrs"]["approximate"] == "tanh"
                  for n in spec["nodes"]) and spec["nodes"][-1]["op"] == "index",
              f"(d) GPT2 {impl}: Conv1D -> Linear in_out, NewGELU -> GELU tanh, "
              "last non-padded token -> index")

    # HF model called as model(**batch) with a ModelOutput: output_key picks the logits
    torch.manual_seed(0)
    m = bert("sdpa").m
    batch = token_batch()
    with tempfile.TemporaryDirectory() as d:
        export(m, batch, d, output_key="logits")
        with torch.no_grad():
            e = rel(graph_interp.GraphModel.load(d)(batch), m(**batch).logits)
    check(e <= 1e-12, f"(c') BertForSequenceClassification(**batch), output_key='logits': "
          f"rel {e:.1e}")
    # Llama family: HF LlamaRMSNorm -> RMSNorm, rotary cos / sin folded, GQA via expand
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                      max_position_embeddings=T_MAX, num_labels=3, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    m = HFWrap(LlamaForSequenceClassification(cfg)).eval()
    with tempfile.TemporaryDirectory() as d:
        spec = export(m, batch, d)
        g = graph_interp.GraphModel.load(d)
        with torch.no_grad():
            out, ref = g(batch), m(batch)
    check(rel(out, ref) <= 1e-6 and sum(n["op"] == "RMSNorm" for n in spec["nodes"]) == 5,
          f"(extra) LlamaForSequenceClassification sdpa: rel {rel(out, ref):.1e} (HF's "
          "LlamaRMSNorm computes in float32 inside the float64 model; the graph in float64)")
    # a float-input model that torch.fx cannot export (nn.LayerNorm): auto -> torch.export
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)).eval()
    spec = roundtrip("auto: float-input LayerNorm MLP (torch.fx refuses, torch.export path)",
                     mlp, torch.randn(3, 4))
    check([n["op"] for n in spec["nodes"]] == ["Linear", "LayerNorm", "GELU", "Linear"],
          "auto fallback: ops Linear, LayerNorm, GELU, Linear")

    # ---------------------------------------------------------- refusals (torch.export path)
    d = tempfile.mkdtemp()
    batch = token_batch()
    raises("export: unsupported op named with node and module path",
           lambda: export(WithSort().eval(), batch, d), "aten.sort", "mix", "sort",
           exc=ExportError)
    raises("export: tied (shared) parameters", lambda: export(Tied().eval(), batch, d),
           "same tensor", exc=ExportError)
    raises("export: Embedding called twice", lambda: export(EmbTwice().eval(), batch, d),
           "emb.weight", "two module ops", exc=ExportError)
    raises("export: parameter used functionally",
           lambda: export(FunctionalParam().eval(), batch, d), "'W'", "outside a module op",
           exc=ExportError)
    raises("export: reshape merging the batch axis",
           lambda: export(MergeBatch().eval(), batch, d), "batch axis", exc=ExportError)
    raises("export: MultiheadAttention cross-attention",
           lambda: export(CrossAttn().eval(), batch, d), "self-attention", "attn",
           exc=ExportError)
    raises("export: training-mode Dropout", lambda: export(EncoderClassifier().train(), batch, d),
           "model.eval()", exc=ValueError)

    # ---------------------------------------------------------- interpreter strictness (new ops)
    torch.manual_seed(0)
    m = EncoderClassifier().eval()
    spec = export(m, batch, d)
    tensors = graph_interp.GraphModel.load(d).tensors
    g = graph_interp.GraphModel(spec, tensors)
    bad_ids = {k: v.clone() for k, v in batch.items()}
    bad_ids["input_ids"][0, 0] = VOCAB
    raises("interp: Embedding index out of range", lambda: g(bad_ids), "out of range")
    raises("interp: missing named input", lambda: g({"input_ids": batch["input_ids"]}),
           "attention_mask")
    big = {k: v.clone() for k, v in batch.items()}
    big["attention_mask"][0, 0] = 2 ** 24
    g32 = graph_interp.GraphModel(spec, {k: v.float() for k, v in tensors.items()})
    raises("interp: integer not exact in float32", lambda: g32(big), "not exact")
    raises("interp: float array for an int input",
           lambda: g({**batch, "input_ids": batch["input_ids"].double()}), "integer")
    for op, key, val, needle in (("LayerNorm", "foo", 1, "foo"),
                                 ("Embedding", "max_norm", 1.0, "max_norm"),
                                 ("scaled_dot_product_attention", "dropout_p", 0.1, "dropout_p"),
                                 ("constant", "data", [1.0], "numbers for shape")):
        bad = json.loads(json.dumps(spec))
        nd = next(n for n in bad["nodes"] if n["op"] == op)
        nd["attrs"][key] = val
        if op == "constant":
            raises(f"interp: {op} with a wrong data length",
                   lambda: graph_interp.GraphModel(bad, tensors)(batch), needle)
        else:
            raises(f"interp: unknown attr {key} of {op}",
                   lambda: graph_interp.GraphModel(bad, tensors), needle)
    bad = json.loads(json.dumps(spec))
    nd = next(n for n in bad["nodes"] if n["op"] == "Embedding")
    del nd["attrs"]["num_embeddings"]
    raises("interp: missing attr", lambda: graph_interp.GraphModel(bad, tensors),
           "num_embeddings")
    bad = json.loads(json.dumps(spec))
    bad["nodes"].insert(1, {"name": "w3", "op": "where", "inputs": [bad["nodes"][0]["name"]],
                            "attrs": {"a": 1.0}})
    raises("interp: where with two operands", lambda: graph_interp.GraphModel(bad, tensors),
           "two operands")


def lora_randomize_(m):
    """peft initializes lora_B = 0 (the adapter then adds nothing): draw it."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.5 * torch.randn_like(p))
    return m.eval()


def lora_structure(name, model, x, scaling, targets, conv1d=False, output_key=None):
    """theta = the trainable tensors; frozen ones are constants read from the weights file;
    each target module is base Linear + Linear(lora_A) -> Linear(lora_B) -> mul -> add, lora_A
    reading the base layer's input (lora_dropout is the identity in eval mode)."""
    spec, state = graph_spec(model, x, output_key)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    read = [t for nd in spec["nodes"] for t in nd.get("params", {}).values()]
    check(spec["parameters"] == trainable and all(".lora_" in n or ".modules_to_save." in n
                                                  for n in trainable),
          f"{name}: parameters = the {len(trainable)} trainable (LoRA / modules_to_save) tensors")
    fr = [t for t in read if t in frozen]
    check(fr and set(read) == set(state) and not set(fr) & set(spec["parameters"]),
          f"{name}: {len(fr)} frozen tensors read by module ops are in weights.safetensors "
          "and not in 'parameters' (constants)")
    ok = True
    for t in targets:
        la = [nd for nd in spec["nodes"] if nd.get("module", "").endswith(f"{t}.lora_A.default")]
        lb = [nd for nd in spec["nodes"] if nd.get("module", "").endswith(f"{t}.lora_B.default")]
        base = [nd for nd in spec["nodes"] if nd.get("module", "").endswith(f"{t}.base_layer")]
        if not (len(la) == len(lb) == len(base) == 1 and la[0]["op"] == lb[0]["op"] == "Linear"
                and lb[0]["inputs"] == [la[0]["name"]]):
            ok = False
            continue
        mul = [nd for nd in spec["nodes"] if nd["op"] == "mul" and nd["inputs"] == [lb[0]["name"]]]
        add = [nd for nd in spec["nodes"] if nd["op"] == "add" and mul and
               sorted(nd["inputs"]) == sorted([base[0]["name"], mul[0]["name"]])]
        ok &= (len(mul) == 1 and mul[0]["attrs"].get("scalar") == scaling and len(add) == 1
               and all(v in frozen for v in base[0]["params"].values())
               and (base[0]["attrs"].get("weight_layout") == "in_out") == conv1d)
        ok &= la[0]["inputs"] == base[0]["inputs"]      # eval dropout: the same x
    check(ok, f"{name}: each of {len(targets)} adapted modules is Linear(base, frozen"
              f"{', Conv1D in_out' if conv1d else ''}) + Linear(lora_A) -> Linear(lora_B) -> "
              f"mul {{scalar: {scaling}}} -> add")


def peft_tests():
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        check(False, "peft LoRA: peft is not installed (tools/requirements.txt)")
        return

    def lora_bert():
        return lora_randomize_(get_peft_model(bert("eager"), LoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.1,
            modules_to_save=["classifier"])))

    def lora_gpt2():
        return lora_randomize_(get_peft_model(gpt2("eager"), LoraConfig(
            r=4, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.1, bias="none")))

    transformer_case("(e) peft LoRA BERT (query, value; modules_to_save classifier)", lora_bert)
    torch.manual_seed(0)
    lora_structure("(e) peft LoRA BERT", lora_bert(), token_batch(), 2.0,
                   [f"layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")])
    transformer_case("(f) peft LoRA GPT-2 (Conv1D c_attn, laplace-torch's example)", lora_gpt2,
                     padinv=False)
    torch.manual_seed(0)
    lora_structure("(f) peft LoRA GPT-2", lora_gpt2(), token_batch(), 4.0,
                   [f"h.{i}.attn.c_attn" for i in range(2)], conv1d=True)
    torch.manual_seed(0)
    mlp = lora_randomize_(get_peft_model(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        LoraConfig(r=2, lora_alpha=2, target_modules=["0"])))
    xf = torch.randn(3, 4)
    roundtrip("(g) peft LoRA float-input MLP (auto: torch.fx cannot trace PeftModel, "
              "torch.export path)", mlp, xf)
    lora_structure("(g) peft LoRA MLP", mlp, xf, 1.0, ["0"])
    torch.manual_seed(0)
    m = lora_randomize_(get_peft_model(bert("sdpa").m, LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"])))
    batch = token_batch()
    with tempfile.TemporaryDirectory() as d:
        export(m, batch, d, output_key="logits")
        with torch.no_grad():
            e = rel(graph_interp.GraphModel.load(d)(batch), m(**batch).logits)
    check(e <= 1e-12, "(h) peft LoRA on BertForSequenceClassification called as "
          f"model(**batch) (PeftModel.forward(*args, **kwargs)), output_key='logits': rel {e:.1e}")


class TELClassifier(nn.Module):
    def __init__(self, D=16, C=3):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, 2, 32, batch_first=True, norm_first=True), 2,
            enable_nested_tensor=False)
        self.head = nn.Linear(D, C)

    def forward(self, batch):
        h = self.enc(self.tok(batch["input_ids"]),
                     src_key_padding_mask=batch["attention_mask"] == 0)
        return self.head(h[:, 0])


def torchvision_models():
    import torchvision
    out = []
    for name, mk in (("resnet18", torchvision.models.resnet18),
                     ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small)):
        torch.manual_seed(0)
        m = mk(weights=None, num_classes=10)
        mg.randomize_bn_(m, 0.1)
        out.append((name, m.eval()))
    return out


def main():
    torch.manual_seed(0)
    x32 = torch.randn(2, 3, 32, 32)
    for name, m in torchvision_models():
        spec = roundtrip(name, m, x32)
        if name == "mobilenet_v3_small":
            ops = [n["op"] for n in spec["nodes"]]
            groups = [n["attrs"]["groups"] for n in spec["nodes"] if n["op"] == "Conv2d"]
            check(all(o in ops for o in ("Hardswish", "Hardsigmoid", "mul", "AdaptiveAvgPool2d",
                                         "Dropout", "Flatten")) and max(groups) > 1,
                  "mobilenet_v3_small: depthwise conv, Hardswish, Hardsigmoid, SE mul, pooling, "
                  "Dropout, flatten present")
    for name in mg.CASES:
        c = mg.build_case(name)
        roundtrip(f"fixture {name}", c["model"], c["x"])
    roundtrip("GroupedConvNoBN", mg.GroupedConvNoBN().eval(), torch.randn(3, 4, 6, 6))
    ops_model = Ops().eval()
    mg.randomize_bn_(ops_model)
    batch = {"image": torch.randn(3, 3, 5, 5), "extra": torch.randn(3, 6)}
    spec = roundtrip("functional ops, dict input, output_key", ops_model, batch, "logits")
    check([i["name"] for i in spec["inputs"]] == ["image", "extra"], "dict input names")

    # ---------------------------------------------------------- refusals
    d = tempfile.mkdtemp()
    raises("unsupported function", lambda: export(Interp().eval(), torch.randn(2, 3, 6, 6), d),
           "torch.nn.functional.interpolate", "body.1", exc=ExportError)
    raises("unsupported module", lambda: export(WithLSTM().eval(), torch.randn(2, 5, 4), d),
           "nn.LSTM", "rnn", exc=ExportError)
    c = mg.build_case("resnet_bn")
    raises("training-mode BatchNorm", lambda: export(c["model"].train(), c["x"], d),
           "training mode", "model.eval()", exc=ValueError)
    raises("training-mode Dropout", lambda: export(
        nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 2)), torch.randn(2, 3), d),
        "training mode", "model.eval()", exc=ValueError)
    raises("module called twice", lambda: export(Twice().eval(), torch.randn(2, 4), d),
           "called twice", "fc", exc=ExportError)
    raises("F.dropout(training=True)", lambda: export(FDropout().eval(), torch.randn(2, 4), d),
           "torch.nn.functional.dropout", "training=True", exc=ExportError)
    raises("dict output without output_key", lambda: export(ops_model, batch, d),
           "output_key", exc=ExportError)

    # ---------------------------------------------------------- interpreter strictness
    c = mg.build_case("graph_nobias")
    spec = export(c["model"], c["x"], d)
    tensors = graph_interp.GraphModel.load(d).tensors
    bad = json.loads(json.dumps(spec))
    bad["nodes"][1]["op"] = "Foo"
    raises("interp: unknown op", lambda: graph_interp.GraphModel(bad, tensors), "unknown op")
    bad = json.loads(json.dumps(spec))
    bad["nodes"][0]["attrs"]["foo"] = 1
    raises("interp: unknown attr", lambda: graph_interp.GraphModel(bad, tensors), "foo")
    raises("interp: unused tensor", lambda: graph_interp.GraphModel(
        spec, {**tensors, "extra": torch.zeros(1)}), "unused")
    bad = json.loads(json.dumps(spec))
    bad["nodes"][0]["inputs"] = ["relu"]
    raises("interp: read before written", lambda: graph_interp.GraphModel(bad, tensors),
           "before it is written")

    # ---------------------------------------------------------- the torch.export path
    # on the models above (tracer="export"; "auto" keeps torch.fx for float inputs)
    for name, m in torchvision_models()[:1]:
        roundtrip(f"{name} (tracer=export)", m, x32, tracer="export")
    for name in mg.CASES:
        c = mg.build_case(name)
        roundtrip(f"fixture {name} (tracer=export)", c["model"], c["x"], tracer="export")
    roundtrip("functional ops, dict input, output_key (tracer=export)", ops_model, batch,
              "logits", tracer="export")

    transformer_tests()
    peft_tests()

    print(f"{len(FAILS)} failures")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
