"""Asking for DeepSpeed or FSDP never silently trains without it; combinations that cannot run are refused up front.

These run in this process (no launch); tests/dist launches the engines themselves (make test-dist).
"""

import pytest
import torch

import unialign
from unialign.config import ConfigError, load_config
from unialign.distributed import check_combination, describe_engine, gather_rows, requested_engine
from unialign.losses.registry import get_method
from unialign.trainer import precompute_plan

ENGINE_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP", "FSDP_VERSION",
              "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "ACCELERATE_USE_CPU", "ACCELERATE_DEEPSPEED_CONFIG_FILE")


@pytest.fixture
def no_engine_env(monkeypatch):
    """A clean environment: no engine asked for by a launcher."""
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _config(tmp_path, **extra):
    return {"dataset": "pairs.jsonl", "output_dir": str(tmp_path / "run"), "report_to": "none", **extra}


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the refusal is for machines without an accelerator")
@pytest.mark.parametrize(
    "extra,message",
    [
        ({"fsdp": "full_shard", "use_cpu": True}, "config key 'fsdp' asks for FSDP, but accelerate would train a "
                                                  "single CPU process"),
        ({"fsdp": "full_shard"}, "config key 'fsdp' asks for FSDP, but accelerate would train a single CPU process"),
    ],
)
def test_fsdp_in_the_config_on_a_cpu_machine_is_refused_before_anything_loads(no_engine_env, tmp_path, extra,
                                                                              message):
    with pytest.raises(ConfigError, match=message):
        unialign.train(_config(tmp_path, **extra))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the refusal is for machines without an accelerator")
def test_a_deepspeed_launch_on_a_cpu_machine_is_refused(no_engine_env, tmp_path):
    # What `accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml` sets, in one process.
    no_engine_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_engine_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"'use_cpu' asks for DeepSpeed ZeRO-3, but accelerate would train a single "
                                          r"CPU process on this machine, without DeepSpeed ZeRO-3: it needs an "
                                          r"accelerator"):
        unialign.train(_config(tmp_path))
    assert not (tmp_path / "run").exists()


def test_the_requested_engine_is_read_from_the_launch_and_the_config(no_engine_env, tmp_path):
    cfg = load_config(None, _config(tmp_path))
    assert requested_engine(cfg) is None and describe_engine(cfg) == ""
    no_engine_env.setenv("ACCELERATE_USE_FSDP", "true")
    no_engine_env.setenv("FSDP_VERSION", "2")
    assert requested_engine(cfg) == "fsdp" and describe_engine(cfg) == "FSDP2"
    no_engine_env.delenv("ACCELERATE_USE_FSDP")
    no_engine_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_engine_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert requested_engine(cfg) == "deepspeed" and describe_engine(cfg) == "DeepSpeed ZeRO-2"
    # An accelerate config with a DeepSpeed JSON (deepspeed_config_file) sets no stage variable: read the file.
    no_engine_env.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    json_file = tmp_path / "ds.json"
    json_file.write_text('{"zero_optimization": {"stage": 3}}')
    no_engine_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(json_file))
    assert describe_engine(cfg) == "DeepSpeed ZeRO-3"
    with pytest.raises(ConfigError, match=r"'logprob_impl' is chunked: under DeepSpeed ZeRO-3"):
        cfg_chunked = load_config(None, _config(tmp_path, logprob_impl="chunked"))
        check_combination(cfg_chunked, get_method("dpo").for_config(cfg_chunked))


