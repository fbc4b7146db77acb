"""What differs between architectures: flattened inputs, head splits and their options, scaled
and padded embeddings, padding rows, non-finite values, token ids and load dtypes."""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import msif
from msif.attribution.precondition import PreconditionedQueries
from msif.config import ModelOptions, add_options, from_namespace
from msif.core.hooks import model_attention_mask
from msif.core.modules import ModuleSelection, find_modules
from msif.data.examples import Example, collate, tokenize_documents
from msif.errors import MismatchError, MsifError, OptionError
from tests.core.test_hooks import hooked_gradients
from tests.support.dense import per_example_gradients
from tests.support.tiny import VOCAB, make_batches, random_examples, tiny_model


def close(got, want, tol=1e-12):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol * float(want[k].abs().max()))


# ------------------------------------------------------------------ flattened (B·T, d) inputs


def test_opt_mlp_sees_the_batch_flattened_and_its_gradients_are_autograds():
    model = tiny_model("opt")
    specs = find_modules(model)
    fc1 = model.get_submodule("model.decoder.layers.0.fc1")
    shapes = []
    handle = fc1.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    examples = random_examples(5, seed=3)  # lengths 3 to 9: padded rows
    try:
        want = per_example_gradients(model, examples, specs, sample=True, seed=2)
    finally:
        handle.remove()
    assert len(shapes[0]) == 2  # (B·T, d): what broke the hooks
    for size in (2, 5):  # other batchings put other rows side by side in the flat batch
        got = hooked_gradients(model, make_batches(examples, size), specs, sample=True, seed=2)
        close(got, want)


