"""Which architectures msif supports, and how exactly: the table of docs/architectures.md.

python -m benchmarks.architectures > docs/architectures.md
python -m benchmarks.architectures --only opt gemma     # some rows only, for a quick look

Every cell is computed here, on the tiny float64 models of tests/support/tiny.py (hidden 16, two
layers, random weights; θ_ft a perturbed copy of θ_pt), against references that do not use
msif's hooks: autograd per-sequence gradients (one backward per sequence) and the dense EK-FAC
algebra of tests/support/dense.py. A relative error is max |msif − reference| / max |reference|,
the largest over the tracked modules. tests/attribution/test_architectures_table.py recomputes
some rows and checks them against the committed file.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

import msif
from benchmarks.stats import spearman
from msif.core.hooks import hooked_batches
from msif.core.loss import sample_labels, scored_positions
from msif.core.modules import HEAD_PATTERN, ModuleSelection, find_modules, resolve
from tests.support.dense import dense_solve, kron_basis, per_example_gradients
from tests.support.tiny import ARCHITECTURES, make_batches, perturbed, random_examples, tiny_model

# Float64 agreement, relative to the largest reference value, that a column must reach (and
# tests/attribution/test_exactness.py checks). Gradients and covariances are sums msif and the
# reference form alike: a few ulps. The Λ reference rotates vec(DW_n) by a dense (P × P)
# Kronecker basis, P = out·in' up to 1 100, whose own rounding is about √P·ε. The score
# reference solves dense systems with condition numbers up to a few 10³ (λ = 0.1 · mean Λ),
# whose rounding is up to cond·ε ≈ 5e-13.
TOLERANCE = {"gradient": 3e-15, "covariance": 3e-15, "lambda": 1e-14, "scores": 1e-12}
ALPHA = 0.02
SEED = 11
BATCH = 4
# At most 3 padding positions per row: with 4 or more, a padding query of Gemma 2's 4-token
# sliding window sees no key, and the autograd reference, which runs the padded mask, is NaN
# (msif runs right-padded batches unmasked; tests/core/test_architectures.py checks it on such
# rows).
MIN_LEN, MAX_LEN = 6, 9
FOOTNOTE = (
    "LoRA: a rank-2 adapter on every tracked module (random non-zero B), saved with peft and "
    "loaded through msif's `load_model(adapter, base_model=base)` in float64: the largest "
    "relative error of the merged weights against base + s·BA computed by hand, and whether "
    "the merged model tracks exactly the base's modules. tests/data/test_lora.py checks "
    "gradients and scores of merged models against autograd. "
    "Every cell is computed by `python -m benchmarks.architectures`."
)
COLUMNS = (
    "architecture",
    "transformers class",
    "tracked modules",
    "kinds",
    "per-sequence ∇",
    "covariance",
    "Λ",
    "scores",
    "embedding + head ∇",
    "split heads",
    "split exact",
    "bf16 Spearman",
    "LoRA¹",
)


@dataclass(frozen=True)
class Data:
    """One architecture's models and data."""

    pt: torch.nn.Module
    ft: torch.nn.Module
    corpus: list
    ft_data: list
    queries: list


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (0 when both are 0)."""
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    if not math.isfinite(err):
        return math.inf
    return err / scale if scale else err


def setup(arch: str, dtype=torch.float64) -> Data:
    """θ_pt, θ_ft (perturbed) and random corpus, fine-tuning data and queries."""
    # Perturbed in float64 and then cast, so that every dtype gets the same θ_ft.
    pt = tiny_model(arch, seed=0)
    ft = perturbed(pt, seed=5)
    return Data(
        pt.to(dtype),
        ft.to(dtype),
        random_examples(9, seed=20, min_len=MIN_LEN, max_len=MAX_LEN),
        random_examples(8, seed=21, min_len=MIN_LEN, max_len=MAX_LEN, prompt=True),
        random_examples(4, seed=22, min_len=MIN_LEN, max_len=MAX_LEN, prompt=True),
    )


def hooked_gradients(model, batches, specs, **kwargs) -> dict[str, torch.Tensor]:
    """{module: (N, out, in')} per-sequence Σ_t g_t a_tᵀ from msif's hooked loop."""
    parts: dict[str, list] = {k: [] for k in specs}
    for hb in hooked_batches(model, batches, specs, **kwargs):
        for spec, a, g in hb.modules():
            parts[spec.name].append(torch.bmm(g.mT, a))
    return {k: torch.cat(v) for k, v in parts.items()}


def gradient_error(model, examples, specs) -> float:
    """Per-sequence gradients of msif's hooks against autograd's, true labels.

    A weight tied between the embedding and the head gets one autograd gradient, the sum of
    both uses; msif's two modules are compared by their sum (the embedding's transposed).
    """
    want = per_example_gradients(model, examples, specs)
    got = hooked_gradients(model, make_batches(examples, BATCH), specs)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    e, h = names.get(emb), names.get(head)
    if head is not None and head.weight is emb.weight and e in specs and h in specs:
        got[h] = got[h] + got.pop(e).transpose(1, 2)
        want.pop(e)
    return max(relative(got[k], want[k]) for k in got)


def covariance_error(model, examples, specs) -> float:
    """Σ a aᵀ and Σ g gᵀ over scored tokens against sums built from plain hooks.

    The reference hooks every module with torch's own forward and tensor hooks and views a
    flattened (B·T, d) input as (B, T, d) by hand; labels are sampled as msif samples them.
    """
    cov = msif.fit_covariance(model, make_batches(examples, BATCH), modules=specs, seed=SEED)
    want_a = {k: 0.0 for k in specs}
    want_g = {k: 0.0 for k in specs}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for batch in make_batches(examples, BATCH):
            for name, (a, g) in _reference_covariance(model, specs, batch).items():
                want_a[name] = want_a[name] + a
                want_g[name] = want_g[name] + g
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.zero_grad(set_to_none=True)
    return max(
        max(relative(cov.activation[k], want_a[k]), relative(cov.gradient[k], want_g[k]))
        for k in specs
    )


def _reference_covariance(model, specs, batch) -> dict[str, tuple]:
    b, t = batch["input_ids"].shape
    seen: dict[str, tuple] = {}

    def hook(mod, inputs, output, name):
        x = inputs[0]
        if specs[name].kind == "embedding":
            x = torch.nn.functional.one_hot(x, specs[name].in_features).to(output.dtype)
            x = x * getattr(mod, "embed_scale", 1.0)
            if mod.padding_idx is not None:
                x[..., mod.padding_idx] = 0
        x = x.reshape(b, t, -1)
        if specs[name].has_bias:
            x = torch.cat([x, torch.ones(b, t, 1, dtype=x.dtype)], -1)
        output.retain_grad()
        seen[name] = (x.detach(), output)

    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
        for n, m in resolve(model, specs.values()).items()
    ]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = sample_labels(out.logits.detach(), ids, batch["labels"], mask, SEED)
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    model.zero_grad(set_to_none=True)
    loss.backward()
    scored = scored_positions(labels)
    sums = {}
    for name, (a, output) in seen.items():
        spec = specs[name]
        a_t = a[scored]
        g_t = output.grad.reshape(b, t, -1)[scored].reshape(-1, spec.num_blocks, spec.block_size)
        sums[name] = (a_t.T @ a_t, torch.einsum("nki,nkj->kij", g_t, g_t))
    return sums


def fit(model, examples, stage, specs, dtype=torch.float64) -> msif.Factors:
    """One stage's factors, fitted in memory."""
    data = make_batches(examples, BATCH)
    return msif.fit_factors(model, lambda: data, stage=stage, modules=specs, seed=SEED, dtype=dtype)


def lambda_error(model, examples, factors: msif.Factors) -> float:
    """Λ against the diagonal of the dense per-module Fisher, rotated into msif's eigenbasis."""
    grads = per_example_gradients(model, examples, factors.specs, sample=True, seed=SEED)
    worst = 0.0
    for name in factors.specs:
        flat = grads[name].reshape(len(examples), -1)
        q = kron_basis(factors, name)
        want = ((flat @ q) ** 2).mean(0).reshape(factors.lambdas[name].shape)
        worst = max(worst, relative(factors.lambdas[name], want))
    return worst


def multi_stage(d: Data, specs, dtype=torch.float64):
    """(pt factors, ft factors, queries, scores) of the multi-stage method."""
    fpt = fit(d.pt, d.corpus, "pt", specs, dtype)
    fft = fit(d.ft, d.ft_data, "ft", specs, dtype)
    pq = msif.precondition_queries(
        d.ft,
        make_batches(d.queries, BATCH),
        [e.id for e in d.queries],
        ft_factors=fft,
        pt_factors=fpt,
        alpha=ALPHA,
    )
    return fpt, fft, pq, msif.score(d.pt, make_batches(d.corpus, BATCH), pq).values


def score_error(d: Data, fpt, fft, pq, scores) -> float:
    """Multi-stage scores against (F_pt + λI)⁻¹ (F_ft + αI)⁻¹ solved with dense matrices."""
    q_grads = per_example_gradients(d.ft, d.queries, pq.specs)
    z_grads = per_example_gradients(d.pt, d.corpus, pq.specs)
    want = 0
    for k in pq.specs:
        w = dense_solve(fft, k, q_grads[k], pq.damping["ft"][k])
        w = dense_solve(fpt, k, w, pq.damping["pt"][k])
        want = want + torch.einsum("qoi,noi->qn", w, z_grads[k])
    return relative(scores, want)


def first_block(specs) -> dict[str, str]:
    """{qualified name: name inside the block} of the modules of the first block."""
    found = {n: re.search(r"\.(\d+)\.(.+)$", n) for n in specs}
    found = {n: m for n, m in found.items() if m}
    if not found:
        return {}
    first = min(int(m.group(1)) for m in found.values())
    return {n: m.group(2) for n, m in found.items() if int(m.group(1)) == first}


def split_cell(specs) -> str:
    """Which projections of a block --split-heads splits, into how many head blocks."""
    cells = [
        f"{role} {specs[n].num_blocks}"
        for n, role in first_block(specs).items()
        if re.search(HEAD_PATTERN, n)
    ]
    return ", ".join(cells) or "none"


def heads_only(specs):
    """The modules --split-heads splits (the others fit as they do unsplit)."""
    return {n: s for n, s in specs.items() if re.search(HEAD_PATTERN, n)}


def fmt(err: float, column: str) -> str:
    """A relative error cell: '2e-16', with ✗ when above the column's tolerance."""
    text = "0" if err == 0 else f"{err:.0e}"
    return text if err <= TOLERANCE[column] else f"{text} ✗"


def measure(arch: str) -> dict[str, str]:
    """Every cell of one architecture's row (on one thread, so that reruns give equal bits)."""
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(arch)
    finally:
        torch.set_num_threads(threads)


def exactness(d: Data, specs) -> dict[str, float]:
    """Relative errors of Λ (both stages) and of the multi-stage scores for these modules."""
    fpt, fft, pq, scores = multi_stage(d, specs)
    return {
        "lambda": max(lambda_error(d.pt, d.corpus, fpt), lambda_error(d.ft, d.ft_data, fft)),
        "scores": score_error(d, fpt, fft, pq, scores),
    }


def _measure(arch: str) -> dict[str, str]:
    d = setup(arch)
    specs = find_modules(d.pt)
    exact = exactness(d, specs)
    heads = find_modules(d.pt, ModuleSelection(embeddings=True, lm_head=True, include=("^$",)))
    split_specs = find_modules(d.pt, ModuleSelection(split_heads=True))
    split = split_cell(split_specs)
    split_exact = "—"
    if split != "none":
        e = exactness(d, heads_only(split_specs))
        split_exact = f"Λ {fmt(e['lambda'], 'lambda')}, scores {fmt(e['scores'], 'scores')}"
    return {
        "architecture": arch,
        "transformers class": type(d.pt).__name__,
        "tracked modules": f"{len(specs)}: " + ", ".join(first_block(specs).values()),
        "kinds": ", ".join(sorted({s.kind for s in specs.values()})),
        "per-sequence ∇": fmt(gradient_error(d.pt, d.corpus, specs), "gradient"),
        "covariance": fmt(covariance_error(d.pt, d.corpus, specs), "covariance"),
        "Λ": fmt(exact["lambda"], "lambda"),
        "scores": fmt(exact["scores"], "scores"),
        "embedding + head ∇": fmt(gradient_error(d.pt, d.corpus, heads), "gradient"),
        "split heads": split,
        "split exact": split_exact,
        "bf16 Spearman": f"{bf16_spearman(arch):.3f}",
        "LoRA¹": lora_cell(arch, d.pt, specs),
    }


def lora_cell(arch: str, base: torch.nn.Module, specs) -> str:
    """Merge error of a LoRA adapter through msif, and whether the module names are kept."""
    import copy
    import tempfile
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from msif.data.models import load_model
    from tests.support.mini_world import tokenizer_for

    targets = sorted({name.rsplit(".", 1)[-1] for name in specs})
    torch.manual_seed(SEED)
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    )
    expected = {}
    for name, module in lora.named_modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            delta = delta * module.scaling["default"]
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            key = name.removeprefix("base_model.model.")
            expected[key] = module.base_layer.weight.detach() + delta.detach()
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(Path(tmp) / "base")
        tokenizer_for(["a b c d e"]).save_pretrained(Path(tmp) / "base")
        lora.save_pretrained(Path(tmp) / "adapter")
        merged, _ = load_model(
            str(Path(tmp) / "adapter"),
            base_model=str(Path(tmp) / "base"),
            dtype="float64",
            device="cpu",
        )
    weights = dict(merged.named_modules())
    err = max(relative(weights[k].weight.detach(), v) for k, v in expected.items())
    names = "kept" if set(find_modules(merged)) == set(specs) else "differ"
    return f"merge {fmt(err, 'gradient')}, {len(expected)} modules, names {names}"


