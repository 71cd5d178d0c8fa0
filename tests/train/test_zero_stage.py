"""The trainer's set-up pieces (train/engine.py, train/checkpoint.py): the ZeRO stage chosen by train.zero_stage=auto, parameter counting on the
meta device, ZeRO-3 leaf modules, JSON RNG state, and the resume check across stages."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from train.shards import STATE_VERSION as STREAM_STATE_VERSION
from train.checkpoint import check_resumable, rng_state, set_rng_state
from train.engine import STATE_BYTES_PER_PARAM, choose_zero_stage, count_parameters, decoder_layer_classes

GiB = 2**30


def test_explicit_stage_and_json_stage_win():
    assert tuple(choose_zero_stage("3", None, 10, "float32", 1, 100 * GiB)) == (3, "train.zero_stage=3")
    assert choose_zero_stage("1", 2, 10, "float32", 1, 100 * GiB).stage == 1
    stage, why = choose_zero_stage("auto", 2, 10, "float32", 1, 100 * GiB)
    assert stage == 2 and "deepspeed_config" in why
    # bf16 at stage 0 runs at stage 1: DeepSpeed accumulates bf16 gradients in fp32 only with ZeRO.
    plan = choose_zero_stage("0", None, 10, "bfloat16", 1, 100 * GiB)
    assert plan.stage == 1 and "stage 1 instead of 0" in plan.why and "fp32" in plan.why and not plan.offload_optimizer
    assert "accumulate in fp32" in choose_zero_stage("3", None, 10, "bfloat16", 2, 100 * GiB).why


def test_auto_takes_stage_0_on_one_device_and_2_on_several_when_states_fit():
    n = 135_000_000  # SmolLM2-135M: 2.0 GiB of fp32 states, fits half of 24 GiB
    stage, why = choose_zero_stage("auto", None, n, "float32", 1, 24 * GiB)
    assert stage == 0 and "fit, one rank" in why and "135.0M params x 16 B" in why
    plan = choose_zero_stage("auto", None, n, "bfloat16", 1, 24 * GiB)  # bf16: stage 1 (fp32 accumulation)
    assert (plan.stage, plan.offload_optimizer) == (1, False) and "135.0M params x 20 B" in plan.why
    stage, why = choose_zero_stage("auto", None, n, "float32", 4, 24 * GiB)
    assert stage == 2 and "4 ranks" in why


def test_auto_on_one_rank_offloads_the_optimizer_or_refuses_never_stage_3():
    # 8B in bf16 on one 80 GiB GPU: states 8e9 x 20 B = 149 GiB > 40 GiB; offloaded, 8e9 x 4 B = 29.8 GiB on
    # the GPU (fits 40) and 8e9 x 16 B = 119 GiB on the host (fits half of 512 GiB).
    plan = choose_zero_stage("auto", None, 8_000_000_000, "bfloat16", 1, 80 * GiB, host_bytes=512 * GiB)
    assert (plan.stage, plan.offload_optimizer) == (2, True)
    assert "ZeRO-Offload" in plan.why and "29.80 GiB on the device" in plan.why and "119.21 GiB" in plan.why
    # The same host with half the RAM: the offloaded states do not fit it either -> refused with the estimate.
    with pytest.raises(ValueError, match=r"~149.01 GiB .*do not fit one rank.*119.21 GiB.*128.00 GiB host RAM.*several ranks"):
        choose_zero_stage("auto", None, 8_000_000_000, "bfloat16", 1, 80 * GiB, host_bytes=128 * GiB)
    # 20B: even weights + gradients exceed half the GPU (74.5 GiB > 40 GiB): refused whatever the host.
    with pytest.raises(ValueError, match="do not fit one rank"):
        choose_zero_stage("auto", None, 20_000_000_000, "bfloat16", 1, 80 * GiB, host_bytes=4096 * GiB)
    # Training on the CPU: the device is the host, offloading moves nothing.
    with pytest.raises(ValueError, match="no host to offload to"):
        choose_zero_stage("auto", None, 8_000_000_000, "float32", 1, 64 * GiB, host_bytes=None)


def test_auto_takes_stage_3_only_on_several_ranks_when_states_do_not_fit():
    n = 8_000_000_000  # an 8B model in bf16 on 80 GiB GPUs: 8e9 x 20 B = 149 GiB
    plan = choose_zero_stage("auto", None, n, "bfloat16", 8, 80 * GiB, host_bytes=512 * GiB)
    assert (plan.stage, plan.offload_optimizer) == (3, False) and "do not fit" in plan.why and "8 ranks" in plan.why
    # The boundary: states of exactly half the device still fit.
    device = 2 * 1000 * STATE_BYTES_PER_PARAM["float32"]
    assert choose_zero_stage("auto", None, 1000, "float32", 2, device).stage == 2
    assert choose_zero_stage("auto", None, 1001, "float32", 2, device).stage == 3
    assert choose_zero_stage("auto", None, 1000, "float32", 1, device).stage == 0
    with pytest.raises(ValueError):
        choose_zero_stage("auto", None, 1001, "float32", 1, device)


def test_count_parameters_reads_no_weights_and_counts_tied_once(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert count_parameters(str(tiny_llama_dir)) == sum(p.numel() for p in model.parameters())
    assert model.config.tie_word_embeddings  # so the embedding matrix would count twice if counted naively


def test_decoder_layer_classes_of_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert decoder_layer_classes(model) == [LlamaDecoderLayer]
    assert decoder_layer_classes(torch.nn.Linear(2, 2)) == []


def test_rng_state_is_json_and_restores_every_generator():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    text = json.dumps(rng_state())  # plain JSON: nothing to unpickle on resume
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(json.loads(text))
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_resume_refuses_another_stage_or_world_size(tmp_path):
    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    (ckpt / "rng_rank0.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "zero_stage": 3, "world_size": 2}))
    (ckpt / "data_rank0.json").write_text(json.dumps({"version": STREAM_STATE_VERSION}))
    check_resumable(ckpt, 3, 2)
    with pytest.raises(ValueError, match=r"ZeRO stage 3 on 2 rank\(s\); this run is stage 0 on 1.*train.zero_stage=3"):
        check_resumable(ckpt, 0, 1)
    old = tmp_path / "step_2"  # written before RNG state became JSON
    old.mkdir()
    (old / "rng_rank0.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="older sftgo.*checkpoint.resume=never"):
        check_resumable(old, 3, 1)
    # A data position from before ranks were balanced by tokens cannot continue this order exactly.
    (ckpt / "data_rank0.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(ValueError, match="older sftgo.*version 1.*by tokens.*checkpoint.resume=never"):
        check_resumable(ckpt, 3, 2)
