"""PEFT (LoRA) adapter folders as fine-tuned models.

load_model merges an adapter into its base exactly (θ_pt + scale·B·A, float64) and returns a
plain model with the base's module names; msif's gradients and scores on it equal autograd on
a model merged by hand; the nodes fit, precondition and score on the adapter folder exactly
what they do on the merged model saved whole; the pipeline hands θ_pt over as the base; bad
adapters are refused in one line; adapters and bases on gs:// work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from msif.attribution.precondition import precondition_queries, query_gradients
from msif.attribution.scoring import score
from msif.cli import main
from msif.core.fingerprint import model_fingerprint
from msif.core.modules import find_modules
from msif.data.adapters import base_of
from msif.data.models import load_model
from msif.errors import MismatchError, MsifError
from msif.storage import gcs as storage
from msif.storage.uri import join
from tests.support.cli_helpers import COMMON, cli
from tests.support.dense import per_example_gradients
from tests.support.mini_world import build, tokenizer_for
from tests.support.tiny import make_batches, random_examples, tiny_model

# The modules each architecture's adapter adapts: attention and MLP, Linear and GPT-2 Conv1D.
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense_h_to_4h"],
    "gpt2": ["c_attn", "c_fc"],
}
PREFIX = "base_model.model."
HUB_ID = "some-org/some-base-7b"  # what adapter configs usually name: unreachable here
WORDS = " ".join(f"w{i}" for i in range(20))


# ----------------------------------------------------------------------------- helpers


def save_base(path: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    """A tiny model of arch saved whole (float32) with the tokenizer."""
    tiny_model(arch, seed=seed, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_adapter(path: Path, base: Path, arch: str, seed: int = 1, **config) -> Path:
    """A LoRA adapter on base with random, non-zero B (so merging changes the weights), saved
    by peft's save_pretrained (safetensors). Its config names base as a local path."""
    model = AutoModelForCausalLM.from_pretrained(base)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], **config}
    peft = get_peft_model(
        model, LoraConfig(lora_dropout=0.0, fan_in_fan_out=arch == "gpt2", **config)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft.save_pretrained(path)
    return path


def set_config(adapter: Path, **fields) -> Path:
    """Rewrite fields of an adapter's adapter_config.json."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
    return adapter


def copy_adapter(adapter: Path, dest: Path, **fields) -> Path:
    shutil.copytree(adapter, dest)
    return set_config(dest, **fields) if fields else dest


def merged_by_hand(base: Path, adapter: Path, arch: str) -> dict[str, torch.Tensor]:
    """The base's float64 state dict with W + scale·B·A (transposed for Conv1D) on every
    adapted module, from the adapter's own files."""
    state = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).state_dict()
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter / "adapter_model.safetensors")
    for key in sorted(k for k in weights if ".lora_A." in k):
        module = key[len(PREFIX) :].split(".lora_A.")[0]
        a = weights[key].double()
        b = weights[key.replace(".lora_A.", ".lora_B.")].double()
        delta = b @ a
        state[f"{module}.weight"] = (
            state[f"{module}.weight"] + (delta.T if arch == "gpt2" else delta) * scale
        )
    return state


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msif: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for([WORDS])  # 23 tokens: fits the tiny models' 29 embeddings