def bf16_spearman(arch: str) -> float:
    """Spearman of multi-stage scores with the models in bfloat16 against float32."""
    d32, d16 = setup(arch, torch.float32), setup(arch, torch.bfloat16)
    specs = find_modules(d32.pt)
    s32 = multi_stage(d32, specs, torch.float32)[3]
    s16 = multi_stage(d16, specs, torch.float32)[3]
    return spearman(s16, s32)


def table(rows: Sequence[dict[str, str]]) -> str:
    """The Markdown table of rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """Rows of a table written by `table`, keyed by architecture."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith(("| architecture", "| ---")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == len(COLUMNS):
            rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


HEADER = """# Architectures

Which causal LMs msif tracks, and how exactly. This file is generated:
`python -m benchmarks.architectures > docs/architectures.md`; every cell of the table is
computed by it, on tiny float64 models built from transformers configs (`tests/support/tiny.py`:
hidden width 16, two layers, random weights, θ_ft a perturbed copy of θ_pt; 9 corpus
documents, 8 fine-tuning rows, 4 queries, right-padded batches of 4).
`tests/attribution/test_architectures_table.py` recomputes some rows and checks the committed
file against them (the whole file under `-m e2e`).

- **tracked modules**: what msif tracks by default (every linear map inside the repeated
  blocks), and the names of one block's modules.
- **per-sequence ∇**, **covariance**, **Λ**, **scores**: the largest relative error
  (max |msif − reference| / max |reference|, over the tracked modules) of, in turn: the
  per-sequence weight gradients Σ_t g_t a_tᵀ against one autograd backward per sequence; the
  covariance sums Σ a aᵀ and Σ g gᵀ over scored tokens, under sampled labels, against sums
  from plain torch hooks; Λ against the diagonal of the dense per-module Fisher of autograd
  gradients in msif's eigenbasis (both stages); the multi-stage scores against the same
  product of damped inverses solved with dense matrices. A ✗ would mark an error above the
  column's tolerance ({tolerance}): the references' own float64 rounding, about √P·ε for the
  dense (P × P) Kronecker rotations of Λ (P = out·in′ up to 1 100) and cond·ε for the score
  solves (condition numbers up to a few 10³).
- **embedding + head ∇**: the same gradient check with `--embeddings --lm-head`; a weight tied
  between them is compared as the sum of its two uses, the one gradient autograd has.
- **split heads**: what `--split-heads` splits in one block, into how many head-size blocks of
  G; **split exact**: Λ and scores of those modules, split, as above.
- **bf16 Spearman**: rank correlation of the multi-stage scores with both models in bfloat16
  against the same models in float32 (36 query-document pairs; per-batch statistics are
  computed in float32 either way).

## What differs between architectures

- **Flattened inputs.** OPT runs `fc1` and `fc2` on the batch flattened to (B·T, d). msif's
  hooks view every 2-D input and output gradient of a tracked module back as (B, T, d), row
  n·T + t being token t of sequence n, and refuse any other shape.
- **Heads.** `--split-heads` splits the output side of every attention projection that holds
  whole heads: fused (`query_key_value`, `c_attn`, `qkv_proj`, `Wqkv`) or separate (`q_proj`,
  `k_proj`, `v_proj`). The block size is the config's head size, so under grouped-query or
  multi-query attention k and v get as many blocks as there are key/value heads (one for
  Gemma's single key/value head: no split). Output projections (`o_proj`, `dense`,
  `c_proj`, `out_proj`) hold their heads on the input side; G is block-diagonal only over the
  output side, so they are not split. `--split-heads-pattern REGEX …` splits the tracked
  modules it matches instead of, or with `--split-heads` as well as, that set; a pattern
  that matches no tracked module is refused.
- **Embeddings.** With `--embeddings`, the input embedding is a linear map of one-hot tokens.
  Gemma and Gemma 2 multiply the looked-up rows by √hidden (`embed_scale`): msif scales the
  one-hot vectors by it, without which every embedding gradient would be √hidden times too
  small. A padding row (`padding_idx`, OPT's pad id 1 is a real token id of the data) gets
  no gradient in autograd, and none in msif. Another override of the lookup is refused.
- **Padding.** A right-padded batch is run with an all-ones attention mask: in a causal model
  no real token attends to a later padding position, so nothing real changes, while a
  padding query under a sliding window (Gemma 2, Mistral) no longer sees only masked keys.
  Gemma 2's eager attention adds float64's most negative value and takes its softmax in
  float32, where it is −∞: such a row is NaN, and 0·NaN carried it into every real token of
  the sequence in the next layer. Other masks (left padding) are passed as given.
- **Non-finite values** are refused, naming the row: a or g of any tracked module (one check
  per batch), the covariance and Λ sums (once per pass), each preconditioned query, each
  batch's scores.
- **Dtypes.** A model fingerprint records the dtype the weights were loaded in. Its weights
  hash is not dtype-independent: a bfloat16 load rounds every weight, so factors fitted with
  it describe another function than the float32 model's, and hashing at a common lower
  precision would let models that differ only below it (a short fine-tune) pass for one
  another. Mixing dtypes between steps is refused with the dtypes named.

"""


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the whole file, or the rows of --only."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(ARCHITECTURES), help="these rows only")
    args = p.parse_args(argv)
    rows = [measure(a) for a in (args.only or ARCHITECTURES)]
    text = table(rows) + "\n" if args.only else document(rows)
    sys.stdout.write(text)
    return text


def document(rows: Sequence[dict[str, str]]) -> str:
    """The whole of docs/architectures.md."""
    tolerance = ", ".join(f"{k} {v:.0e}" for k, v in TOLERANCE.items())
    return HEADER.format(tolerance=tolerance) + table(rows) + f"\n\n¹ {FOOTNOTE}\n"


if __name__ == "__main__":
    main()
