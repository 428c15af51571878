"""Every key of TrainingArguments, DeepSpeed and LoraConfig is modelled, accepted as neutral (and listed), or refused
as not modelled, never called unknown; keys in no table stay unknown. DeepSpeed's batch sizes are reconciled with
TrainingArguments as HF's Trainer and DeepSpeed do."""

import dataclasses
from pathlib import Path

import pytest

from sim.ingest.deepspeed import DEEPSPEED, OFFLOAD, PRECISION, ZERO
from sim.ingest.keys import KeyClass
from sim.ingest.peft import LORA
from sim.ingest.training_args import TRAINING_ARGS
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from tests.test_bad_input import assert_mentions, assert_one_line_error, run_main, tiny_scenario, write_yaml

NOT_MODELLED = "not modelled (affects memory: "


def with_training(**fields) -> dict:
    """The tiny scenario of test_bad_input with training fields added."""
    data = tiny_scenario()
    data["training"].update(fields)
    return data


def ignored_paths(scenario) -> set[str]:
    return {item.path for item in scenario.ignored_keys}


# The fields of TrainingArguments in transformers 5.24.0 (dataclasses.fields, read from the installed wheel) and
# LoraConfig in PEFT 0.21.2: every one is in the table.
TRANSFORMERS_5_24_FIELDS = """output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate
lr_scheduler_type lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon
optim_target_modules gradient_accumulation_steps average_tokens_across_devices max_grad_norm label_smoothing_factor
bf16 fp16 bf16_full_eval fp16_full_eval tf32 activation_checkpointing activation_checkpointing_kwargs
gradient_checkpointing gradient_checkpointing_kwargs torch_compile torch_compile_backend torch_compile_mode
use_liger_kernel liger_kernel_config use_cache neftune_noise_alpha torch_empty_cache_steps auto_find_batch_size
logging_strategy logging_steps logging_first_step log_on_each_node logging_nan_inf_filter
include_num_input_tokens_seen log_level log_level_replica disable_tqdm report_to run_name project trackio_space_id
trackio_bucket_id trackio_static_space_id eval_strategy eval_steps eval_delay per_device_eval_batch_size
prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object eval_accumulation_steps
include_for_metrics batch_eval_metrics save_only_model save_strategy save_steps save_on_each_node save_total_limit
enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision
load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip
restore_callback_states_from_checkpoint full_determinism seed data_seed use_cpu accelerator_config
parallelism_config dataloader_drop_last dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers
dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order remove_unused_columns label_names
train_sampling_strategy length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers
ddp_static_graph ddp_backend ddp_timeout fsdp fsdp_config deepspeed debug skip_memory_metrics do_train do_eval
do_predict resume_from_checkpoint local_rank""".split()
PEFT_0_21_2_LORA_FIELDS = """task_type peft_type auto_mapping peft_version base_model_name_or_path revision
inference_mode r target_modules exclude_modules lora_alpha lora_dropout fan_in_fan_out bias use_rslora
modules_to_save init_lora_weights layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config
megatron_core trainable_token_indices loftq_config eva_config corda_config lora_ga_config use_dora velora_config
alora_invocation_tokens use_qalora qalora_group_size monteclora_config layer_replication runtime_config lora_bias
target_parameters use_bdlora arrow_config kasa_config ensure_weight_tying""".split()
# DeepSpeed 0.19.6 zero/config.py DeepSpeedZeroConfig fields and aliases
DEEPSPEED_0_19_6_ZERO_KEYS = """stage contiguous_gradients reduce_scatter reduce_bucket_size
use_multi_rank_bucket_allreduce allgather_partitions allgather_bucket_size overlap_comm load_from_fp32_weights
elastic_checkpoint offload_param offload_optimizer zenflow sub_group_size cpu_offload_param
cpu_offload_use_pin_memory cpu_offload stage3_prefetch_bucket_size stage3_param_persistence_threshold
stage3_model_persistence_threshold stage3_max_live_parameters stage3_max_reuse_distance
stage3_gather_16bit_weights_on_model_save stage3_module_granularity_threshold stage3_use_all_reduce_for_fetch_params
stage3_allgather_sequential stage3_gather_fp16_weights_on_model_save ignore_unused_parameters legacy_stage1
round_robin_gradients zero_hpz_partition_size zero_quantized_weights zero_quantized_nontrainable_weights
zero_quantized_gradients zeropp_loco_param mics_shard_size mics_hierarchical_params_gather memory_efficient_linear
pipeline_loading_checkpoint override_module_apply log_trace_cache_warnings enable_sanity_checks
save_muon_momentum_buffer_in_memory leaf_module""".split()