@pytest.fixture(scope="module", params=sorted(TARGETS))
def lora(request, tmp_path_factory, tokenizer):
    """(arch, base folder, adapter folder) for each architecture."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    base = save_base(root / "base", arch, tokenizer)
    return arch, base, save_adapter(root / "adapter", base, arch)


# ----------------------------------------------------------------------------- (a), (b): the merge


def test_merged_weights_are_base_plus_scaled_BA_exactly(lora):
    arch, base, adapter = lora
    model, _ = load_model(str(adapter), device="cpu", dtype="float64")
    want = merged_by_hand(base, adapter, arch)
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).state_dict()
    changed = [k for k in want if not torch.equal(want[k], original[k])]
    assert len(changed) == 2 * len(TARGETS[arch])  # 2 layers × the adapted modules
    for key in want:
        assert got[key].dtype == torch.float64
        assert torch.equal(got[key], want[key]), key


def test_merged_model_has_the_base_module_names(lora):
    arch, base, adapter = lora
    model, _ = load_model(str(adapter), device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(base)
    assert type(model) is type(plain)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert not any("lora" in n or "base_layer" in n for n, _ in model.named_modules())
    specs = find_modules(model)
    assert specs == find_modules(plain)
    got, pt = model_fingerprint(model, specs), model_fingerprint(plain, specs)
    assert got["architecture"] == pt["architecture"] and got["weights"] != pt["weights"]


def test_merge_in_float32_then_rounded(lora):
    arch, base, adapter = lora
    half, _ = load_model(str(adapter), device="cpu", dtype="bfloat16")
    want = merged_by_hand(base, adapter, arch)
    full, _ = load_model(str(adapter), device="cpu", dtype="float32")
    for key, value in half.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, full.state_dict()[key].to(torch.bfloat16)), key
        torch.testing.assert_close(full.state_dict()[key].double(), want[key], rtol=1e-6, atol=1e-6)
    # Buffers (rotary frequencies) stay as from_pretrained(dtype=bfloat16) leaves them.
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    buffers = dict(plain.named_buffers())
    assert {k: v.dtype for k, v in half.named_buffers()} == {k: v.dtype for k, v in buffers.items()}
    for key, value in half.named_buffers():
        assert torch.equal(value, buffers[key]), key


# ----------------------------------------------------------------------------- (c): gradients


def test_gradients_and_scores_equal_autograd_on_a_model_merged_by_hand(lora):
    arch, base, adapter = lora
    model, _ = load_model(str(adapter), device="cpu", dtype="float64")
    manual = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    manual.load_state_dict(merged_by_hand(base, adapter, arch))
    specs = find_modules(model)
    queries = random_examples(3, seed=5, prompt=True)
    docs = random_examples(4, seed=6)

    got = query_gradients(model, make_batches(queries, 2), specs)
    want = per_example_gradients(manual, queries, specs)
    assert sorted(got) == sorted(want)
    for name in specs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)

    # Gradient-dot: the query gradient at θ_ft (the merged model), the document's at θ_pt.
    pre = precondition_queries(
        model, make_batches(queries, 2), [q.id for q in queries], method="gradient-dot"
    )
    pt = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    scores = score(pt, make_batches(docs, 3), pre).values
    doc_grads = per_example_gradients(pt, docs, specs)
    dense = sum(torch.einsum("qoi,doi->qd", want[n], doc_grads[n]) for n in specs)
    torch.testing.assert_close(scores.double(), dense, rtol=1e-9, atol=1e-12)


def test_tokenizer_is_the_adapters_when_it_has_one(lora, tokenizer, tmp_path):
    arch, base, adapter = lora
    _, tok = load_model(str(adapter), device="cpu")
    assert len(tok) == len(tokenizer)
    own = copy_adapter(adapter, tmp_path / "with-tokenizer")
    extended = tokenizer_for([WORDS])
    extended.add_tokens(["[NEW]"])
    extended.save_pretrained(own)
    _, tok = load_model(str(own), device="cpu")
    assert len(tok) == len(tokenizer) + 1 and "[NEW]" in tok.get_vocab()


@pytest.mark.parametrize("kept", [None, ["embed_in", "lm_head"]], ids=["saved", "modules_to_save"])
def test_an_adapter_that_appended_tokens_resizes_its_base(kept, tokenizer, tmp_path):
    """A fine-tune that added tokens carries the resized embedding matrices (peft saves them
    whole, or as modules_to_save) and its tokenizer: merged as peft merges it on a base
    resized by hand."""
    base = save_base(tmp_path / "base", "gpt_neox", tokenizer)
    extended = tokenizer_for([WORDS])
    extended.add_tokens([f"[NEW{i}]" for i in range(8)])  # 31 tokens > the base's 29 rows
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(extended))
    config = LoraConfig(r=4, target_modules=TARGETS["gpt_neox"], modules_to_save=kept)
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    peft.save_pretrained(tmp_path / "adapter")
    extended.save_pretrained(tmp_path / "adapter")

    got, tok = load_model(str(tmp_path / "adapter"), device="cpu")
    assert len(tok) == len(extended) == got.get_input_embeddings().num_embeddings
    by_hand = AutoModelForCausalLM.from_pretrained(base)
    by_hand.resize_token_embeddings(len(extended))
    want = PeftModel.from_pretrained(by_hand, tmp_path / "adapter").merge_and_unload()
    assert got.state_dict().keys() == want.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    assert [n for n, _ in got.named_modules()] == [n for n, _ in by_hand.named_modules()]


# ----------------------------------------------------------------------------- (d): the nodes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The mini world, an adapter on its θ_pt, copies of it that name their base otherwise,
    and the merged model saved whole (peft's merge_and_unload, save_pretrained)."""
    w = build(tmp_path_factory.mktemp("mini"))
    root = tmp_path_factory.mktemp("adapters")
    adapter = save_adapter(root / "adapter", Path(w["pt_model"]), "gpt_neox", seed=3)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w["pt_model"]), adapter)
    merged = merged.merge_and_unload()
    merged.save_pretrained(root / "merged")
    shutil.copy(Path(w["pt_model"]) / "tokenizer.json", root / "merged")
    shutil.copy(Path(w["pt_model"]) / "tokenizer_config.json", root / "merged")
    w.update(
        adapter=str(adapter),
        hub=str(copy_adapter(adapter, root / "hub", base_model_name_or_path=HUB_ID)),
        merged=str(root / "merged"),
        root=str(root),
    )
    return w


