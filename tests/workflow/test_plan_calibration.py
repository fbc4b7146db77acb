"""The plan against a measured run here: covariance and Λ fitting of a small Llama, timed in one
process beside a plain training step, against the ratio the plan predicts on the CPU.

The plan's CPU rates come from benchmarks/RESULTS.md (a GPT-NeoX of hidden 128, not this
model), so this checks that the FLOP counts carry over to another architecture and shape.
Ratios, not seconds: the machine is shared (2 cores, other sessions), which moved absolute
times by 3-5× while these runs were written, and the passes take turns so a busy moment
falls on all of them alike.
"""

from __future__ import annotations

import pytest
import torch

BAND = 0.30  # the issue's ±30 %


@pytest.mark.slow
def test_fitting_time_ratios_within_the_band():
    from transformers import LlamaConfig, LlamaForCausalLM

    import msif
    from benchmarks.common import interleaved_best_times, token_batches
    from benchmarks.speed import train_step
    from msif.workflow import costs
    from msif.workflow.plan import PlanInputs, estimate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the calibration's setting
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=1024,
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(cfg).eval()
        seq, batch, batches = 128, 8, 4
        data = token_batches(batch * batches, seq, cfg.vocab_size, 0, batch)
        basis = msif.eigendecompose(msif.fit_covariance(model, data))
        measured = interleaved_best_times(
            [
                ("training", lambda: train_step(model, data)),
                ("covariance", lambda: msif.fit_covariance(model, data)),
                ("lambda", lambda: msif.fit_lambda(model, data, basis)),
            ],
            repeat=3,
        )
    finally:
        torch.set_num_threads(threads)

    shape = costs.shape_of(model, msif.find_modules(model).values())
    tokens = batch * batches * seq
    inputs = PlanInputs(
        "small-llama",
        tokens,
        tokens,
        num_shards=1,
        max_length=seq,
        batch_size=batch,
        dtype="float32",
        gpu="cpu",
    )
    plan = estimate(inputs, shape)
    nodes = {n.task: n for n in plan.nodes}
    for task, name in (("fit-covariance (pt)", "covariance"), ("fit-lambda (pt)", "lambda")):
        predicted = nodes[task].compute_hours / plan.reference_hours
        ratio = measured[name] / measured["training"]
        print(
            f"{name}: measured {measured[name]:.3f} s = {ratio:.3f}× the training step "
            f"({measured['training']:.3f} s); plan {predicted:.3f}× "
            f"({nodes[task].compute_hours * 3600:.3f} s against "
            f"{plan.reference_hours * 3600:.3f} s)"
        )
        assert abs(predicted / ratio - 1) <= BAND, (name, predicted, ratio)