@pytest.mark.parametrize(("fields", "table"), [(TRANSFORMERS_5_24_FIELDS, TRAINING_ARGS),
                                                (PEFT_0_21_2_LORA_FIELDS, LORA),
                                                (DEEPSPEED_0_19_6_ZERO_KEYS, ZERO)])
def test_every_field_of_the_default_versions_is_classified(fields, table):
    assert [name for name in fields if name not in table] == []


def test_every_rule_has_a_reason_or_a_field():
    """A neutral or not-modelled key says why; every class is an enum member."""
    for table in (TRAINING_ARGS, LORA, DEEPSPEED, ZERO, OFFLOAD, PRECISION):
        for key, rule in table.items():
            assert isinstance(rule.key_class, KeyClass)
            assert rule.key_class is KeyClass.MODELLED or rule.why, key


def test_memory_neutral_training_arguments_are_accepted_and_listed():
    """The issue's five keys and an eval key: accepted together, listed, and the plan is the one without them."""
    extra = {"learning_rate": 2e-5, "num_train_epochs": 3, "seed": 1234, "output_dir": "out", "logging_steps": 10,
             "per_device_eval_batch_size": 64}
    plain = build_scenario(tiny_scenario())
    scenario = build_scenario(with_training(**extra))
    assert ignored_paths(scenario) == {f"training.{key}" for key in extra}
    assert resolve_plan(scenario) == resolve_plan(plain)


def test_every_neutral_training_argument_is_accepted():
    """Each NEUTRAL TrainingArguments key, with a value of its kind, builds a scenario and is listed."""
    for key, rule in TRAINING_ARGS.items():
        if rule.key_class is KeyClass.NEUTRAL:
            scenario = build_scenario(with_training(**{key: "x"}))
            assert f"training.{key}" in ignored_paths(scenario), key


def test_not_modelled_key_at_its_default_is_accepted():
    """torch_compile: false and fsdp: "" change nothing; listed as at their default."""
    scenario = build_scenario(with_training(torch_compile=False, fsdp=""))
    assert ignored_paths(scenario) == {"training.torch_compile", "training.fsdp"}


@pytest.mark.parametrize(("section", "key", "value"), [
    ("training", "torch_compile", True),
    ("training", "fsdp", "full_shard auto_wrap"),
    ("training", "label_smoothing_factor", 0.1),
    ("training", "torch_empty_cache_steps", 4),
    ("training", "full_determinism", True),
    ("training", "ddp_bucket_cap_mb", 100),
    ("training", "optim", "paged_adamw_8bit"),
    ("lora", "use_dora", True),
    ("lora", "init_lora_weights", "pissa"),
])
def test_not_modelled_value_is_refused_naming_key_and_value(tmp_path, capsys, section, key, value):
    data = tiny_scenario()
    if section == "lora":
        data["lora"] = {"r": 8, key: value}
    else:
        data["training"][key] = value
    out = tmp_path / "r.json"
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data)),
                                                       "--json", str(out)]))
    assert_mentions(message, f"{section}.{key}", repr(value), "not modelled")
    assert not out.exists()


def test_checkpointing_kwargs_classified():
    """use_reentrant modelled, preserve_rng_state neutral, offload refused."""
    scenario = build_scenario(with_training(gradient_checkpointing=True, gradient_checkpointing_kwargs={
        "use_reentrant": False, "preserve_rng_state": True}))
    assert scenario.training.gradient_checkpointing_kwargs.use_reentrant is False
    assert ignored_paths(scenario) == {"training.gradient_checkpointing_kwargs.preserve_rng_state"}


def test_activation_checkpointing_is_the_5x_name_of_gradient_checkpointing(tmp_path, capsys):
    """transformers 5.24 renamed gradient_checkpointing*; both names say one setting, a disagreement is an error."""
    new = build_scenario(with_training(activation_checkpointing=True,
                                       activation_checkpointing_kwargs={"use_reentrant": False}))
    old = build_scenario(with_training(gradient_checkpointing=True,
                                       gradient_checkpointing_kwargs={"use_reentrant": False}))
    assert new.training == old.training
    data = with_training(activation_checkpointing=True, gradient_checkpointing=False)
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, "training.activation_checkpointing", "training.gradient_checkpointing")


def test_unknown_keys_stay_unknown(tmp_path, capsys):
    """A misspelling is in no table: still refused as unknown, in every section."""
    for data, path in ((with_training(learning_rat=1), "training.learning_rat"),
                       (tiny_scenario(lora={"r": 8, "lora_alfa": 8}), "lora.lora_alfa"),
                       (tiny_scenario(deepspeed={"zero_optimization": {"stage": 0}, "bogus": 1}), "deepspeed.bogus")):
        message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
        assert_mentions(message, path, "unknown key")