def read_artifact(folder: Path, stem: str) -> tuple[dict, dict]:
    return load_file(folder / f"{stem}.safetensors"), json.loads(
        (folder / f"{stem}.json").read_text()
    )


def assert_same_artifact(a: Path, b: Path, stem: str) -> None:
    ta, ja = read_artifact(a, stem)
    tb, jb = read_artifact(b, stem)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    for info in (ja, jb):
        info.get("info", {}).pop("model", None)  # the URI it was given
    assert ja == jb


def fit_ft_covariance(w: dict, model: str, out: Path, *extra) -> Path:
    cli("fit-covariance", "--model", model, *extra, "--data", w["finetune"], "--stage", "ft",
        "--out", out, *COMMON)  # fmt: skip
    return out


def test_ft_covariance_of_an_adapter_equals_the_merged_models(world, tmp_path):
    merged = fit_ft_covariance(world, world["merged"], tmp_path / "merged")
    # The base named in adapter_config.json (a local folder), or given (the config names a hub id).
    recorded = fit_ft_covariance(world, world["adapter"], tmp_path / "recorded")
    given = fit_ft_covariance(
        world, world["hub"], tmp_path / "given", "--base-model", world["pt_model"]
    )
    for out in (recorded, given):
        assert_same_artifact(out, merged, "covariance")
    info = json.loads((given / "covariance.json").read_text())
    assert info["info"]["model"] == world["hub"]
    pt = fit_ft_covariance(world, world["pt_model"], tmp_path / "pt")
    assert read_artifact(pt, "covariance")[1]["fingerprint"] != info["fingerprint"]


def single_stage(w: dict, model: str, out: Path, *base) -> Path:
    """fit-covariance → … → score-corpus for single-stage, every model-loading node on model."""
    cli(
        "fit-covariance",
        "--model",
        model,
        *base,
        "--data",
        w["finetune"],
        "--stage",
        "ft",
        "--out",
        out / "cov",
        *COMMON,
    )
    cli("eigendecompose", "--partials", out / "cov", "--out", out / "eig")
    cli(
        "fit-lambda",
        "--model",
        model,
        *base,
        "--data",
        w["finetune"],
        "--stage",
        "ft",
        "--eigenbasis",
        out / "eig",
        "--out",
        out / "lam",
        *COMMON,
    )
    cli(
        "build-factors",
        "--eigenbasis",
        out / "eig",
        "--partials",
        out / "lam",
        "--out",
        out / "fac",
    )
    cli(
        "precondition-queries",
        "--model",
        model,
        *base,
        "--queries",
        w["queries"],
        "--method",
        "single-stage",
        "--ft-factors",
        out / "fac",
        "--alpha",
        "0.05",
        "--out",
        out / "pre",
        *COMMON,
    )
    cli(
        "score-corpus",
        "--model",
        model,
        *base,
        "--corpus",
        w["corpus"],
        "--preconditioned",
        out / "pre",
        "--top-k",
        "20",
        "--out",
        out / "scores",
        *COMMON,
    )
    return out  # fmt: skip


def test_single_stage_on_an_adapter_equals_the_merged_model(world, tmp_path):
    got = single_stage(world, world["hub"], tmp_path / "adapter", "--base-model", world["pt_model"])
    want = single_stage(world, world["merged"], tmp_path / "merged")
    assert_same_artifact(got / "eig", want / "eig", "eigenbasis")
    assert_same_artifact(got / "fac", want / "fac", "factors")
    assert_same_artifact(got / "pre", want / "pre", "queries")
    rows = [pq.read_table(o / "scores" / "scores.parquet").to_pylist() for o in (got, want)]
    assert rows[0] == rows[1] and len(rows[0]) == 3 * 12


