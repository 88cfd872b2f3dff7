"""FSDP launch settings that fail with an EliteKV model are refused before training, naming the fix
(`elitekv_peft.distributed`; what was run is in benchmarks/results/multigpu.md)."""

from __future__ import annotations

import pytest

from elitekv_peft import check_fsdp_launch
from elitekv_peft.distributed import fsdp_launch
from elitekv_peft.training import EliteKVTrainer, training_arguments

from .tiny import tiny_model


def fsdp_env(version: str, ram_efficient: str = "false") -> dict[str, str]:
    """The variables `accelerate launch --use_fsdp --fsdp_version V` sets in every process."""
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": version, "FSDP_CPU_RAM_EFFICIENT_LOADING": ram_efficient}


@pytest.fixture(scope="module")
def untied():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="module")
def tied():
    return tiny_model("llama_gqa", tie_word_embeddings=True)


def test_launch_settings_are_read_from_the_environment():
    assert fsdp_launch({}) is None
    assert fsdp_launch({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"}) is None
    assert fsdp_launch(fsdp_env("2", "true")) == (2, True)
    assert fsdp_launch({"ACCELERATE_USE_FSDP": "True"}) == (1, False)


def test_settings_that_ran_pass(untied, tied):
    check_fsdp_launch(tied, fused_lm_head=True, environ={})  # no FSDP at all
    check_fsdp_launch(tied, fused_lm_head=True, environ=fsdp_env("2"))  # FSDP2 without RAM-efficient loading
    check_fsdp_launch(untied, environ=fsdp_env("1", "true"))  # FSDP1, Trainer, untied embeddings
    check_fsdp_launch(tied, environ=fsdp_env("1", "false"))  # not run: not refused


@pytest.mark.parametrize(
    ("version", "ram_efficient", "fused", "model_name", "message"),
    [
        ("1", "false", True, "untied", "SFTTrainer"),
        ("1", "true", False, "tied", "tie_word_embeddings"),
        ("2", "true", False, "untied", "--fsdp_cpu_ram_efficient_loading false"),
    ],
)
def test_settings_that_failed_are_refused_naming_the_fix(request, version, ram_efficient, fused, model_name, message):
    model = request.getfixturevalue(model_name)
    with pytest.raises(ValueError, match=message) as error:
        check_fsdp_launch(model, fused_lm_head=fused, environ=fsdp_env(version, ram_efficient))
    assert "--fsdp_version 2" in str(error.value) or version == "2"


def test_the_trainer_refuses_before_wrapping(tmp_path, tied, monkeypatch):
    args = training_arguments(str(tmp_path), max_steps=1, batch_size=1, learning_rate=1e-3, disable_tqdm=True)
    for name, value in fsdp_env("1", "true").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        EliteKVTrainer(model=tied, args=args)


def test_processes_that_converted_differently_are_refused():
    """DDP broadcasts rank 0's weights: ranks whose calibration differed would train one model and describe another."""
    from elitekv_peft.distributed import check_same_conversion

    from .tiny import calibration_ids, convert, tiny_model

    configs = [
        convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=calibration_ids(seed=seed)).peft_config[
            "default"
        ]
        for seed in (1, 1, 2)
    ]
    check_same_conversion(configs[0], gather=lambda mine: [mine, configs[1].conversion_choices()])
    assert configs[0].conversion_choices() != configs[2].conversion_choices()  # another calibration, other choices
    with pytest.raises(ValueError, match=r"ranks \[1\] against rank 0.*same calibration_data"):
        check_same_conversion(configs[0], gather=lambda mine: [mine, configs[2].conversion_choices()])