REAL_DEEPSPEED_KEYS = {"stage3_gather_16bit_weights_on_model_save": True, "ignore_unused_parameters": True,
                       "zero_hpz_partition_size": 1, "zero_quantized_weights": False, "mics_shard_size": -1,
                       "memory_efficient_linear": True, "round_robin_gradients": True}


def test_real_deepspeed_keys_of_the_issue_are_understood():
    """The zero_optimization keys the issue lists, at the values DeepSpeed's examples use: accepted and listed;
    the top level's monitoring and scheduler too."""
    ds = {"zero_optimization": {"stage": 2, **REAL_DEEPSPEED_KEYS}, "steps_per_print": 10,
          "wall_clock_breakdown": False, "scheduler": {"type": "WarmupLR"}}
    scenario = build_scenario(tiny_scenario(deepspeed=ds))
    expected = {f"deepspeed.zero_optimization.{k}" for k in REAL_DEEPSPEED_KEYS} | {
        "deepspeed.steps_per_print", "deepspeed.wall_clock_breakdown", "deepspeed.scheduler"}
    assert ignored_paths(scenario) == expected


@pytest.mark.parametrize(("zero", "key", "value"), [
    ({"zero_hpz_partition_size": 8}, "zero_hpz_partition_size", "8"),
    ({"zero_quantized_weights": True}, "zero_quantized_weights", "True"),
    ({"mics_shard_size": 8}, "mics_shard_size", "8"),
    ({"memory_efficient_linear": False}, "memory_efficient_linear", "False"),
])
def test_deepspeed_memory_keys_are_refused_as_not_modelled(tmp_path, capsys, zero, key, value):
    (tmp_path / "ds.json").write_text(__import__("json").dumps({"zero_optimization": {"stage": 3, **zero}}))
    data = tiny_scenario(deepspeed="ds.json")
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, f"deepspeed.zero_optimization.{key}", value, NOT_MODELLED, "ds.json")


def test_unprefixed_zero3_names_are_the_stage3_fields():
    """zero/config.py names the fields prefetch_bucket_size..., with the stage3_ names as aliases."""
    a = build_scenario(tiny_scenario(deepspeed={"zero_optimization": {"stage": 3, "prefetch_bucket_size": 1000}}))
    b = build_scenario(tiny_scenario(deepspeed={"zero_optimization": {"stage": 3,
                                                                      "stage3_prefetch_bucket_size": 1000}}))
    assert a.deepspeed == b.deepspeed