def test_score_corpus_rerun_key_covers_the_base(world, tmp_path, caplog):
    out = single_stage(world, world["hub"], tmp_path / "run", "--base-model", world["pt_model"])
    argv = ["score-corpus", "--model", world["hub"], "--base-model", world["pt_model"],
            "--corpus", world["corpus"], "--preconditioned", out / "pre", "--top-k", "20",
            "--out", out / "scores", *COMMON]  # fmt: skip
    with caplog.at_level("INFO", logger="msif"):
        cli(*argv)
    assert any("is complete for these inputs: skipped" in r.getMessage() for r in caplog.records)
    # Another base under the same adapter is not answered from the stale output.
    other = Path(world["root"]) / "other-base"
    shutil.copytree(world["pt_model"], other)
    state = load_file(other / "model.safetensors")
    state = {k: v + 0.01 if "embed_in" in k else v for k, v in state.items()}
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level("INFO", logger="msif"):
        cli(*argv[:4], str(other), *argv[5:])
    assert not any("skipped" in r.getMessage() for r in caplog.records)
    assert base_of(world["hub"]) == HUB_ID and base_of(world["merged"]) is None


def test_dag_hands_theta_pt_to_every_node_that_loads_theta_ft():
    from msif.components import COMPONENTS

    from msif.workflow.dag import tasks

    loads_ft = 0
    for task in tasks():
        if task.parameters.get("model") == "ft_model_uri":
            loads_ft += 1
            assert task.parameters["base_model"] == "pt_model_uri", task.id
        else:
            assert "base_model" not in task.parameters, task.id
        inputs = COMPONENTS[task.node].component_spec.inputs or {}
        if "model" in inputs:
            assert inputs["base_model"].default == "", task.node
    # fit-covariance, fit-lambda (ft), precondition-queries ×3, score-corpus (single-stage)
    assert loads_ft == 6


def test_compiled_pipeline_passes_pt_model_uri_as_base_model(tmp_path):
    import yaml

    from msif.workflow.cli import compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    dags = [spec["root"]] + [c for c in spec["components"].values() if "dag" in c]
    seen = []
    for dag in dags:
        for name, task in dag["dag"]["tasks"].items():
            params = task.get("inputs", {}).get("parameters", {})
            model = params.get("model", {}).get("componentInputParameter", "")
            base = params.get("base_model", {}).get("componentInputParameter")
            if model.endswith("ft_model_uri"):
                seen.append(name)
                assert base == model.replace("ft_model_uri", "pt_model_uri"), name
            else:
                assert base is None, name
    assert len(seen) == 6, seen


def test_components_pass_base_model_as_the_flag(monkeypatch, tmp_path):
    import msif.components as c
    from kfp.dsl import Artifact

    import msif.cli

    calls = []
    monkeypatch.setattr(msif.cli, "main", lambda argv: calls.append(argv) or 0)
    p = dict(max_length=32, batch_size=4, seed=0, device="cpu", dtype="float32")
    p.update(include=[], exclude=[], split_heads=False, split_heads_pattern=[], embeddings=False)
    p.update(lm_head=False, text_column="text", id_column="id", prompt_column="prompt")
    p.update(completion_column="completion", messages_column="messages", split="")
    p.update(append_eos="auto", module_groups=1)
    out = Artifact(name="cov", uri=str(tmp_path / "cov"), metadata={})
    c.fit_covariance.python_func("m", "d", "ft", 0, 1, covariance=out, **p)
    c.fit_covariance.python_func("m", "d", "ft", 0, 1, covariance=out, base_model="gs://b/pt", **p)
    assert "--base-model" not in calls[0]
    assert calls[1][-2:] == ["--base-model", "gs://b/pt"]


def test_pipeline_with_an_adapter_as_ft_model_ranks_like_the_merged_model(world, tmp_path):
    """The whole DAG in-process, ft_model_uri an adapter whose config names a hub id: only
    the pipeline's own θ_pt, passed as base_model, makes it loadable."""
    from tests.support.cli_helpers import run_nodes

    def ranking(ft: str, out: Path) -> list[dict]:
        r = run_nodes({**world, "ft_model": ft}, out, num_shards=1)
        return pq.read_table(Path(r["ranking"]) / "ranking.parquet").to_pylist()

    assert ranking(world["hub"], tmp_path / "a") == ranking(world["merged"], tmp_path / "m")