class FourDimensional(nn.Module):
    """A block linear that sees (B, T, 2, width / 2): no token layout msif can read."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([nn.Linear(width // 2, width // 2)])
        self.head = nn.Linear(width, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.emb(input_ids)
        x = self.layers[0](x.view(*x.shape[:2], 2, -1)).flatten(2)
        return SimpleNamespace(logits=self.head(x))


def test_a_module_input_of_another_layout_is_refused():
    model = FourDimensional().double()
    batch = collate([Example("a", [1, 2, 3], [1, 2, 3])], 0)
    with pytest.raises(MsifError, match=r"cannot track module 'layers.0': its input has shape"):
        msif.fit_covariance(model, [batch])


# ------------------------------------------------------------------------------ split heads


def test_split_patterns_split_what_they_match_and_refuse_matching_nothing():
    model = tiny_model("opt")
    specs = find_modules(model, ModuleSelection(split_heads=(r"\.fc1$",)))
    blocks = {n: s.num_blocks for n, s in specs.items() if s.num_blocks > 1}
    assert blocks == {f"model.decoder.layers.{i}.fc1": 3 for i in range(2)}  # 24 / head size 8
    with pytest.raises(MsifError, match=r"^--split-heads-pattern .*fc1\$' matches no tracked"):
        find_modules(model, ModuleSelection(split_heads=(r"mlp\.fc1$",)))


def test_model_options_give_flags_and_selections_of_heads_embeddings_and_head():
    parser = argparse.ArgumentParser()
    add_options(parser, ModelOptions)
    args = parser.parse_args(
        ["--split-heads", "--split-heads-pattern", r"\.fc1$", r"\.fc2$", "--embeddings"]
    )
    opts = from_namespace(ModelOptions, args)
    assert (opts.split_heads, opts.split_heads_pattern) == (True, (r"\.fc1$", r"\.fc2$"))
    assert (opts.embeddings, opts.lm_head) == (True, False)
    assert opts.recorded()["split_heads_pattern"] == [r"\.fc1$", r"\.fc2$"]
    model = tiny_model("opt")

    def split(options):
        specs = find_modules(model, options.selection())
        return {n.split(".")[-1] for n, s in specs.items() if s.num_blocks > 1}, specs

    both, specs = split(opts)
    assert both == {"q_proj", "k_proj", "v_proj", "fc1", "fc2"}  # --split-heads adds its set
    assert "model.decoder.embed_tokens" in specs and "lm_head" not in specs
    assert split(ModelOptions(split_heads_pattern=(r"\.fc1$",)))[0] == {"fc1"}
    assert split(ModelOptions(split_heads=True))[0] == {"q_proj", "k_proj", "v_proj"}
    assert split(ModelOptions())[0] == set()
    assert "lm_head" in split(ModelOptions(lm_head=True))[1]
    with pytest.raises(OptionError, match=r"--split-heads-pattern '\(' is not a regex"):
        ModelOptions(split_heads_pattern=("(",))


def test_split_heads_that_split_nothing_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="msif"):
        find_modules(tiny_model("llama"), ModuleSelection(include=("mlp",), split_heads=True))
    assert "nothing was split" in caplog.text


# ------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_scaled_embedding_gradients_equal_autograds(arch):
    model = tiny_model(arch)
    emb = model.get_input_embeddings()
    assert float(emb.embed_scale) == 4.0  # √hidden: what msif must carry into a
    # Untie the head so that autograd gives the embedding's own gradient.
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    specs = find_modules(model, ModuleSelection(embeddings=True, include=("^$",)))
    assert list(specs) == ["model.embed_tokens"]
    examples = random_examples(4, seed=9, min_len=6)
    want = per_example_gradients(model, examples, specs, sample=True, seed=1)
    got = hooked_gradients(model, make_batches(examples, 4), specs, sample=True, seed=1)
    close(got, want)


def test_the_padding_row_of_an_embedding_gets_no_gradient():
    model = tiny_model("opt")  # pad id 1, a token of the random data
    specs = find_modules(model, ModuleSelection(embeddings=True, include=("^$",)))
    name = "model.decoder.embed_tokens"
    examples = [Example("a", [1, 5, 1, 7, 8], [1, 5, 1, 7, 8])]
    got = hooked_gradients(model, make_batches(examples, 1), specs)[name]
    assert model.get_input_embeddings().padding_idx == 1
    assert torch.all(got[:, :, 1] == 0) and torch.any(got[:, :, 5] != 0)


class Doubling(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2


class Mislabelled(Doubling):
    embed_scale = 3.0


class WithEmbedding(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.layers = nn.ModuleList([nn.Linear(3, 7)])

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.layers[0](self.emb(input_ids)))


@pytest.mark.parametrize(
    ("emb", "message"),
    [(Doubling(7, 3), "overrides the lookup"), (Mislabelled(7, 3), "times embed_scale")],
)
def test_embeddings_whose_lookup_is_unknown_are_refused(emb, message):
    model = WithEmbedding(emb).double()
    specs = find_modules(model, ModuleSelection(embeddings=True))
    batch = collate([Example("a", [1, 2, 3], [1, 2, 3])], 0)
    with pytest.raises(MsifError, match=f"cannot track embedding 'emb'.*{message}"):
        msif.fit_covariance(model, [batch], modules=specs)


# ---------------------------------------------------------------------------------- padding


def test_long_padding_under_a_sliding_window_gives_the_unpadded_gradients():
    model = tiny_model("gemma2")  # float64, 4-token sliding window on layer 0
    long = Example("long", list(range(1, 10)), list(range(1, 10)))
    short = Example("short", [3, 4, 5], [3, 4, 5])  # 6 padding positions in a batch with long
    batch = collate([long, short], 0)
    masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.isnan(masked.logits[1]).all()  # the padded mask poisons the whole row
    assert torch.equal(model_attention_mask(batch["attention_mask"]), torch.ones(2, 9).long())
    specs = find_modules(model)
    got = hooked_gradients(model, [batch], specs)
    for i, e in enumerate([long, short]):
        alone = per_example_gradients(model, [e], specs)  # one row, no padding at all
        close({k: v[i : i + 1] for k, v in got.items()}, alone)


def test_masks_other_than_right_padding_are_kept():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    gap = torch.tensor([[1, 0, 1, 1]])
    assert model_attention_mask(left) is left and model_attention_mask(gap) is gap


# ------------------------------------------------------------------------ non-finite values


def test_non_finite_gradients_are_refused_naming_the_row():
    # Left padding keeps the mask, and with it Gemma 2's NaN padding row in float64.
    model = tiny_model("gemma2")
    ids = torch.tensor([list(range(1, 10)), [0] * 6 + [3, 4, 5]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "ids": ["ok", "bad"]}
    with pytest.raises(MsifError, match=r"^non-finite \w+ \(NaN or inf\) of module .* on row "):
        msif.fit_covariance(model, [batch])
    try:
        msif.fit_covariance(model, [batch])
    except MsifError as e:
        assert "row 'bad'" in str(e) and "\n" not in str(e)


class OneLinear(WithEmbedding):
    def __init__(self):
        super().__init__(nn.Embedding(7, 3))


def test_sums_that_overflow_are_refused_naming_the_module():
    model = OneLinear().double()
    with torch.no_grad():
        model.emb.weight.fill_(1e200)  # a is finite, Σ a aᵀ is not
    batch = collate([Example("a", [1, 2, 3], [1, 2, 3])], 0)
    with pytest.raises(MsifError, match=r"covariance sums \(A\) of module 'layers.0' are not"):
        msif.fit_covariance(model, [batch])


def test_non_finite_queries_and_scores_are_refused_naming_the_row():
    model = tiny_model("gpt_neox")
    batches = make_batches(random_examples(3, seed=1), 3)
    factors = msif.fit_factors(model, lambda: batches, stage="ft", dtype=torch.float64)
    name = next(iter(factors.specs))
    factors.lambdas[name][0, 0] = float("nan")
    queries = make_batches(random_examples(2, seed=2, prompt=True), 2)
    with pytest.raises(MsifError, match=r"of query 'q0' in module .*not finite"):
        msif.precondition_queries(
            model, queries, ["q0", "q1"], method="single-stage", ft_factors=factors, alpha=1.0
        )
    pq = msif.precondition_queries(model, queries, ["q0", "q1"], method="gradient-dot")
    pq.score_fingerprint = None
    pq.dense[name][1, 0, 0] = float("inf")
    with pytest.raises(MsifError, match=r"non-finite score .* of document 'ex1-0' on query 'q1'"):
        msif.score(model, batches, pq)


# -------------------------------------------------------------------------------- token ids


class Tokenizer:
    """Encodes a text as the integers it lists: '3 40' → [3, 40]."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [int(t) for t in text.split()]}