def test_training_deepspeed_is_the_top_level_deepspeed(tmp_path):
    """TrainingArguments' `deepspeed` (a path) is the scenario's top-level reference."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    data = with_training(deepspeed="ds.json")
    from sim.scenario import load_scenario
    scenario = load_scenario(write_yaml(tmp_path / "s.yaml", data))
    assert scenario.deepspeed.zero_optimization.stage == 2


def test_ignored_keys_are_frozen_records():
    item = build_scenario(with_training(seed=7)).ignored_keys[0]
    assert dataclasses.astuple(item)[:2] == ("training.seed", 7)


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed batch sizes against TrainingArguments (transformers integrations/deepspeed.py trainer_config_process)

def two_gpu_scenario(ds: dict, **training) -> dict:
    """tiny_scenario on 2 GPUs: per_device_train_batch_size 1, accumulation 2 (train_batch_size = 2 x 1 x 2 = 4)."""
    data = tiny_scenario(deepspeed=ds)
    data["hardware"]["gpus_per_node"] = 2
    data["training"].update(training)
    return data


def test_deepspeed_auto_batch_sizes_are_filled():
    scenario = build_scenario(two_gpu_scenario({"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                                "train_micro_batch_size_per_gpu": "auto",
                                                "gradient_accumulation_steps": "auto"}))
    extra = scenario.deepspeed.model_extra
    # world 2 x micro 1 x accumulation 2 = 4
    assert (extra["train_batch_size"], extra["train_micro_batch_size_per_gpu"],
            extra["gradient_accumulation_steps"]) == (4, 1, 2)


def test_deepspeed_explicit_batch_sizes_that_match_are_accepted():
    scenario = build_scenario(two_gpu_scenario({"zero_optimization": {"stage": 2}, "train_batch_size": 4,
                                                "train_micro_batch_size_per_gpu": 1,
                                                "gradient_accumulation_steps": 2}))
    assert (scenario.training.per_device_train_batch_size, scenario.training.gradient_accumulation_steps) == (1, 2)


@pytest.mark.parametrize(("ds", "needles"), [
    # DeepSpeed says micro-batch 4, TrainingArguments 1: HF's "ds ... vs hf ..." line
    ({"train_micro_batch_size_per_gpu": 4}, ["ds train_micro_batch_size_per_gpu=4",
                                            "hf per_device_train_batch_size=1"]),
    ({"gradient_accumulation_steps": 8}, ["ds gradient_accumulation_steps=8", "hf gradient_accumulation_steps=2"]),
    # 2 GPUs x 1 x 2 = 4, not 16
    ({"train_batch_size": 16}, ["ds train_batch_size=16", "hf train_batch_size (calculated)=4"]),
    ({"gradient_clipping": 0.5}, ["ds gradient_clipping=0.5", "hf max_grad_norm=1.0"]),
    # the optimizer's lr against TrainingArguments.learning_rate (default 5e-05)
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, ["ds optimizer.params.lr=0.0001",
                                                               "hf learning_rate=5e-05"]),
    # the scheduler is neutral for memory but HF still compares its warmup_max_lr
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-4}}},
     ["ds scheduler.params.warmup_max_lr=0.0001", "hf learning_rate=5e-05"]),
])
def test_deepspeed_and_training_arguments_mismatch_is_one_line_error(tmp_path, capsys, ds, needles):
    (tmp_path / "ds_config.json").write_text(__import__("json").dumps({"zero_optimization": {"stage": 2}, **ds}))
    data = two_gpu_scenario("ds_config.json")
    out = tmp_path / "r.json"
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data)),
                                                       "--json", str(out)]))
    assert_mentions(message, "mismatch TrainingArguments", "ds_config.json", "'auto'", *needles)
    assert not out.exists()


def test_neutral_learning_rate_is_still_compared_with_the_deepspeed_optimizer():
    """learning_rate changes no memory but HF compares it: equal values pass."""
    scenario = build_scenario(two_gpu_scenario({"zero_optimization": {"stage": 2},
                                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}},
                                               learning_rate=1e-4))
    assert "training.learning_rate" in ignored_paths(scenario)


def test_not_modelled_key_names_the_scenario_file(tmp_path, capsys):
    """One line naming the file, the key and the value."""
    path = write_yaml(tmp_path / "train.yaml", with_training(torch_compile=True))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path)]))
    assert_mentions(message, "training.torch_compile", "True", "train.yaml")


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed configs as shipped: transformers tests/deepspeed/ds_config_zero2.json and ds_config_zero3.json
# (huggingface/transformers@00e12e7c and @61c7ec94), copied whole into tests/data/deepspeed/

DS_DATA = Path(__file__).resolve().parent / "data" / "deepspeed"


def test_shipped_zero2_config_runs_as_the_hand_written_equivalent():
    """Every key of HF's ZeRO-2 example is understood; the plan equals the one of the same settings written by
    hand (the "auto" values are TrainingArguments', the monitoring and scheduler keys change nothing)."""
    shipped = build_scenario(two_gpu_scenario(str(DS_DATA / "ds_config_zero2.json")))
    by_hand = build_scenario(two_gpu_scenario({
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "allgather_bucket_size": 2e8,
                              "overlap_comm": True, "reduce_bucket_size": 2e8},
        "optimizer": {"type": "AdamW"}}))
    assert resolve_plan(shipped) == resolve_plan(by_hand)
    assert {"deepspeed.scheduler", "deepspeed.steps_per_print", "deepspeed.wall_clock_breakdown",
            "deepspeed.fp16.loss_scale", "deepspeed.zero_optimization.allgather_partitions",
            "deepspeed.zero_optimization.offload_optimizer.pin_memory"} <= ignored_paths(shipped)


def test_shipped_zero3_config_needs_matching_training_arguments(tmp_path, capsys):
    """HF's ZeRO-3 example hard-codes fp16 and the optimizer's lr 3e-5, betas (0.8, 0.999), weight decay 3e-7:
    with TrainingArguments' defaults HF's Trainer refuses it; with the same values it runs."""
    ds = str(DS_DATA / "ds_config_zero3.json")
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml",
                                                                            two_gpu_scenario(ds)))]))
    assert_mentions(message, "ds_config_zero3.json", "ds fp16.enabled=True vs hf fp16|fp16_full_eval=False",
                    "ds optimizer.params.lr=3e-05 vs hf learning_rate=5e-05")
    matching = two_gpu_scenario(ds, fp16=True, learning_rate=3e-5, adam_beta1=0.8, weight_decay=3e-7)
    scenario = build_scenario(matching)
    plan = resolve_plan(scenario)
    assert (plan.zero.stage, plan.zero.offload_param, plan.zero.offload_optimizer) == (3, True, True)
    assert "deepspeed.zero_optimization.stage3_gather_fp16_weights_on_model_save" in ignored_paths(scenario)