# ----------------------------------------------------------------------------- (e): bad adapters


def _other_shapes(w, root: Path) -> list[str]:
    cfg = GPTNeoXConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32)  # fmt: skip
    GPTNeoXForCausalLM(cfg).save_pretrained(root / "wide")
    shutil.copy(Path(w["pt_model"]) / "tokenizer.json", root / "wide")
    shutil.copy(Path(w["pt_model"]) / "tokenizer_config.json", root / "wide")
    return [w["adapter"], "--base-model", str(root / "wide")]


def _other_architecture(w, root: Path) -> list[str]:
    tiny_model("llama", dtype=torch.float32).save_pretrained(root / "llama")
    return [w["adapter"], "--base-model", str(root / "llama")]


def _pickle(w, root: Path) -> list[str]:
    bad = copy_adapter(Path(w["adapter"]), root / "pickle")
    weights = load_file(bad / "adapter_model.safetensors")
    torch.save(weights, bad / "adapter_model.bin")  # a real pickle: msif must not open it
    (bad / "adapter_model.safetensors").unlink()
    return [str(bad)]


def _truncated(w, root: Path) -> list[str]:
    bad = copy_adapter(Path(w["adapter"]), root / "truncated")
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return [str(bad)]


def _garbage(w, root: Path) -> list[str]:
    bad = copy_adapter(Path(w["adapter"]), root / "garbage")
    (bad / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return [str(bad)]


def _edited(name: str, edit):
    def make(w, root: Path) -> list[str]:
        bad = copy_adapter(Path(w["adapter"]), root / name)
        weights = load_file(bad / "adapter_model.safetensors")
        save_file(edit(weights), bad / "adapter_model.safetensors")
        return [str(bad)]

    return make


def _drop_one(weights):
    return dict(sorted(weights.items())[1:])


def _extra_layer(weights):
    extra = {
        k.replace(".layers.1.", ".layers.7."): v.clone()
        for k, v in weights.items()
        if ".layers.1." in k
    }
    return {**weights, **extra}


def _nan(weights):
    key = sorted(k for k in weights if "lora_B" in k)[0]
    weights[key][0, 0] = float("nan")
    return weights


def _config(name: str, text: str | None = None, **fields):
    def make(w, root: Path) -> list[str]:
        bad = copy_adapter(Path(w["adapter"]), root / name, **fields)
        if text is not None:
            (bad / "adapter_config.json").write_text(text)
        return [str(bad)]

    return make


def _prompt_tuning(w, root: Path) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(w["pt_model"])
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(model, cfg).save_pretrained(root / "prompt")
    return [str(root / "prompt")]


def _stale_local_base(w, root: Path) -> list[str]:
    return _config("stale", base_model_name_or_path=str(root / "moved-away"))(w, root)


BAD = {
    "hub id base, none given": (
        lambda w, root: [w["hub"]],
        f"names its base '{HUB_ID}', which is no local folder or gs:// URI (msif downloads "
        "nothing from the hub): give the base model it was trained on with --base-model URI",
    ),
    "no base named": (
        _config("nobase", base_model_name_or_path=None),
        "does not name its base (no base_model_name_or_path in adapter_config.json): give the "
        "base model it was trained on with --base-model URI",
    ),
    "recorded local base gone": (
        _stale_local_base,
        "moved-away', which is no folder here (the adapter was saved elsewhere): give the base",
    ),
    "given base missing": (
        lambda w, root: [w["hub"], "--base-model", str(root / "nowhere")],
        "cannot read the base of PEFT adapter {hub} (given by --base-model): {root}/nowhere: "
        "no such model directory",
    ),
    "base is an adapter": (
        lambda w, root: [w["hub"], "--base-model", w["adapter"]],
        "is itself an adapter: give the full model it was trained on",
    ),
    "base of other shapes": (
        _other_shapes,
        "does not fit the base {root}/wide: weight gpt_neox.layers.0.attention.query_key_value"
        ".lora_A.weight has shape [4, 16] in the adapter but [4, 32] on this base "
        "(6 weight(s) differ)",
    ),
    "base of another architecture": (
        _other_architecture,
        "not found in the base model",
    ),
    "pickle adapter": (
        _pickle,
        "it holds only a pickle adapter (adapter_model.bin), which msif does not load because "
        "unpickling can run code",
    ),
    "truncated safetensors": (_truncated, "its adapter_model.safetensors is damaged or truncated"),
    "garbage safetensors": (_garbage, "its adapter_model.safetensors is damaged or truncated"),
    "a weight missing": (
        _edited("missing", _drop_one),
        "the adapter lacks 1 weight(s) its config gives this base (first: gpt_neox.layers.0.",
    ),
    "weights of a layer the base lacks": (
        _edited("extra", _extra_layer),
        "the adapter holds 4 weight(s) with no place in this base (first: gpt_neox.layers.7.",
    ),
    "NaN weight": (_edited("nan", _nan), "holds NaN or infinite values"),
    "config not JSON": (
        _config("notjson", text="{not json"),
        "adapter_config.json is not valid JSON",
    ),
    "unknown peft type": (
        _config("unknown", peft_type="NOT_A_TUNER"),
        "adapter_config.json names peft_type 'NOT_A_TUNER', which peft ",
    ),
    "prompt tuning": (_prompt_tuning, "a PROMPT_TUNING adapter adds virtual tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_one_line_errors(case, world, tmp_path, capsys):
    make, message = BAD[case]
    args = make(world, tmp_path)
    out = tmp_path / "out"
    argv = ["fit-covariance", "--model", *args, "--data", world["finetune"], "--stage", "ft",
            "--out", out, *COMMON]  # fmt: skip
    assert main([str(a) for a in argv]) == 1
    line = one_line_error(capsys)
    assert message.format(root=tmp_path, hub=world["hub"]) in line
    assert "Traceback" not in line and not out.exists()


def test_bad_adapters_raise_msif_errors(world, tmp_path):
    with pytest.raises(MismatchError, match="does not fit the base"):
        adapter, _, wide = _other_shapes(world, tmp_path)
        load_model(adapter, device="cpu", base_model=wide)
    with pytest.raises(MsifError, match="--base-model"):
        load_model(world["hub"], device="cpu")


def test_base_model_is_not_used_for_a_full_model(world):
    a, _ = load_model(world["ft_model"], device="cpu", base_model="/nowhere/at/all")
    b, _ = load_model(world["ft_model"], device="cpu")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ----------------------------------------------------------------------------- (f): gs://


def test_adapter_and_base_on_gs(world, gcs_prefix, capsys):
    base = join(gcs_prefix, "base")
    storage.upload_tree(world["pt_model"], base)
    local, _ = load_model(world["hub"], device="cpu", base_model=world["pt_model"])
    want = local.state_dict()

    def same(model) -> bool:
        return all(torch.equal(v, want[k]) for k, v in model.state_dict().items())

    # The config names the gs:// base.
    recorded = join(gcs_prefix, "recorded")
    named = copy_adapter(
        Path(world["adapter"]), Path(world["root"]) / "gs-named", base_model_name_or_path=base
    )
    storage.upload_tree(named, recorded)
    model, tok = load_model(recorded, device="cpu")
    assert same(model) and len(tok) == len(load_model(world["pt_model"], device="cpu")[1])
    # The config names a hub id; the base is given on gs://, or locally.
    hub = join(gcs_prefix, "hub")
    storage.upload_tree(world["hub"], hub)
    assert same(load_model(hub, device="cpu", base_model=base)[0])
    assert same(load_model(hub, device="cpu", base_model=world["pt_model"])[0])
    # Through a node, with the adapter on gs://.
    out = Path(world["root"]) / "gs-cov"
    cli("fit-covariance", "--model", hub, "--base-model", base, "--data", world["finetune"],
        "--stage", "ft", "--out", out, *COMMON)  # fmt: skip
    merged = fit_ft_covariance(world, world["merged"], Path(world["root"]) / "gs-cov-merged")
    assert_same_artifact(out, merged, "covariance")
    # A gs:// base that is not there: one line, with the way out.
    gone = join(gcs_prefix, "gone")
    storage.upload_tree(
        copy_adapter(Path(world["adapter"]), Path(world["root"]) / "gs-gone",
                     base_model_name_or_path=join(gcs_prefix, "no-base")),
        gone,
    )  # fmt: skip
    argv = ["fit-covariance", "--model", gone, "--data", world["finetune"], "--stage", "ft",
            "--out", Path(world["root"]) / "gs-gone-out", *COMMON]  # fmt: skip
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1
    line = one_line_error(capsys)
    assert f"cannot read the base of PEFT adapter {gone} (named in adapter_config.json)" in line
    assert line.endswith("give the base model it was trained on with --base-model URI")