@pytest.mark.parametrize("bad", [VOCAB, 40, -1])
def test_library_token_ids_outside_the_embedding_are_refused_naming_the_row(bad):
    model = tiny_model("gpt_neox")
    docs = tokenize_documents(Tokenizer(), ["d0", "d1"], ["3 4 5", f"3 {bad} 5"], 16)
    with pytest.raises(
        MismatchError,
        match=rf"^row 'd1' has token id {bad} outside the model's vocabulary of {VOCAB}$",
    ):
        msif.fit_covariance(model, msif.batches(docs, 2))


def test_labels_outside_the_output_are_refused():
    model = tiny_model("gpt_neox")
    batch = collate([Example("x", [3, 4, 5], [3, 4, VOCAB + 2])], 0)
    with pytest.raises(MismatchError, match=r"row 'x' has label 31 outside the model's output"):
        next(iter(msif.score(model, [batch], _dot_queries(model)).values))


def _dot_queries(model) -> PreconditionedQueries:
    q = make_batches(random_examples(1, seed=4, prompt=True), 1)
    pq = msif.precondition_queries(model, q, ["q"], method="gradient-dot")
    pq.score_fingerprint = None
    return pq


# ------------------------------------------------------------------------------------ dtypes


def test_steps_in_other_dtypes_are_refused_naming_both():
    model = tiny_model("gpt_neox", dtype=torch.float32)
    bf16 = tiny_model("gpt_neox", dtype=torch.bfloat16)
    batches = make_batches(random_examples(4, seed=3), 2)
    basis = msif.eigendecompose(msif.fit_covariance(model, batches))
    assert basis.fingerprint["dtype"] == "float32"
    with pytest.raises(
        MismatchError,
        match=r"^the eigenbasis was computed with the model in float32, this model is bfloat16: "
        r"use the same --dtype$",
    ):
        msif.fit_lambda(bf16, batches, basis)
    with pytest.raises(MismatchError, match=r"different models \(one of them was computed with"):
        msif.fit_covariance(model, batches) + msif.fit_covariance(bf16, batches)
    # float64 holds float32 weights exactly: the same weights, accepted in another dtype.
    msif.fit_lambda(tiny_model("gpt_neox", dtype=torch.float64), batches, basis)
    other = tiny_model("gpt_neox", seed=1, dtype=torch.float32)
    with pytest.raises(MismatchError, match=r"^the eigenbasis was computed with other model"):
        msif.fit_lambda(other, batches, basis)