@pytest.mark.parametrize(
    "env,extra,loss_type,message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {}, "ppo",
         r"config key 'loss_type' is ppo: ppo's value model trains in a second parameter group of the policy's "
         r"optimizer, outside the model DeepSpeed ZeRO-2 wraps"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {}, "ppo",
         r"outside the model FSDP2 wraps, so the engine would neither shard nor reduce its gradients; train it with "
         r"DDP"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "dpo",
         r"config key 'fsdp_version' is 1: unialign trains under FSDP2 only"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, {"logprob_impl": "chunked"},
         "dpo", r"config key 'logprob_impl' is chunked: under DeepSpeed ZeRO-3 the weights are sharded"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {"logprob_impl": "chunked"}, "dpo",
         r"'logprob_impl' is chunked: under FSDP2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
          "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"}, {}, "dpo",
         r"config key 'zero3_save_16bit_model' is false: under DeepSpeed ZeRO-3 the final model/ would then hold no "
         r"gathered weights"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {"compile_layers": True},
         "dpo", r"config key 'compile_layers' is true: compiling blocks under DeepSpeed ZeRO-2 is untested"),
    ],
)
def test_combinations_that_cannot_run_are_refused_naming_them(no_engine_env, tmp_path, env, extra, loss_type,
                                                              message):
    cfg = load_config(None, _config(tmp_path, loss_type=loss_type, **extra))
    for name, value in env.items():
        no_engine_env.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        check_combination(cfg, get_method(cfg.loss_type).for_config(cfg))


@pytest.mark.parametrize("loss_type,extra", [("dpo", {}), ("kto", {}), ("tpo", {}), ("rao", {}),
                                             ("dpo", {"logprob_impl": "full"})])
def test_combinations_the_engine_tests_train_pass(no_engine_env, tmp_path, loss_type, extra):
    cfg = load_config(None, _config(tmp_path, loss_type=loss_type, **extra))
    no_engine_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_engine_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    check_combination(cfg, get_method(loss_type).for_config(cfg))  # raises nothing


def test_gather_rows_in_one_process_is_the_identity():
    class One:
        num_processes = 1

    values = torch.tensor([1.0, -2.0, 3.5])
    assert gather_rows(One(), values) is values


@pytest.mark.parametrize("rows,world,batch", [(9, 2, 4), (8, 2, 4), (5, 3, 2), (1, 2, 4), (10, 4, 3)])
def test_precompute_gives_every_process_the_same_number_of_forwards_and_each_row_once(rows, world, batch):
    plans = [precompute_plan(rows, world, rank, batch) for rank in range(world)]
    assert len({len(plan) for plan in plans}) == 1  # ZeRO-3/FSDP: every forward is a collective
    scored = [i for plan in plans for chunk in plan for i in chunk]
    assert sorted(scored) == list(range(rows))
    assert all(len(chunk) <= batch for plan in plans for chunk in plan)


def test_precompute_plan_pads_the_shorter_share_with_empty_batches():
    assert precompute_plan(9, 2, 0, 4) == [range(0, 4), range(4, 5)]
    assert precompute_plan(9, 2, 1, 4) == [range(5, 9), range(9, 9)]


def test_deepspeed_asked_for_but_not_installed_is_one_clear_error(no_engine_env, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    no_engine_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"'deepspeed'.*not installed: pip install 'unialign\[dist\]'"):
        load_config(None, _config(tmp_path))


def test_shut_down_ends_the_process_group_and_is_harmless_without_one(tmp_path):
    from unialign.distributed import shut_down

    shut_down()  # none started: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    shut_down()
    assert not torch.distributed.is_initialized()


def test_deepspeed_bucket_sizes_left_unset_become_auto_and_set_ones_are_kept():
    from types import SimpleNamespace

    from unialign.distributed import size_buckets_to_model

    def accelerator(zero):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
            deepspeed_config={"zero_optimization": zero})))

    zero3 = {"stage": 3, "stage3_prefetch_bucket_size": 1000}
    assert size_buckets_to_model(accelerator(zero3)) == ["reduce_bucket_size", "stage3_param_persistence_threshold"]
    assert zero3 == {"stage": 3, "stage3_prefetch_bucket_size": 1000, "reduce_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto"}
    zero2 = {"stage": 2}
    assert size_buckets_to_model(accelerator(zero2)) == ["reduce_bucket_size"]
    assert zero2 == {"stage": 2, "reduce_bucket_size": "auto"}
    assert size_buckets_to_model(SimpleNamespace(state=SimpleNamespace())) == []  # no DeepSpeed