def test_relabelled_factors_are_caught_whatever_the_dtype():
    model = tiny_model("gpt_neox", dtype=torch.float64)
    batches = make_batches(random_examples(4, seed=3), 2)
    pt = msif.fit_factors(model, lambda: batches, stage="pt", dtype=torch.float64)
    ft = tiny_model("gpt_neox", dtype=torch.float32)  # θ_pt's weights in float32
    queries = make_batches(random_examples(2, seed=2, prompt=True), 2)
    with pytest.raises(MismatchError, match="fine-tuned model's own weights"):
        msif.precondition_queries(ft, queries, ["a", "b"], method="gradient-dot", pt_factors=pt)


# ----------------------------------------------------------------------------- through the CLI


def test_cli_tracks_embeddings_head_and_patterns_and_names_dtypes(tmp_path, capsys):
    from msif.cli import main
    from msif.ekfac.covariance import CovarianceSums
    from tests.support.cli_helpers import COMMON
    from tests.support.mini_world import build

    w = build(tmp_path / "world")
    data = ["--model", w["pt_model"], "--data", w["corpus"], "--stage", "pt", *COMMON]
    flags = ["--embeddings", "--lm-head", "--split-heads", "--split-heads-pattern", "h_to_4h$"]
    assert main(["fit-covariance", "--out", str(tmp_path / "cov"), *data, *flags]) == 0
    cov = CovarianceSums.load(tmp_path / "cov")
    assert {"gpt_neox.embed_in", "lm_head"} <= set(cov.specs)
    split = {n.split(".")[-1]: s.num_blocks for n, s in cov.specs.items() if s.num_blocks > 1}
    assert split == {"query_key_value": 6, "dense_h_to_4h": 4}  # 2 heads × 3; 32 / 8
    assert cov.info["options"]["split_heads_pattern"] == ["h_to_4h$"]
    bf16 = ["--dtype", "bfloat16"]
    assert main(["fit-covariance", "--out", str(tmp_path / "c16"), *data, *bf16]) == 0
    assert (
        main(
            ["eigendecompose", "--out", str(tmp_path / "e16"), "--partials", str(tmp_path / "c16")]
        )
        == 0
    )
    capsys.readouterr()
    lam = ["fit-lambda", "--out", str(tmp_path / "lam"), "--eigenbasis", str(tmp_path / "e16")]
    assert main([*lam, *data]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("msif: error: ") and "\n" not in err
    assert "computed with the model in bfloat16, this model is float32: use the same --dtype" in err
    bad = ["--split-heads-pattern", "no_such_module"]
    assert main(["fit-covariance", "--out", str(tmp_path / "bad"), *data, *bad]) == 1
    assert "matches no tracked module" in capsys.readouterr().err
